"""Train the encoder-decoder on the dates task; exact match, BLEU and chrF (sacrebleu) on held-out dates, greedy and beam 4.

    python benchmarks/train_dates.py [--iters 3000] [--batch-size 64] [--n-embd 64] [--n-head 4]
        [--layers 2] [--positions sinusoidal|learned] [--lr 2e-3] [--threads 1]
        [--out-dir /work/runs/issue7/dates] [--out benchmarks/results/train_dates.json]

The task (npflux.tasks.DateTask, seed 0) writes dates in 18 human formats and
3 letter cases; the target is ISO 8601. The held-out set is 2000 fixed
examples whose calendar days never appear in training (in any format). The
training time reported is the training steps alone (the periodic greedy
evaluations on 500 held-out examples are excluded); the decoding times are
for all 2000 held-out examples. The checkpoint goes to OUT_DIR/ckpt, ready
for ``npflux seq2seq decode`` and ``npflux attention``.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse
import json
import time
from pathlib import Path

import benchlib as bench
from npflux.tasks import DateTask
from npflux.train_seq2seq import Seq2SeqTrainConfig, exact_match, model_config_for, train_seq2seq
from npflux.training.seq2seq import bleu_chrf


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    p.add_argument("--positions", default="sinusoidal", choices=["sinusoidal", "learned"])
    p.add_argument("--shared-embeddings", action="store_true")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=_env.THREADS)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out-dir", default="/work/runs/issue7/dates")
    p.add_argument("--out", default="benchmarks/results/train_dates.json")
    args = p.parse_args()

    info = bench.machine_info(args.threads)
    task = DateTask(seed=0)
    model_config = model_config_for(task, n_embd=args.n_embd, n_head=args.n_head, n_encoder_layer=args.layers,
                                    n_decoder_layer=args.layers, positions=args.positions,
                                    shared_embeddings=args.shared_embeddings)
    cfg = Seq2SeqTrainConfig(out_dir=args.out_dir, batch_size=args.batch_size, max_iters=args.iters,
                             learning_rate=args.lr, eval_interval=args.eval_interval, seed=args.seed,
                             progress=not args.quiet)
    t0 = time.perf_counter()
    model, history = train_seq2seq(model_config, cfg, task)
    wall = time.perf_counter() - t0

    heldout = task.heldout()
    results = {}
    for beam in (1, 4):
        t = time.perf_counter()
        accuracy, outputs = exact_match(model, task.tokenizer, heldout, beam_size=beam, progress=not args.quiet)
        seconds = time.perf_counter() - t
        errors = [{"source": s, "target": y, "output": o} for (s, y), o in zip(heldout, outputs) if o != y]
        scores = bleu_chrf(outputs, [y for _, y in heldout])
        results[f"beam{beam}"] = {"exact_match": accuracy, **scores, "correct": len(heldout) - len(errors),
                                  "decode_seconds": round(seconds, 2), "errors": errors[:20]}
        print(f"{'greedy' if beam == 1 else f'beam {beam}'}: exact match {accuracy:.4f} "
              f"({len(heldout) - len(errors)}/{len(heldout)}), BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}, "
              f"decoded in {seconds:.1f} s")
        for e in errors[:5]:
            print(f"   {e['source']!r} -> {e['output']!r} (want {e['target']})")
    train_seconds = history[-1]["train_seconds"]
    payload = {
        "benchmark": "train_dates", "machine": info, "settings": vars(args),
        "model": model_config.to_dict(), "parameters": model.num_parameters(),
        "train_seconds": train_seconds, "wall_seconds_including_evals": round(wall, 2),
        "heldout_examples": len(heldout), "heldout_days": int(len(task.days["heldout"])),
        "train_days": int(len(task.days["train"])), "history": history, **results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2, default=bench._jsonable) + "\n")
    print(f"{model.num_parameters():,} parameters; trained {args.iters} steps in {train_seconds:.0f} s; "
          f"wrote {args.out}; checkpoint {args.out_dir}/ckpt")


if __name__ == "__main__":
    main()

"""Distillation on Tiny Shakespeare: an s1 student distilled from a trained s2 teacher vs the same s1 trained alone.

    python benchmarks/distill_shakespeare.py --teacher out-s2/ckpt [--steps 2000] [--temperature 2 --alpha 0.5]
        [--threads 1] [--out-dir /tmp/distill-bench] [--json benchmarks/results/distill_shakespeare.json]

Both students are shakespeare-s1 with the preset's published settings, the
same seed (so the same initial weights and the same batches, in the same
order) and the same number of steps; they differ only in the loss. Reported:
the loss of the teacher and of each student over the WHOLE validation split
(the last tenth of the text, cut into block-sized windows, every character
after the first predicted once: ``npflux.training.windows_loss``), and the
cost of one training step with and without the teacher's forward pass
(timed afterwards, alternating, on fresh models, so both see the same load).
"""
import _env  # noqa: F401  (threads before numpy)
import harness

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="a trained shakespeare-s2 checkpoint (npflux train)")
    p.add_argument("--data", help="Tiny Shakespeare (default: $NPFLUX_DATA_DIR/tinyshakespeare.txt)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="/tmp/npflux-distill-bench")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "distill_shakespeare.json"))
    args = p.parse_args()

    import numpy as np

    from benchlib import machine_info
    from npflux import GPT, GPTConfig
    from npflux.checkpoint import read_meta
    from npflux.data import find_corpus, get_batch, load_text, prepare_dataset
    from npflux.train import TRAIN_PRESETS, TrainConfig, make_optimizer, train
    from npflux.training import train_step, windows_loss
    from npflux.training.distill import Distillation, distill, load_teacher

    started = time.time()
    load_before = os.getloadavg()
    teacher, tok = load_teacher(args.teacher)
    teacher_steps = read_meta(args.teacher)[1].get("step")
    text = load_text(find_corpus(path=args.data))
    tok, train_ids, val_ids = prepare_dataset(text, tok, val_fraction=0.1)
    student = GPTConfig.from_preset("shakespeare-s1", vocab_size=tok.vocab_size)

    def cfg(name):
        settings = {**TRAIN_PRESETS["shakespeare-s1"], "max_iters": args.steps, "eval_interval": args.eval_interval,
                    "eval_iters": 20, "checkpoint_interval": 0, "progress": False, "seed": args.seed}
        return TrainConfig(out_dir=f"{args.out_dir}/{name}", **settings)

    objective = Distillation(teacher, temperature=args.temperature, alpha=args.alpha, teacher_path=args.teacher)
    runs = {}
    for name in ("alone", "distilled"):
        t0 = time.perf_counter()
        if name == "alone":
            model, state = train(student, cfg(name), train_ids, val_ids, tok, overwrite=True, log=lambda *_: None)
        else:
            model, state = distill(student, cfg(name), objective, train_ids, val_ids, tok, overwrite=True,
                                   log=lambda *_: None)
        seconds = time.perf_counter() - t0
        runs[name] = {"val_loss_full_split": windows_loss(model, val_ids), "train_seconds": seconds,
                      "history": [{k: e[k] for k in ("step", "train_loss", "val_loss")} for e in state.history]}
        print(f"{name:10s} val loss (whole split) {runs[name]['val_loss_full_split']:.4f}   ({seconds:.0f} s)")
    teacher_loss = windows_loss(teacher, val_ids)
    print(f"{'teacher':10s} val loss (whole split) {teacher_loss:.4f}   (shakespeare-s2, {teacher_steps} steps)")

    # The extra cost of a step: fresh models, the same batch, steps alternating between the two losses.
    rng = np.random.default_rng(0)
    batches = [[get_batch(train_ids, 16, student.block_size, rng)] for _ in range(args.timing_steps)]
    models = {n: GPT(student, seed=args.seed) for n in ("alone", "distilled")}
    opts = {n: make_optimizer(m, cfg(n)) for n, m in models.items()}
    hooks = {"alone": {}, "distilled": {"loss": lambda b: objective.loss(models["distilled"], b),
                                        "backward": lambda s: objective.backward(models["distilled"], s)}}
    times = {n: [] for n in models}
    for i, batch in enumerate(batches):
        for n in models:
            t0 = time.perf_counter()
            train_step(models[n], opts[n], batch, **hooks[n])
            if i >= 2:  # warm-up
                times[n].append(time.perf_counter() - t0)
    ms = {n: 1000 * float(np.median(t)) for n, t in times.items()}
    extra = ms["distilled"] / ms["alone"] - 1
    print(f"step: alone {ms['alone']:.1f} ms, distilled {ms['distilled']:.1f} ms (median of "
          f"{len(times['alone'])}): +{100 * extra:.0f}% per step for the teacher's forward")

    payload = {
        "benchmark": "distill_shakespeare", "machine": machine_info(args.threads),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "command": "python benchmarks/distill_shakespeare.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json" and v is not None),
        "teacher": {"checkpoint": args.teacher, "preset": "shakespeare-s2", "steps": teacher_steps,
                    "parameters": teacher.num_parameters(), "val_loss_full_split": teacher_loss},
        "student": {"preset": "shakespeare-s1", "parameters": GPT(student).num_parameters(), "steps": args.steps,
                    "seed": args.seed, "temperature": args.temperature, "alpha": args.alpha},
        "val_tokens": int(len(val_ids)),
        "runs": runs,
        "step_ms": ms, "extra_cost_per_step": extra,
        "wall_seconds": time.time() - started,
    }
    print(f"wrote {harness.write(None, payload, args.json)}")


if __name__ == "__main__":
    main()

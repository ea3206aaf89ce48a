"""``npflux seq2seq``: train an encoder-decoder on a generated task, decode with it.

    npflux seq2seq train [--task dates] [--out-dir out-dates] [--max-iters 3000] [--n-embd 64] ...
    npflux seq2seq decode --checkpoint out-dates/ckpt "3rd of March 1998" "Mar 3, 98" [--beam 4]
    npflux seq2seq eval --checkpoint out-dates/ckpt [--beam 4]     (exact match, BLEU and chrF on the held-out set)
"""
from __future__ import annotations

import json

from .common import add_backend_flag, add_overwrite_flag, finite_float, positive_float, positive_int


def _task(name, seed):
    from ..tasks import DateTask

    if name != "dates":
        raise ValueError(f"unknown task {name!r}; tasks: dates")
    return DateTask(seed=seed)


def _train(args):
    from ..train_seq2seq import Seq2SeqTrainConfig, model_config_for, train_seq2seq

    task = _task(args.task, args.task_seed)
    model_config = model_config_for(
        task, n_embd=args.n_embd, n_head=args.n_head, n_encoder_layer=args.layers, n_decoder_layer=args.layers,
        positions=args.positions, shared_embeddings=args.shared_embeddings, dropout=args.dropout)
    cfg = Seq2SeqTrainConfig(out_dir=args.out_dir, batch_size=args.batch_size, max_iters=args.max_iters,
                             learning_rate=args.learning_rate, warmup_iters=min(args.warmup_iters, args.max_iters),
                             eval_interval=args.eval_interval, seed=args.seed, dtype=args.dtype,
                             backend=args.backend, progress=not args.quiet)
    _, history = train_seq2seq(model_config, cfg, task, overwrite=args.overwrite)
    print(f"held-out exact match (greedy, {cfg.eval_size} examples): {history[-1]['heldout_exact_match']:.4f}; "
          f"training {history[-1]['train_seconds']:.0f} s; checkpoint {args.out_dir}/ckpt")


def _decode(args):
    from ..train_seq2seq import load_seq2seq, translate

    model, tokenizer, _ = load_seq2seq(args.checkpoint, backend=args.backend)
    for source, output in zip(args.sources, translate(model, tokenizer, args.sources, beam_size=args.beam)):
        print(f"{source}\t{output}")


def _eval(args):
    from ..train_seq2seq import exact_match, load_seq2seq
    from ..training.seq2seq import bleu_chrf

    model, tokenizer, ckpt = load_seq2seq(args.checkpoint, backend=args.backend)
    if args.limit is not None and args.limit < 1:  # a negative limit would slice from the end
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    seed = (ckpt.extra or {}).get("task_seed", 0) if args.task_seed is None else args.task_seed
    pairs = _task(args.task, seed).heldout()[: args.limit]
    accuracy, outputs = exact_match(model, tokenizer, pairs, beam_size=args.beam, progress=len(pairs) > 256)
    wrong = [(s, t, o) for (s, t), o in zip(pairs, outputs) if o != t]
    print(json.dumps({"task": args.task, "task_seed": seed, "examples": len(pairs), "beam_size": args.beam,
                      "exact_match": accuracy, **bleu_chrf(outputs, [t for _, t in pairs]), "errors": [{"source": s, "target": t, "output": o}
                                                          for s, t, o in wrong[:10]]}, indent=2))


def add_parsers(subparsers):
    s = subparsers.add_parser("seq2seq", help="encoder-decoder transformer on a generated task (train, decode, eval)")
    sub = s.add_subparsers(dest="seq2seq_command", required=True)

    t = sub.add_parser("train", help="train on a generated task (teacher forcing), greedy exact match while training")
    t.add_argument("--task", default="dates", choices=["dates"], help="the task: dates (written dates to ISO 8601)")
    t.add_argument("--task-seed", type=int, default=0, help="fixes the held-out days and examples")
    t.add_argument("--out-dir", default="out-dates", help="where ckpt/ and log.jsonl go (default out-dates)")
    add_overwrite_flag(t, "OUT_DIR/ckpt and log.jsonl")
    t.add_argument("--max-iters", type=positive_int, default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="examples per step (default 64)")
    t.add_argument("--learning-rate", type=positive_float, default=2e-3, help="peak learning rate (default 2e-3)")
    t.add_argument("--warmup-iters", type=int, default=100, help="linear warmup steps (default 100)")
    t.add_argument("--eval-interval", type=positive_int, default=500, help="steps between evaluations (default 500)")
    t.add_argument("--n-embd", type=positive_int, default=64, help="model width (default 64)")
    t.add_argument("--n-head", type=positive_int, default=4, help="attention heads (default 4)")
    t.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    t.add_argument("--positions", choices=["sinusoidal", "learned"], default="sinusoidal", help="positional encoding (default sinusoidal)")
    t.add_argument("--shared-embeddings", action="store_true", help="one embedding table for source, target and output head")
    t.add_argument("--dropout", type=finite_float, default=0.0, help="dropout probability (default 0)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches (default 0)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype (default float32)")
    add_backend_flag(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    d = sub.add_parser("decode", help="decode source strings with a checkpoint")
    d.add_argument("--checkpoint", required=True, help="a checkpoint written by npflux seq2seq train")
    d.add_argument("sources", nargs="+", help="source strings")
    d.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    add_backend_flag(d)
    d.set_defaults(func=_decode)

    e = sub.add_parser("eval", help="exact match, BLEU and chrF (sacrebleu) on the task's held-out set")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by npflux seq2seq train")
    e.add_argument("--task", default="dates", choices=["dates"], help="the task whose held-out set is scored")
    e.add_argument("--task-seed", type=int, help="default: the seed the checkpoint was trained with")
    e.add_argument("--beam", type=positive_int, default=1, help="beam size (1: greedy)")
    e.add_argument("--limit", type=int, help="only the first N held-out examples")
    add_backend_flag(e)
    e.set_defaults(func=_eval)

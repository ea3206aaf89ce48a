"""npflux reader train: the extractive reader of ``npflux ask --reader``, on synthetic question/answer pairs.

    npflux reader train [--out-dir out-reader] [--steps 3000] [--n-layer 3 --n-embd 64 --n-head 4] [--overwrite | --resume]
"""
from __future__ import annotations

from .common import add_overwrite_flag, positive_float, positive_int


def _train(args):
    from ..training.reader import ReaderTrainConfig, train_reader

    model = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "block_size") if getattr(args, k)}
    cfg = ReaderTrainConfig(out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, eval_interval=args.eval_interval, seed=args.seed,
                            backend=args.backend, progress=not args.quiet)
    _, _, history = train_reader(model, cfg, overwrite=args.overwrite, resume=args.resume)
    last = history[-1]
    print(f"checkpoint: {args.out_dir}/ckpt   log: {args.out_dir}/log.jsonl   held-out synthetic exact match "
          f"{last['exact_match']:.3f}, F1 {last['f1']:.3f}")


def add_parsers(sub):
    p = sub.add_parser("reader", help="the extractive question-answering reader (npflux ask --reader)")
    rsub = p.add_subparsers(dest="reader_command", required=True)
    t = rsub.add_parser("train", help="train a reader on generated question/answer pairs")
    t.add_argument("--out-dir", default="out-reader", help="where ckpt/ and log.jsonl go (default out-reader)")
    add_overwrite_flag(t, "OUT_DIR/ckpt and log.jsonl")
    t.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in OUT_DIR/ckpt (written at every evaluation), with "
                        "the same settings; --steps counts from step 0 and may be raised to train on")
    t.add_argument("--steps", type=positive_int, default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=positive_int, default=32, help="generated questions per step (default 32)")
    t.add_argument("--learning-rate", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    t.add_argument("--eval-interval", type=positive_int, default=500, help="steps between evaluations on held-out generated questions (default 500)")
    t.add_argument("--seed", type=int, default=1337, help="seed for initialisation and the generated questions (default 1337)")
    for name in ("n_layer", "n_embd", "n_head", "block_size"):
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=positive_int,
                       help=f"the encoder's {name} (default: the reader's config default)")
    t.add_argument("--backend", help="numpy or cupy (default: NPFLUX_BACKEND, else numpy)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

"""npflux train: a GPT on a text file (Tiny Shakespeare by default), with checkpoints, log and plot."""
from __future__ import annotations

import dataclasses
import os

from pathlib import Path

from .common import add_backend_flag, add_overwrite_flag, finite_float, fraction, positive_float, positive_int, print_sample, unescape


def _train(args):
    """``npflux train``; under ``mpiexec -n N``, every rank runs this, data-parallel (``npflux.distributed``)."""
    from ..backend import get_backend
    from ..distributed import DataParallel, stop_all_on_error, world
    from ..training.loop import Diverged

    comm = world(get_backend(args.backend).name, require="--zero 1" if args.zero else None)
    parallel = DataParallel(comm, zero=args.zero, overlap=args.overlap, bucket_mb=args.bucket_mb)
    try:
        with stop_all_on_error(comm, collective=(Diverged,)):
            _train_on(args, parallel)
    except Diverged:
        if comm.rank != 0:  # raised on every rank alike: rank 0 says it, the others just stop
            raise SystemExit(1) from None
        raise


def _train_on(args, parallel):
    from ..checkpoint.outdir import claim_output
    from ..data import download_tinyshakespeare, find_corpus, load_text, prepare_dataset
    from ..models import GPTConfig
    from ..train import TrainConfig, train

    lead = parallel.comm.rank == 0
    say = print if lead else (lambda *a, **k: None)  # one voice per job: rank 0's

    overrides = model_overrides(args)
    # Every check that can refuse comes before the data is read, a tokenizer trained or a step taken:
    # the output directory, the training settings, the model's shape.
    out = Path(args.out_dir or TrainConfig.out_dir)
    if lead:  # (the other ranks would race rank 0's writes; rank 0 refusing stops them all)
        claim_output(out / "ckpt", kind="gpt", resume=args.resume, overwrite=args.overwrite,
                     companions=[out / "log.jsonl"])
    tokenizer, doc_sep = _train_tokenizer(args)
    if args.vocab_size is not None and tokenizer != "bpe" and type(tokenizer).__name__ != "BPETokenizer":
        raise ValueError("--vocab-size sets the BPE vocabulary; the char tokenizer's vocabulary is the "
                         "text's characters (add --tokenizer bpe)")
    cfg = train_config(args, doc_sep)
    GPTConfig.from_preset(args.preset, vocab_size=1, **overrides)  # (its real vocabulary comes with the data)

    try:
        path = find_corpus(path=args.data)
    except FileNotFoundError:
        if not args.download or args.data:
            raise
        say("downloading Tiny Shakespeare (1.1 MB, SHA-256 checked) ...")
        path = download_tinyshakespeare()
    text = load_text(path)
    tokenizer, train_ids, val_ids = prepare_dataset(text, tokenizer, val_fraction=args.val_fraction,
                                                    vocab_size=args.vocab_size or 10_000, doc_sep=doc_sep)
    model_config = GPTConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size, **overrides)
    say(f"data: {path} ({len(text):,} characters, vocabulary {tokenizer.vocab_size}, "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens)")
    if doc_sep:
        say(f"tokenizer: {tokenizer!r}, documents split at {doc_sep!r} and packed as [BOS] doc [EOS]")
    model, state = train(model_config, cfg, train_ids, val_ids, tokenizer=tokenizer, resume=args.resume,
                         overwrite=args.overwrite, log=say, parallel=parallel)
    say(f"checkpoint: {cfg.out_dir}/ckpt   log: {cfg.out_dir}/log.jsonl   plot: {cfg.out_dir}/loss.png")
    if args.sample_tokens and lead:
        prompt = "" if getattr(tokenizer, "bos_id", None) is not None else "\n" if "\n" in text else text[0]
        print_sample(model, tokenizer, prompt, args.sample_tokens, temperature=0.8, top_k=None, top_p=None, seed=cfg.seed)


def model_overrides(args) -> dict:
    """The model-shape flags given (--n-embd, --n-head, --n-layer, --dropout, --init, --block-size)."""
    overrides = {k: getattr(args, k) for k in ("n_embd", "n_head", "n_layer", "dropout", "init") if getattr(args, k) is not None}
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    return overrides


def train_config(args, doc_sep):
    """The TrainConfig of a run: the preset's published settings, then every flag given."""
    from ..train import TRAIN_PRESETS, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = dict(TRAIN_PRESETS.get(args.preset, {}))
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    settings["progress"] = not args.quiet
    settings["doc_sep"] = doc_sep
    return TrainConfig(**settings)


def _train_tokenizer(args):
    """(tokenizer or its kind, document separator) for a training run.

    A resumed run reuses its checkpoint's tokenizer (retraining BPE could
    number the tokens differently); a new one trains the kind asked for, by
    default the preset's (BPE for neuraflux, else char). BPE documents are
    split at blank lines unless --doc-sep says otherwise ('' for none).
    """
    from ..checkpoint.outdir import find_checkpoint
    from ..train import PRESET_TOKENIZERS

    kind = args.tokenizer or PRESET_TOKENIZERS.get(args.preset, "char")
    doc_sep = None if args.doc_sep is None else unescape(args.doc_sep)
    ckpt_dir = os.path.join(args.out_dir or "out", "ckpt")
    if args.resume and find_checkpoint(ckpt_dir) is not None:  # (also the one an interrupted save left)
        from ..checkpoint import load_checkpoint
        from ..tokenizers import load_tokenizer

        ckpt = load_checkpoint(ckpt_dir, optimizer=False)  # (the tokenizer only)
        if ckpt.tokenizer:
            saved_sep = ckpt.config.get("train", {}).get("doc_sep")
            if args.doc_sep is not None and (doc_sep or None) != saved_sep:  # '' was recorded as None
                raise ValueError(f"--resume: the checkpoint split documents at {saved_sep!r}, not {doc_sep!r}")
            if args.tokenizer and args.tokenizer != ckpt.tokenizer.get("type"):
                raise ValueError(f"--resume: the checkpoint's tokenizer is {ckpt.tokenizer.get('type')!r}, "
                                 f"not --tokenizer {args.tokenizer!r}")
            return load_tokenizer(ckpt.tokenizer), saved_sep
    if kind == "bpe" and doc_sep is None:
        doc_sep = "\n\n"
    return kind, doc_sep or None


# (flag, type, help) of the training settings; the defaults named are TrainConfig's or the preset's.
_TRAINING_FLAGS = [
    ("batch_size", int, "sequences per step (default 16, or the preset's)"),
    ("block_size", int, "context length in tokens (default: the model's)"),
    ("max_iters", int, "the step training ends at (with --resume: counted from 0, so beyond the checkpoint's step)"),
    ("eval_interval", int, "steps between evaluations and log lines (default 100)"),
    ("eval_iters", int, "batches per evaluation of train and val loss (default 200)"),
    ("learning_rate", float, "peak learning rate (default 1e-3)"),
    ("lr_schedule", str, "'constant' or 'cosine (linear warmup, cosine decay to --min-lr) (default constant)"),
    ("warmup_iters", int, "cosine: warmup steps (default 100)"),
    ("min_lr", float, "cosine: the floor (default learning rate / 10)"),
    ("weight_decay", float, "AdamW weight decay (default 0.01)"),
    ("beta1", float, "AdamW beta1 (default 0.9)"),
    ("beta2", float, "AdamW beta2 (default 0.999)"),
    ("grad_clip", float, "clip the global gradient norm to this (default 0: off)"),
    ("grad_accum", int, "micro-batches accumulated per step (default 1)"),
    ("checkpoint_interval", int, "steps between checkpoints (default 1000; 0: only at the end)"),
    ("early_stopping_patience", int, "evaluations without a better val loss before stopping (default 0: off)"),
    ("seed", int, "seed for initialisation, batches and dropout (default 1337)"),
    ("n_embd", int, "model width (default: the preset's)"),
    ("n_head", int, "attention heads (default: the preset's)"),
    ("n_layer", int, "transformer blocks (default: the preset's)"),
    ("dropout", float, "dropout probability (default: the preset's)"),
]


def add_parsers(sub):
    from ..models import PRESETS

    t = sub.add_parser("train", help="train a GPT on a text file (Tiny Shakespeare by default)")
    t.add_argument("--preset", default="shakespeare-s1", choices=sorted(PRESETS), metavar="PRESET",
                   help="model and recipe preset (default shakespeare-s1): " + ", ".join(sorted(PRESETS)))
    t.add_argument("--data", help="text file (default: $NPFLUX_DATA_DIR/tinyshakespeare.txt or data/shakespeare_char/input.txt)")
    t.add_argument("--download", action="store_true", help="download Tiny Shakespeare if no local copy is found")
    t.add_argument("--out-dir", dest="out_dir", help="where ckpt/, log.jsonl and loss.png go (default out)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt exactly where it stopped")
    add_overwrite_flag(t, "OUT_DIR/ckpt and log.jsonl")
    t.add_argument("--val-fraction", type=fraction, default=0.1, help="share of the text held out for validation, "
                                                                    "in (0, 1) (default 0.1: the last tenth)")
    t.add_argument("--tokenizer", choices=["char", "bpe"],
                   help="char, or byte-level BPE trained on the training split (default: the preset's; neuraflux: bpe)")
    t.add_argument("--vocab-size", type=positive_int, help="BPE vocabulary size (default 10000; BPE only)")
    t.add_argument("--doc-sep", help="BPE: split the corpus into [BOS] doc [EOS] documents here "
                                     "(escapes allowed; default '\\n\\n', blank lines; '' for one document)")
    add_training_flags(t)
    t.add_argument("--sample-tokens", type=int, default=300, help="print a sample of this many tokens at the end (0: none)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    # data parallel, under mpiexec -n N (docs/distributed.md); --batch-size is the global batch
    t.add_argument("--zero", type=int, choices=[0, 1], default=0,
                   help="1: shard AdamW's moments over the MPI ranks (ZeRO stage 1); needs mpiexec")
    t.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="all-reduce the gradients after the backward in one call (the reference), "
                        "not in buckets during it")
    t.add_argument("--bucket-mb", type=positive_float, default=1.0,
                   help="size of the gradient buckets all-reduced during the backward (default 1 MB)")
    t.set_defaults(func=_train)


def add_training_flags(t):
    """The training settings (TrainConfig's fields and the model's shape) as flags: npflux train and distill."""
    for name, typ, help_text in _TRAINING_FLAGS:
        typ = positive_float if name == "learning_rate" else finite_float if typ is float else typ
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=help_text)
    add_backend_flag(t)
    t.add_argument("--dtype", choices=["float32", "float64", "float16"],
                   help="compute dtype (default float32; float64 for checks; float16 has no loss scaling)")
    t.add_argument("--init", choices=["normal", "torch"],
                   help="weight init: 'torch' (PyTorch's layer defaults, as the published small models) or 'normal' (N(0, 0.02), GPT-2)")
    t.add_argument("--decay-matrices-only", dest="decay_matrices_only", action="store_const", const=True,
                   help="weight decay on matrices only (nanoGPT's grouping)")

"""npflux train: a GPT on a text file (Tiny Shakespeare by default), with checkpoints, log and plot."""
from __future__ import annotations

import dataclasses
import os

from pathlib import Path

from .common import add_overwrite_flag, finite_float, fraction, positive_float, positive_int, print_sample, unescape


def _train(args):
    from ..checkpoint.outdir import claim_output
    from ..data import download_tinyshakespeare, find_corpus, load_text, prepare_dataset
    from ..models import GPTConfig
    from ..train import TrainConfig, train

    overrides = model_overrides(args)
    # Every check that can refuse comes before the data is read, a tokenizer trained or a step taken:
    # the output directory, the training settings, the model's shape.
    out = Path(args.out_dir or TrainConfig.out_dir)
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
        print("downloading Tiny Shakespeare (1.1 MB, SHA-256 checked) ...")
        path = download_tinyshakespeare()
    text = load_text(path)
    tokenizer, train_ids, val_ids = prepare_dataset(text, tokenizer, val_fraction=args.val_fraction,
                                                    vocab_size=args.vocab_size or 10_000, doc_sep=doc_sep)
    model_config = GPTConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size, **overrides)
    print(f"data: {path} ({len(text):,} characters, vocabulary {tokenizer.vocab_size}, "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens)")
    if doc_sep:
        print(f"tokenizer: {tokenizer!r}, documents split at {doc_sep!r} and packed as [BOS] doc [EOS]")
    model, state = train(model_config, cfg, train_ids, val_ids, tokenizer=tokenizer, resume=args.resume,
                         overwrite=args.overwrite)
    print(f"checkpoint: {cfg.out_dir}/ckpt   log: {cfg.out_dir}/log.jsonl   plot: {cfg.out_dir}/loss.png")
    if args.sample_tokens:
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

        ckpt = load_checkpoint(ckpt_dir)
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


def add_parsers(sub):
    t = sub.add_parser("train", help="train a GPT on a text file (Tiny Shakespeare by default)")
    t.add_argument("--preset", default="shakespeare-s1", help="model preset (default shakespeare-s1)")
    t.add_argument("--data", help="text file (default: $NPFLUX_DATA_DIR/tinyshakespeare.txt or data/shakespeare_char/input.txt)")
    t.add_argument("--download", action="store_true", help="download Tiny Shakespeare if no local copy is found")
    t.add_argument("--out-dir", dest="out_dir")
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
    t.set_defaults(func=_train)


def add_training_flags(t):
    """The training settings (TrainConfig's fields and the model's shape) as flags: npflux train and distill."""
    for name, typ in [("batch_size", int), ("block_size", int), ("max_iters", int), ("eval_interval", int),
                      ("eval_iters", int), ("learning_rate", float), ("lr_schedule", str), ("warmup_iters", int),
                      ("min_lr", float), ("weight_decay", float), ("beta1", float), ("beta2", float),
                      ("grad_clip", float), ("grad_accum", int), ("checkpoint_interval", int),
                      ("early_stopping_patience", int), ("seed", int), ("backend", str),
                      ("n_embd", int), ("n_head", int), ("n_layer", int), ("dropout", float)]:
        typ = positive_float if name == "learning_rate" else finite_float if typ is float else typ
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    t.add_argument("--dtype", choices=["float32", "float64", "float16"],
                   help="compute dtype (default float32; float64 for checks; float16 has no loss scaling)")
    t.add_argument("--init", choices=["normal", "torch"],
                   help="weight init: 'torch' (PyTorch's layer defaults, as the published small models) or 'normal' (N(0, 0.02), GPT-2)")
    t.add_argument("--decay-matrices-only", dest="decay_matrices_only", action="store_const", const=True,
                   help="weight decay on matrices only (nanoGPT's grouping)")

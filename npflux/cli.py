"""The ``npflux`` command line: thin argparse over the library.

    npflux train --preset shakespeare-s1 [--data PATH] [--out-dir out] [--resume] ...
    npflux sample --checkpoint out/ckpt --prompt "ROMEO:" --max-new-tokens 500 ...
    npflux eval --checkpoint out/ckpt --text FILE
    npflux gradcheck
    npflux bench [--threads N] [--reps 5] [--no-torch] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from . import settings


def _train(args):
    from .data import download_tinyshakespeare, find_corpus, load_text, prepare_dataset
    from .models import GPTConfig
    from .train import TRAIN_PRESETS, TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("n_embd", "n_head", "n_layer", "dropout", "init") if getattr(args, k) is not None}
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    try:
        path = find_corpus(path=args.data)
    except FileNotFoundError:
        if not args.download or args.data:
            raise
        print("downloading Tiny Shakespeare (1.1 MB, SHA-256 checked) ...")
        path = download_tinyshakespeare()
    text = load_text(path)
    tokenizer, doc_sep = _train_tokenizer(args)
    tokenizer, train_ids, val_ids = prepare_dataset(text, tokenizer, val_fraction=args.val_fraction,
                                                    vocab_size=args.vocab_size, doc_sep=doc_sep)
    model_config = GPTConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size, **overrides)

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = dict(TRAIN_PRESETS.get(args.preset, {}))
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    settings["progress"] = not args.quiet
    settings["doc_sep"] = doc_sep
    cfg = TrainConfig(**settings)
    print(f"data: {path} ({len(text):,} characters, vocabulary {tokenizer.vocab_size}, "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens)")
    if doc_sep:
        print(f"tokenizer: {tokenizer!r}, documents split at {doc_sep!r} and packed as [BOS] doc [EOS]")
    model, state = train(model_config, cfg, train_ids, val_ids, tokenizer=tokenizer, resume=args.resume)
    print(f"checkpoint: {cfg.out_dir}/ckpt   log: {cfg.out_dir}/log.jsonl   plot: {cfg.out_dir}/loss.png")
    if args.sample_tokens:
        prompt = "" if getattr(tokenizer, "bos_id", None) is not None else "\n" if "\n" in text else text[0]
        _print_sample(model, tokenizer, prompt, args.sample_tokens, temperature=0.8, top_k=None, top_p=None, seed=cfg.seed)


def _train_tokenizer(args):
    """(tokenizer or its kind, document separator) for a training run.

    A resumed run reuses its checkpoint's tokenizer (retraining BPE could
    number the tokens differently); a new one trains the kind asked for, by
    default the preset's (BPE for neuraflux, else char). BPE documents are
    split at blank lines unless --doc-sep says otherwise ('' for none).
    """
    from .train import PRESET_TOKENIZERS

    kind = args.tokenizer or PRESET_TOKENIZERS.get(args.preset, "char")
    doc_sep = None if args.doc_sep is None else _unescape(args.doc_sep)
    ckpt_dir = os.path.join(args.out_dir or "out", "ckpt")
    if args.resume and os.path.isfile(os.path.join(ckpt_dir, "meta.json")):
        from .checkpoint import load_checkpoint
        from .tokenizers import load_tokenizer

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


def _unescape(text: str) -> str:
    """Backslash escapes of a command-line string turned into characters ('\\n' -> newline); the rest kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _print_sample(model, tokenizer, prompt, n, stop_at_eos=True, **kw):
    from .backend import to_numpy
    from .tokenizers import decode_text, encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    eos = getattr(tokenizer, "eos_id", None) if stop_at_eos else None
    out = to_numpy(model.generate(model.backend.asarray([ids]), n, eos_id=eos, **kw))[0].tolist()
    if eos in out[len(ids):]:
        out = out[: out.index(eos, len(ids))]  # the document ended here
    print(decode_text(tokenizer, out))


def _load(args):
    from .train import model_from_checkpoint

    model, tokenizer, ckpt = model_from_checkpoint(args.checkpoint, backend=args.backend)
    if tokenizer is None:
        sys.exit(f"{args.checkpoint} has no tokenizer; cannot encode text")
    return model, tokenizer


def _sample(args):
    model, tokenizer = _load(args)
    if args.prompt is None:  # a BPE model starts a document from [BOS] alone; a char model needs a character
        args.prompt = "" if getattr(tokenizer, "bos_id", None) is not None else "\n"
    if args.beam is not None:  # (--beam 0 is an error, not a silent switch to sampling)
        return _print_beams(model, tokenizer, args)
    for _ in range(args.num_samples):
        _print_sample(model, tokenizer, args.prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        args.seed = None if args.seed is None else args.seed + 1


def _print_beams(model, tokenizer, args):
    """The best --num-samples beams, best first; each beam's score goes to stderr."""
    from .tokenizers import decode_text, encode_prompt

    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    if args.num_samples > args.beam:
        raise ValueError(f"--num-samples {args.num_samples} is more than the --beam {args.beam} beams kept")
    eos = None if args.ignore_eos else getattr(tokenizer, "eos_id", None)
    seqs, scores = model.beam_search(encode_prompt(tokenizer, args.prompt), beam_width=args.beam,
                                     max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                                     eos_id=eos)
    for rank, (seq, score) in enumerate(zip(seqs[: args.num_samples], scores)):
        print(f"[beam {rank + 1}: score {score:.4f}, {len(seq)} tokens]", file=sys.stderr)
        print(decode_text(tokenizer, seq.tolist()))


def _eval(args):
    from .data import load_text
    from .train import evaluate_text, model_from_checkpoint

    model, tokenizer, ckpt = model_from_checkpoint(args.checkpoint, backend=args.backend)
    if tokenizer is None:
        sys.exit(f"{args.checkpoint} has no tokenizer; cannot encode text")
    # split documents as training did, so [EOS] predictions are scored where they were learned
    doc_sep = ckpt.config.get("train", {}).get("doc_sep") if args.doc_sep is None else \
        (_unescape(args.doc_sep) or None)
    result = evaluate_text(model, tokenizer, load_text(args.text), doc_sep=doc_sep)
    print(json.dumps(result, indent=2))


def _gradcheck(args):
    from .gradcheck import run_all

    ok = run_all(verbose=True)
    sys.exit(0 if ok else 1)


def _bench(args):
    from .bench import WAIT_ENV, run_quick

    missing = {k: v for k, v in WAIT_ENV.items() if k not in os.environ}
    if missing and args.from_command_line and not settings.get("bench_reexec"):
        # The thread pools read these when they load, which has already happened: start again with them.
        os.environ.update(missing, NPFLUX_BENCH_REEXEC="1")
        os.execv(sys.executable, [sys.executable, "-m", "npflux.cli", *sys.argv[1:]])

    run_quick(threads=args.threads, reps=args.reps, use_torch=args.torch, json_path=args.json)


def build_parser():
    p = argparse.ArgumentParser(prog="npflux", description="Transformer language models from scratch on NumPy/CuPy.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GPT on a text file (Tiny Shakespeare by default)")
    t.add_argument("--preset", default="shakespeare-s1", help="model preset (default shakespeare-s1)")
    t.add_argument("--data", help="text file (default: $NPFLUX_DATA_DIR/tinyshakespeare.txt or data/shakespeare_char/input.txt)")
    t.add_argument("--download", action="store_true", help="download Tiny Shakespeare if no local copy is found")
    t.add_argument("--out-dir", dest="out_dir")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt exactly where it stopped")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--tokenizer", choices=["char", "bpe"],
                   help="char, or byte-level BPE trained on the training split (default: the preset's; neuraflux: bpe)")
    t.add_argument("--vocab-size", type=int, default=10_000, help="BPE vocabulary size (default 10000)")
    t.add_argument("--doc-sep", help="BPE: split the corpus into [BOS] doc [EOS] documents here "
                                     "(escapes allowed; default '\\n\\n', blank lines; '' for one document)")
    for name, typ in [("batch_size", int), ("block_size", int), ("max_iters", int), ("eval_interval", int),
                      ("eval_iters", int), ("learning_rate", float), ("lr_schedule", str), ("warmup_iters", int),
                      ("min_lr", float), ("weight_decay", float), ("beta1", float), ("beta2", float),
                      ("grad_clip", float), ("grad_accum", int), ("checkpoint_interval", int),
                      ("early_stopping_patience", int), ("seed", int), ("backend", str), ("dtype", str),
                      ("n_embd", int), ("n_head", int), ("n_layer", int), ("dropout", float)]:
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    t.add_argument("--init", choices=["normal", "torch"],
                   help="weight init: 'torch' (PyTorch's layer defaults, as the published small models) or 'normal' (N(0, 0.02), GPT-2)")
    t.add_argument("--decay-matrices-only", dest="decay_matrices_only", action="store_const", const=True,
                   help="weight decay on matrices only (nanoGPT's grouping)")
    t.add_argument("--sample-tokens", type=int, default=300, help="print a sample of this many tokens at the end (0: none)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", help="text to continue (default: a new document for BPE models, '\\n' for char)")
    s.add_argument("--max-new-tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--num-samples", type=int, default=1, help="samples to draw (with --beam: best beams to show)")
    s.add_argument("--beam", type=int, metavar="WIDTH", help="beam search of this width instead of sampling")
    s.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-prob / length**PENALTY (default 1: mean log-prob per token)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past [EOS] (BPE models)")
    s.add_argument("--backend")
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="loss, perplexity and bits per character of a checkpoint on a text file")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--text", required=True)
    e.add_argument("--doc-sep", help="split documents here (default: as the checkpoint was trained; '' for none)")
    e.add_argument("--backend")
    e.set_defaults(func=_eval)

    g = sub.add_parser("gradcheck", help="numerical gradient check of every op and module")
    g.set_defaults(func=_gradcheck)

    b = sub.add_parser("bench", help="quick npflux vs PyTorch timing: training step (s1, s2) and generation")
    b.add_argument("--threads", type=int, help="torch threads (default: all cores; see benchmarks/README.md)")
    b.add_argument("--reps", type=int, default=5, help="timed repeats per candidate (median reported)")
    b.add_argument("--no-torch", dest="torch", action="store_false", help="npflux only")
    b.add_argument("--json", help="also write the results as JSON here")
    b.set_defaults(func=_bench)

    from .commands import add_all

    add_all(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.from_command_line = argv is None
    try:
        args.func(args)
    except (OSError, ValueError, KeyError) as exc:
        # Missing files, damaged checkpoints, unknown presets or characters: a one-line
        # message and exit status 1 instead of a traceback (NPFLUX_DEBUG=1 shows it).
        if settings.get("debug"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        parser.exit(1, f"npflux {args.command}: error: {message}\n")


if __name__ == "__main__":
    main()

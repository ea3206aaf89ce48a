"""npflux eval: loss, perplexity and bits per character of a checkpoint on a text file."""
from __future__ import annotations

import json
import sys

from .common import add_backend_flag, unescape


def _eval(args):
    from ..data import load_text
    from ..train import evaluate_text, model_from_checkpoint

    model, tokenizer, ckpt = model_from_checkpoint(args.checkpoint, backend=args.backend)
    if tokenizer is None:
        sys.exit(f"{args.checkpoint} has no tokenizer; cannot encode text")
    # split documents as training did, so [EOS] predictions are scored where they were learned
    doc_sep = ckpt.config.get("train", {}).get("doc_sep") if args.doc_sep is None else \
        (unescape(args.doc_sep) or None)
    result = evaluate_text(model, tokenizer, load_text(args.text), doc_sep=doc_sep, progress=not args.quiet)
    print(json.dumps(result, indent=2))


def add_parsers(sub):
    e = sub.add_parser("eval", help="loss, perplexity and bits per character of a checkpoint on a text file")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. out/ckpt)")
    e.add_argument("--text", required=True, help="text file to score (all of it, in windows of the model's block size)")
    e.add_argument("--doc-sep", help="split documents here (default: as the checkpoint was trained; '' for none)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_flag(e)
    e.set_defaults(func=_eval)

"""The ``npflux`` command line: thin argparse over the library, one module per command group.

    npflux train --preset shakespeare-s1 [--data PATH] [--out-dir out] [--resume] ...   cli/train.py
    npflux distill --teacher CKPT --preset shakespeare-s1 [--temperature 2 --alpha 0.5]  cli/distill.py
    npflux sample --checkpoint out/ckpt --prompt "ROMEO:" ...                            cli/sample.py
    npflux eval --checkpoint out/ckpt --text FILE                                        cli/eval.py
    npflux gradcheck                                                                     cli/gradcheck.py
    npflux bench [--threads N] [--reps 5] [--no-torch] [--json PATH]                     cli/bench.py
    npflux quantize | finetune                                                           cli/finetune.py
    npflux seq2seq train | decode | eval                                                 cli/seq2seq.py
    npflux attention                                                                     cli/attention.py
    npflux activations | sae train | sae features                                        cli/interp.py
    npflux index | search | ask [--reader CKPT]                                          cli/retrieval.py
    npflux reader train                                                                  cli/reader.py
    npflux serve                                                                         cli/serve.py

Each module defines ``add_parsers(subparsers)``, which adds its commands with
``set_defaults(func=...)``; ``COMMAND_GROUPS`` below is the one registry, in
the order ``npflux --help`` lists them. Flags that several commands share
(``--backend``, the sampling knobs) are declared once, in ``common.py``. Heavy
imports belong inside the command functions, so ``npflux --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib

from .. import __version__, settings
from ..backend import BackendUnavailable

COMMAND_GROUPS = ("train", "distill", "sample", "eval", "gradcheck", "bench", "finetune", "seq2seq", "attention",
                  "interp", "retrieval", "reader", "serve")


def build_parser():
    p = argparse.ArgumentParser(prog="npflux", description="Transformer language models from scratch on NumPy/CuPy.")
    p.add_argument("--version", action="version", version=f"npflux {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        importlib.import_module(f"{__name__}.{group}").add_parsers(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.from_command_line = argv is None
    try:
        args.func(args)
    except (OSError, ValueError, KeyError, BackendUnavailable) as exc:
        # Missing files, damaged checkpoints, unknown presets or characters: a one-line
        # message and exit status 1 instead of a traceback (NPFLUX_DEBUG=1 shows it).
        if settings.get("debug"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        parser.exit(1, f"npflux {args.command}: error: {message}\n")

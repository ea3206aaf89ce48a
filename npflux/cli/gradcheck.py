"""npflux gradcheck: the numerical gradient check of every op and module."""
from __future__ import annotations

import sys


def _gradcheck(args):
    from ..gradcheck import run_all

    ok = run_all(verbose=True)
    sys.exit(0 if ok else 1)


def add_parsers(sub):
    g = sub.add_parser("gradcheck", help="numerical gradient check of every op and module")
    g.set_defaults(func=_gradcheck)

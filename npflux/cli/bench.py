"""npflux bench: the quick in-process npflux vs PyTorch timing (benchmarks/ has the full harness)."""
from __future__ import annotations

import os
import sys

from .. import settings


def _bench(args):
    from ..bench import WAIT_ENV, run_quick

    missing = {k: v for k, v in WAIT_ENV.items() if k not in os.environ}
    if missing and args.from_command_line and not settings.get("bench_reexec"):
        # The thread pools read these when they load, which has already happened: start again with them.
        os.environ.update(missing, NPFLUX_BENCH_REEXEC="1")
        os.execv(sys.executable, [sys.executable, "-m", "npflux.cli", *sys.argv[1:]])

    run_quick(threads=args.threads, reps=args.reps, use_torch=args.torch, json_path=args.json)


def add_parsers(sub):
    b = sub.add_parser("bench", help="quick npflux vs PyTorch timing: training step (s1, s2) and generation")
    b.add_argument("--threads", type=int, help="torch threads (default: all cores; see benchmarks/README.md)")
    b.add_argument("--reps", type=int, default=5, help="timed repeats per candidate (median reported)")
    b.add_argument("--no-torch", dest="torch", action="store_false", help="npflux only")
    b.add_argument("--json", help="also write the results as JSON here")
    b.set_defaults(func=_bench)

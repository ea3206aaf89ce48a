"""npflux bench: the quick training-step benchmark against PyTorch, from a checkout of the repository.

The benchmark code is not part of the installed package: it lives in the
repository's ``benchmarks/`` (each candidate timed in a process of its own,
benchmarks/harness.py). From a checkout this command runs
``benchmarks/bench_train_step.py`` on s1 and s2 as a subprocess; from an
installed wheel it says where to find the benchmarks instead.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench(args):
    script = REPO_BENCHMARKS / "bench_train_step.py"
    if not script.is_file():
        sys.exit("npflux bench: the benchmarks are not installed with the package; run them from a checkout "
                 "of the npflux repository (python benchmarks/bench_train_step.py, see benchmarks/README.md)")
    cmd = [sys.executable, str(script), "--presets", "shakespeare-s1", "shakespeare-s2",
           "--rounds", str(args.rounds), "--steps", str(args.reps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.torch:
        cmd.append("--no-torch")
    # results go to --json, else to a scratch file: the repository's results/ hold the full runs
    cmd += ["--out", args.json or str(Path(tempfile.gettempdir()) / "npflux-bench.json")]
    print("npflux bench: " + " ".join(cmd[1:]), file=sys.stderr)
    sys.exit(subprocess.call(cmd))


def add_parsers(sub):
    b = sub.add_parser("bench", help="quick npflux vs PyTorch training-step timing (s1, s2), each in its own process")
    b.add_argument("--threads", type=int, help="threads for each library (default: each library's own default)")
    b.add_argument("--reps", type=int, default=20, help="timed steps per process (median reported)")
    b.add_argument("--rounds", type=int, default=1, help="processes per candidate")
    b.add_argument("--no-torch", dest="torch", action="store_false", help="npflux only")
    b.add_argument("--json", help="also write the results as JSON here")
    b.set_defaults(func=_bench)

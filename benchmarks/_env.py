"""Import FIRST in every benchmark script: sets the thread count before NumPy and torch load.

Reads ``--threads N`` from the command line (default: os.cpu_count()) and
sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS to N, so
NumPy's BLAS and torch use the same number of threads; the scripts then call
``torch.set_num_threads(N)`` too (benchlib.load_torch).
"""
import os
import sys


def _threads_from_argv(argv):
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


THREADS = _threads_from_argv(sys.argv[1:]) or os.cpu_count() or 1
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
# Both libraries' thread pools live in one process and take turns. By default
# an idle pool spins for a while (torch's OpenMP, OpenBLAS's pthreads) and
# steals the cores from the other library's next call: measured here, NumPy's
# 2-thread sgemm drops from 190 to 95 GFLOP/s and torch's from 145 to 58 right
# after the other ran. Idle threads that sleep make the alternation fair.
for _var, _value in (("OMP_WAIT_POLICY", "PASSIVE"), ("OPENBLAS_THREAD_TIMEOUT", "4")):  # = benchlib.WAIT_ENV
    os.environ.setdefault(_var, _value)


def common_args(parser):
    """--threads, --reps, --warmup, --no-torch, --quick, --out (shared flags)."""
    parser.add_argument("--threads", type=int, default=THREADS, help="threads for NumPy's BLAS and torch (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: fewer repeats and sizes")
    parser.add_argument("--reps", type=int, help="timed repeats per candidate (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs per candidate")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="npflux only")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/<name>.json)")
    return parser


def setup(args, name):
    """Load torch with the thread count; returns (machine_info, json writer)."""
    from npflux import bench

    bench.load_torch(args.threads)
    info = bench.machine_info(args.threads)
    print(f"{name}: {info['cpu']} ({info['cpu_count']} cores), {args.threads} threads; "
          f"numpy {info['numpy']}, torch {info['torch']}; load average {info['load_average']}")

    def write(payload):
        from pathlib import Path

        payload = {"benchmark": name, "machine": info, "settings": vars(args), **payload}
        if args.out:
            path = Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(__import__("json").dumps(payload, indent=2, default=bench._jsonable) + "\n")
        else:
            path = bench.write_json(name, payload)
        print(f"\nwrote {path}")
        return path

    return info, write

"""Training step (zero_grad, forward, backward, AdamW) and forward-only: npflux vs PyTorch, one run.

    python benchmarks/bench_train_step.py [--quick] [--reps 20] [--big-reps 5] [--threads N] [--no-torch]

Presets and batch shapes: shakespeare-s1 and s2 at 16 x 32, shakespeare-n at
64 x 256 (skipped by --quick; --big-reps repeats). Also reports tokens/s and
model FLOP utilisation against NumPy's own float32 matmul throughput,
measured in the same run.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

from npflux import bench


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--big-reps", type=int, default=5, help="repeats for shakespeare-n (64 x 256)")
    p.add_argument("--presets", nargs="+", help="presets (default: s1 s2 n; --quick: s1 s2)")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward-only rows")
    p.add_argument("--gemm-n", type=int, default=1024, help="size of the square sgemm for the MFU peak")
    args = p.parse_args()
    reps = args.reps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    presets = args.presets or (["shakespeare-s1", "shakespeare-s2"] if args.quick else list(bench.TRAIN_SHAPES))
    info, write = _env.setup(args, "train_step")
    peak = bench.sgemm_gflops(n=args.gemm_n, reps=3 if args.quick else 10)
    print(f"float32 sgemm {args.gemm_n}^2 median: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items() if k != "n"))
    res = bench.bench_train_step(presets, reps=reps, warmup=warmup, big_reps=args.big_reps, use_torch=args.torch,
                                 forward=args.forward, peak=peak)
    print("\nmedian times; ratio = npflux / torch (> 1: npflux slower); MFU = model FLOPs/s / numpy sgemm GFLOP/s")
    print(bench.format_table(res["rows"], bench.TRAIN_COLUMNS))
    write(res)


if __name__ == "__main__":
    main()

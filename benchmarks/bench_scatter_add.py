"""Scatter-add (the embedding backward): np.add.at vs one-hot matmul vs sorted reduceat vs flat bincount.

    python benchmarks/bench_scatter_add.py [--quick] [--reps 50] [--threads N]

Cases (N ids, V rows, C columns): a char vocabulary (65) and a 10k one, at
16 x 32 = 512 and 64 x 256 = 16,384 ids. ``scatter_add_rows`` is
npflux.backend's choice (one-hot up to ONE_HOT_MAX_ROWS rows; above,
add.at when there are fewer ids than rows, else a flat bincount); torch's index_add_ is a reference. The one-hot matrix is skipped when
it would exceed 256 MB.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

import benchlib as bench
from npflux.backend import ONE_HOT_MAX_ROWS


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = p.parse_args()
    reps = args.reps or (5 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else 2
    info, write = _env.setup(args, "scatter_add")
    res = bench.bench_scatter_add(reps=reps, warmup=warmup, use_torch=args.torch)
    print(f"\nmedian microseconds (npflux's scatter_add_rows uses one-hot up to {ONE_HOT_MAX_ROWS} rows)")
    print(bench.format_table(res["rows"], bench.SCATTER_COLUMNS))
    res["one_hot_max_rows"] = ONE_HOT_MAX_ROWS
    write(res)


if __name__ == "__main__":
    main()

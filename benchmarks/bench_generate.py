"""Generation tokens/s: npflux with and without its KV cache, and the torch references (no cache).

    python benchmarks/bench_generate.py [--quick] [--lengths 64 256 1024] [--reps 5] [--threads N]

Model: shakespeare-s1's architecture (4 layers, 4 heads, C 64, vocabulary 65)
with block_size = the longest length + 1 (1025), so no run ever crops its
window; random weights (speed does not depend on them), batch 1, a one-token
prompt, temperature 1. torch samples with the published gpt.py loop
(crop, full forward, softmax, multinomial).
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

import benchlib as bench


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--lengths", type=int, nargs="+", help="new tokens per run (default 64 256 1024; --quick: 64 256)")
    p.add_argument("--long-reps", type=int, help="repeats at 1024+ tokens (default: --reps)")
    p.add_argument("--base", default="shakespeare-s1", help="preset whose architecture is used")
    args = p.parse_args()
    reps = args.reps or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1
    lengths = args.lengths or ([64, 256] if args.quick else [64, 256, 1024])
    info, write = _env.setup(args, "generate")
    res = bench.bench_generate(lengths, reps=reps, warmup=warmup, base=args.base, use_torch=args.torch,
                               long_reps=args.long_reps)
    print(f"\nmedian tokens/s (batch 1, {args.base} architecture, block_size {res['config']['block_size']})")
    print(bench.format_table(res["rows"], bench.GEN_COLUMNS))
    write(res)


if __name__ == "__main__":
    main()

"""Forward + backward of each op at each preset's shapes: npflux ops vs torch functional with autograd.

    python benchmarks/bench_ops.py [--quick] [--reps 50] [--threads N] [--no-torch]

Ops: linear (the MLP's c_fc), layernorm, causal attention (torch: the
published masked_fill/softmax code and scaled_dot_product_attention), gelu
(tanh form), relu, cross-entropy. Shapes from shakespeare-s1/s2 (16 x 32)
and shakespeare-n (64 x 256; skipped by --quick).
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

import benchlib as bench


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--presets", nargs="+")
    args = p.parse_args()
    reps = args.reps or (5 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    presets = args.presets or (["shakespeare-s1", "shakespeare-s2"] if args.quick else list(bench.TRAIN_SHAPES))
    info, write = _env.setup(args, "ops")
    res = bench.bench_ops(presets, reps=reps, warmup=warmup, use_torch=args.torch)
    print("\nforward + backward, median microseconds; ratio = npflux / torch")
    print(bench.format_table(res["rows"], bench.OPS_COLUMNS))
    write(res)


if __name__ == "__main__":
    main()

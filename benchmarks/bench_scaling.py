"""Training-step time against sequence length and against width, npflux vs torch; memory; a PNG plot.

    python benchmarks/bench_scaling.py [--quick] [--reps 5] [--threads N] [--no-memory]

Sweeps (see benchlib.scaling_configs): T = 32..512 at shakespeare-s2's
architecture and batch 4; C = 64..512 at 4 layers, 4 heads, batch 8, T 64.
Also the peak RSS of a training step per framework and preset, each in a
fresh subprocess (benchlib.bench_memory; --no-memory skips it).
Writes benchmarks/results/scaling.json, scaling.png and memory.json.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

import benchlib as bench


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the subprocess RSS measurement")
    p.add_argument("--memory-steps", type=int, default=3)
    args = p.parse_args()
    reps = args.reps or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1
    info, write = _env.setup(args, "scaling")
    res = bench.bench_scaling(quick=args.quick, reps=reps, warmup=warmup, use_torch=args.torch)
    print("\ntraining step, median ms; ratio = npflux / torch")
    print(bench.format_table(res["rows"], bench.SCALING_COLUMNS))
    png = bench.plot_scaling(res["rows"], bench.RESULTS_DIR / "scaling.png")
    res["plot"] = str(png)
    write(res)
    if png:
        print(f"plot: {png}")
    if args.memory:
        presets = ["shakespeare-s1", "shakespeare-s2"] if args.quick else list(bench.TRAIN_SHAPES)
        mem = bench.bench_memory(presets, steps=args.memory_steps, threads=args.threads, use_torch=args.torch)
        print("\npeak RSS of training steps above the post-build baseline (fresh subprocess each)")
        print(bench.format_table(mem["rows"], bench.MEMORY_COLUMNS))
        path = bench.write_json("memory", {"benchmark": "memory", "machine": info, "settings": vars(args), **mem})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

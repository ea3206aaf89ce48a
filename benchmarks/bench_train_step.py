"""Training step (zero_grad, forward, backward, AdamW): npflux vs PyTorch, each in its own process.

    python benchmarks/bench_train_step.py [--presets shakespeare-s1 ...] [--threads N]
        [--rounds 3] [--steps 40] [--device cpu|cuda] [--no-torch] [--no-numpy-path] [--no-one-pass] [--no-reuse-off]
        [--profile] [--out PATH]

The method is benchmarks/harness.py's: every candidate (npflux as installed,
with its compiled kernels where numba is there; npflux on its NumPy path
alone, NPFLUX_NUMBA=0; npflux with each step in one pass, its batch never
split over the threads, NPFLUX_SPLIT_BATCH=0; npflux leaving glibc's malloc
at its defaults, NPFLUX_REUSE_MEMORY=0 (npflux.memory); the PyTorch
reference in the published gpt.py style; the PyTorch reference in the modern
style, fused q/k/v and scaled_dot_product_attention) runs in a fresh process
of its own, in turn, ``--rounds`` times; each process times ``--steps`` steps
after warm-up and reports its median; the table gives the median over
processes. Ratio = npflux / PyTorch (below 1: npflux faster), of those
medians; the paired ratio is the median over rounds of the ratio within a
round (the candidates of a round run back to back, under the same load, so a
slow spell of a shared machine moves both). MFU is the
step's matrix FLOPs per second over the fastest float32 matrix rate that NumPy
(CuPy on cuda) reaches in its own processes in the same run.

Batch shapes: shakespeare-s1 and s2 at 16 x 32, shakespeare-n at 64 x 256.
"""
import argparse
import statistics

import harness

SHAPES = {"shakespeare-s1": (16, 32), "shakespeare-s2": (16, 32), "shakespeare-n": (64, 256), "nanogpt-cpu": (12, 64)}
COLUMNS = [("preset", "preset", "{}"), ("B", "B", "{}"), ("T", "T", "{}"),
           ("npflux_ms", "npflux ms", "{:.2f}"), ("torch_published_ms", "torch published ms", "{:.2f}"),
           ("ratio_published", "ratio", "{:.2f}"), ("torch_modern_ms", "torch modern ms", "{:.2f}"),
           ("ratio_modern", "ratio", "{:.2f}"), ("npflux_mfu", "npflux MFU", "{:.0%}"),
           ("npflux_numpy_ms", "npflux NumPy path ms", "{:.2f}"), ("npflux_shares", "batch shares", "{}"),
           ("npflux_one_pass_ms", "npflux one pass ms", "{:.2f}"),
           ("npflux_no_reuse_ms", "npflux malloc defaults ms", "{:.2f}"),
           ("paired_ratio_published", "paired ratio published", "{:.2f}"),
           ("paired_ratio_modern", "paired ratio modern", "{:.2f}")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["shakespeare-s1", "shakespeare-s2", "shakespeare-n"])
    p.add_argument("--threads", type=int, help="threads for each library (default: each library's own default)")
    p.add_argument("--rounds", type=int, default=3, help="processes per candidate")
    p.add_argument("--steps", type=int, help="timed steps per process (default 40; 10 for shakespeare-n on cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--no-numpy-path", dest="numpy_path", action="store_false",
                   help="skip npflux with its compiled kernels off (NPFLUX_NUMBA=0), timed by default beside npflux as installed")
    p.add_argument("--no-one-pass", dest="one_pass", action="store_false",
                   help="skip npflux with its batch split off (NPFLUX_SPLIT_BATCH=0), timed by default beside npflux as installed")
    p.add_argument("--no-reuse-off", dest="reuse_off", action="store_false",
                   help="skip npflux with reuse_memory off (NPFLUX_REUSE_MEMORY=0), timed by default beside npflux as installed")
    p.add_argument("--profile", action="store_true", help="(cuda) kernels and runtime calls of one step")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train_step[_cuda].json)")
    args = p.parse_args()

    info = harness.machine()
    if args.device == "cuda":
        info["gpu"] = harness.gpu_model()
    print(f"train_step on {info['cpu']} ({info['cpus_usable']} usable CPUs){', ' + info['gpu'] if args.device == 'cuda' else ''}; "
          f"threads {args.threads or 'library default'}; load average {info['load_average']}")
    common = ["--device", args.device, "--warmup", args.warmup] + (["--threads", args.threads] if args.threads else [])
    gemm = harness.alternate({"sgemm_numpy": ["--lib", "sgemm_numpy", "--steps", 10, *common]}, rounds=args.rounds)
    # The fastest product seen, not the median: other load can only slow a timing down, and a rate
    # measured while the machine was busy would put the step's MFU above 100%.
    peak = gemm["sgemm_numpy"]["flops_per_call"] / gemm["sgemm_numpy"]["best_s"]
    print(f"float32 matrix rate (1024^3, its own process, fastest of {args.rounds} x 10): {peak / 1e9:.1f} GFLOP/s")
    rows, raw = [], {}
    for preset in args.presets:
        B, T = SHAPES[preset]
        steps = args.steps or (10 if preset == "shakespeare-n" and args.device == "cpu" else 40)
        base = ["--preset", preset, "--batch", B, "--block", T, "--steps", steps, *common]
        if args.profile:
            base.append("--profile")
        cands = {"npflux": ["--lib", "npflux", *base]}
        if args.numpy_path:
            cands["npflux_numpy"] = ["--lib", "npflux_numpy", *base]
        if args.one_pass:
            cands["npflux_one_pass"] = ["--lib", "npflux_one_pass", *base]
        if args.reuse_off and args.device == "cpu":
            cands["npflux_no_reuse"] = ["--lib", "npflux_no_reuse", *base]
        if args.torch:
            cands["torch_published"] = ["--lib", "torch_published", *base]
            cands["torch_modern"] = ["--lib", "torch_modern", *base]
        print(f"{preset} {B}x{T}:")
        res = harness.alternate(cands, rounds=args.rounds)
        raw[preset] = res
        row = {"preset": preset, "B": B, "T": T, "npflux_ms": res["npflux"]["median_s"] * 1e3,
               "npflux_mfu": res["npflux"]["flops_per_call"] / res["npflux"]["median_s"] / peak}
        row["npflux_shares"] = res["npflux"].get("batch_shares")
        for lib in ("npflux_numpy", "npflux_one_pass", "npflux_no_reuse"):
            if lib in res:
                row[f"{lib}_ms"] = res[lib]["median_s"] * 1e3
        for style in ("published", "modern"):
            if f"torch_{style}" in res:
                row[f"torch_{style}_ms"] = res[f"torch_{style}"]["median_s"] * 1e3
                row[f"ratio_{style}"] = row["npflux_ms"] / row[f"torch_{style}_ms"]
                # Each round runs the candidates back to back, so a ratio within a round compares
                # them under the same machine state; the median of those is robust to a slow spell.
                row[f"paired_ratio_{style}"] = statistics.median(
                    a / b for a, b in zip(res["npflux"]["process_medians_s"], res[f"torch_{style}"]["process_medians_s"]))
        if row["npflux_mfu"] > 1:
            print(f"  warning: MFU {row['npflux_mfu']:.0%} > 100%: the matrix rate above was measured under more "
                  f"load than the step; rerun on a quieter machine")
        rows.append(row)
    info["load_average_after"] = harness.machine()["load_average"]
    info["blas"] = gemm["sgemm_numpy"]["blas"]
    print("\nmedians over processes; ratio = npflux / torch (< 1: npflux faster), of the medians; paired ratio: "
          "the median over rounds of the ratio within a round")
    print(harness.table(rows, COLUMNS))
    name = "train_step" if args.device == "cpu" else "train_step_cuda"
    path = harness.write(name, {"benchmark": name, "machine": info, "settings": vars(args),
                                "sgemm_gflops": peak / 1e9, "rows": rows, "raw": raw}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Beam search speed: with the key/value cache (reordered by parent beam each step) against recomputing the window.

    python benchmarks/bench_beam.py [--threads 1] [--reps 3] [--quick]

Model: the ``neuraflux`` preset (6 layers, 6 heads, width 90, 10,000
tokens, block 128), random weights, float32; an 8-token prompt; no [EOS],
so every search runs its full length. Widths 1 and 4 at 32 and 112 new
tokens (prompt + new tokens stay within the block, where the cache applies).
Both paths give the same beams (checked); candidates alternate, medians of
--reps. Sampling (``model.generate``, cached) is the per-token baseline.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

import numpy as np

import benchlib as bench
from npflux.generate import beam_search
from npflux.models import GPT, GPTConfig


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    info, write = _env.setup(args, "beam")
    model = GPT(GPTConfig.from_preset("neuraflux"), seed=0)
    prompt = np.random.default_rng(0).integers(4, 10_000, 8)
    rows = []
    for n_new in ((32,) if args.quick else (32, 112)):
        for width in (1, 4):
            cached = beam_search(model, prompt, width, n_new, use_cache=True)
            plain = beam_search(model, prompt, width, n_new, use_cache=False)
            assert [s.tolist() for s in cached[0]] == [s.tolist() for s in plain[0]], "cache changed the beams"
            t = bench.time_alternating({
                "cache": lambda: beam_search(model, prompt, width, n_new, use_cache=True),
                "recompute": lambda: beam_search(model, prompt, width, n_new, use_cache=False),
                "sample": lambda: model.generate(prompt[None], n_new, seed=0),
            }, reps=reps, warmup=warmup)
            row = {"new_tokens": n_new, "beam_width": width,
                   **{f"{k}_ms": 1e3 * v["median_s"] for k, v in t.items()},
                   "recompute_over_cache": t["recompute"]["median_s"] / t["cache"]["median_s"],
                   "cache_over_sample": t["cache"]["median_s"] / t["sample"]["median_s"]}
            rows.append(row)
            print(f"{n_new:4d} new tokens, width {width}: cache {row['cache_ms']:8.1f} ms, recompute "
                  f"{row['recompute_ms']:8.1f} ms ({row['recompute_over_cache']:.2f}x), sampling "
                  f"{row['sample_ms']:7.1f} ms (beam/sample {row['cache_over_sample']:.2f}x)")
    write({"model": "neuraflux preset, random weights, float32", "prompt_tokens": len(prompt), "rows": rows})


if __name__ == "__main__":
    main()

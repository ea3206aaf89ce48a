"""Encoder-decoder decoding speed: the memory's cross-attention keys/values projected once per source
against once per decoding step.

    python benchmarks/bench_seq2seq_decode.py [--threads 1] [--reps 5] [--quick]

Model: the dates task's configuration as ``npflux seq2seq train`` builds it
(width 64, 4 heads, 2 encoder and 2 decoder layers, sources up to 29
characters, 11 decoder positions), random weights, float32. Sources: the
first 256 held-out dates, decoded greedily and with beam 4 by
``beam_decode``. The "per step" candidate is the same search with the
memory caches left out (the decoder then projects the memory at every step,
as before); both give the same outputs (checked). Candidates alternate;
medians of --reps.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse

import benchlib as bench
from npflux.models.seq2seq import Seq2SeqTransformer
from npflux.tasks import DateTask
from npflux.train_seq2seq import model_config_for


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    info, write = _env.setup(args, "seq2seq_decode")
    task = DateTask(seed=0, heldout_size=256)
    model = Seq2SeqTransformer(model_config_for(task), seed=0).eval()
    src = task.encode_sources([s for s, _ in task.heldout()])

    cached_step = model._step

    def per_step(tokens, memory, src_mask, caches, memory_caches=None):
        return cached_step(tokens, memory, src_mask, caches)  # no memory caches: projected every step

    def decode(beam, once):
        if once:
            return model.beam_decode(src, beam_size=beam)
        model._step = per_step
        try:
            return model.beam_decode(src, beam_size=beam)
        finally:
            del model._step

    rows = []
    for beam in (1, 4):
        assert decode(beam, True) == decode(beam, False), "the memory cache changed the outputs"
        t = bench.time_alternating({"once": lambda: decode(beam, True), "per_step": lambda: decode(beam, False)},
                                   reps=reps, warmup=warmup)
        row = {"beam_size": beam, "sources": len(src), "once_ms": 1e3 * t["once"]["median_s"],
               "per_step_ms": 1e3 * t["per_step"]["median_s"],
               "per_step_over_once": t["per_step"]["median_s"] / t["once"]["median_s"]}
        rows.append(row)
        print(f"beam {beam}: memory projected once {row['once_ms']:8.1f} ms, every step {row['per_step_ms']:8.1f} ms "
              f"({row['per_step_over_once']:.2f}x)")
    write({"model": "dates task config (64 wide, 4 heads, 2+2 layers), random weights, float32", "rows": rows})


if __name__ == "__main__":
    main()

"""One candidate of bench_distributed.py: training steps of a preset, on one process or as one rank of N.

    python benchmarks/dist_child.py --preset shakespeare-s2 --batch 16 --block 32 --threads 2
    mpiexec -n 2 python benchmarks/dist_child.py --preset shakespeare-s2 --batch 16 --block 32 --threads 1 [--blocking]

``--batch`` is the global batch; each of N ranks computes its share. The step
is ``npflux.training.train_step`` with the data-parallel hook, as ``npflux
train`` runs it (no evaluation, no checkpoints). Rank 0 prints one JSON line:
the median step time, tokens per second, and the share of the step spent
waiting for communication (``GradientSync.wait_seconds``: the blocking
all-reduce, or the wait for the overlapped buckets still in flight).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--blocking", action="store_true")
    p.add_argument("--bucket-mb", type=float, default=1.0)
    args = p.parse_args()

    from npflux import distributed, optim
    from npflux.parallel import set_num_threads
    from npflux.models import GPT, GPTConfig
    from npflux.training import train_step

    set_num_threads(args.threads)
    comm = distributed.world()
    cfg = GPTConfig.from_preset(args.preset, vocab_size=65)
    model = GPT(cfg, seed=0)
    opt = optim.AdamW(model.params, lr=1e-4)
    rows = distributed.shard_range(args.batch, comm.rank, comm.size)
    sync = None
    if comm.size > 1:
        sync = distributed.DataParallelSync(model, distributed.DataParallel(comm, overlap=not args.blocking,
                                                                            bucket_mb=args.bucket_mb),
                                            rows[1] - rows[0], args.batch)
    rng = np.random.default_rng(comm.rank)
    x = rng.integers(0, 65, (rows[1] - rows[0], args.block), dtype=np.int64)
    y = rng.integers(0, 65, (rows[1] - rows[0], args.block), dtype=np.int64)
    times, waits = [], []
    gc.disable()
    for i in range(args.warmup + args.steps):
        comm.barrier()
        before = sync.wait_seconds if sync else 0.0
        t0 = time.perf_counter()
        train_step(model, opt, [(x, y)], sync=sync)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            waits.append((sync.wait_seconds if sync else 0.0) - before)
    if comm.rank == 0:
        median = statistics.median(times)
        print(json.dumps({"median_s": median, "tokens_per_s": args.batch * args.block / median,
                          "wait_fraction": sum(waits) / sum(times), "wait_median_s": statistics.median(waits),
                          "ranks": comm.size, "threads": args.threads, "params": model.num_parameters(),
                          "buckets": len(sync.buckets) if sync else 0, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()

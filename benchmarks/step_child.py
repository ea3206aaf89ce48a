"""One candidate's training step, timed in a process of its own (the harness runs one per candidate).

    python benchmarks/step_child.py --lib npflux|npflux_numpy|npflux_one_pass|npflux_no_reuse|torch_published|torch_modern|sgemm_numpy|sgemm_torch
        --preset shakespeare-s1 [--batch 16 --block 32] [--steps 40] [--warmup 5]
        [--threads N] [--device cpu|cuda] [--dtype float32] [--profile]

Prints one JSON object on its last line: the step times (seconds) and what
this process ran with (threads, the BLAS library and the kernel OpenBLAS chose,
through threadpoolctl). Each library runs as its users run it:

- npflux: imported as it is, with whatever npflux sets up itself; ``--threads``
  goes through npflux's own ``set_num_threads`` (its worker pool and its BLAS);
- PyTorch: its defaults plus ``torch.set_num_threads(N)``;
- on ``--device cuda``, npflux on CuPy and PyTorch on CUDA, every step closed
  by a device synchronisation so that the wall clock times the GPU's work.

No environment variable is set here: the parent passes the environment it
was given, unchanged, to every child.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_models


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
            for d in threadpool_info()]


def _npflux_step(cfg, B, T, device, dtype, seed=0):
    import numpy as np
    from npflux import optim
    from npflux.models import GPT
    from npflux.training import train_step

    backend = "cupy" if device == "cuda" else "numpy"
    model = GPT(cfg, seed=seed, backend=backend, dtype=dtype)
    opt = optim.AdamW(model.params, lr=1e-3)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    y = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    if device == "cuda":
        import cupy

        x, y = cupy.asarray(x), cupy.asarray(y)
        sync = cupy.cuda.Device().synchronize
    else:
        def sync():
            pass

    def step():
        train_step(model, opt, [(x, y)])  # the library's training step: zero_grad, forward, backward, AdamW
        sync()

    step.model = model
    return step


def _torch_step(cfg, B, T, style, device, dtype, seed=0):
    import numpy as np
    import torch
    import torch_models

    torch.manual_seed(seed)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model = torch_models.build(cfg, style, dtype=tdtype).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)).to(device)
    y = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        sync()

    return step


def _sgemm(n, lib, device):
    """float32 n x n x n product: the machine's matrix rate for the MFU column."""
    if lib == "sgemm_torch":
        import torch

        a, b = (torch.randn(n, n, device=device) for _ in range(2))
        out = torch.empty(n, n, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def run():
            torch.mm(a, b, out=out)
            sync()
        return run
    import numpy as np

    xp = np
    if device == "cuda":
        import cupy as xp
    r = np.random.default_rng(0)
    a, b = (xp.asarray(r.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    out = xp.empty((n, n), dtype=np.float32)

    def run():
        xp.matmul(a, b, out=out)
        if device == "cuda":
            xp.cuda.Device().synchronize()
    return run


def _profile_cuda(step):
    """Kernels launched and CUDA runtime calls of one step, through PyTorch's CUPTI profiler.

    CUPTI records every kernel of the process, CuPy's as well as PyTorch's.
    """
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return {"error": f"torch profiler unavailable: {exc}"}
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels, runtime, kernel_us, by_name = 0, {}, 0.0, {}
        for ev in prof.events():
            dev_type = str(getattr(ev, "device_type", ""))
            name = ev.name
            if "CUDA" in dev_type and not name.startswith(("cuda", "Memcpy", "Memset")):
                kernels += 1
                us = getattr(ev, "device_time", 0.0) or getattr(ev, "cuda_time", 0.0) or 0.0
                kernel_us += us
                n_us = by_name.setdefault(name[:80], [0, 0.0])
                n_us[0] += 1
                n_us[1] += us
            elif name.startswith("cuda"):
                runtime[name] = runtime.get(name, 0) + 1
        syncs = {k: v for k, v in runtime.items() if "ynchronize" in k or "Memcpy" in k}
        launches = sum(v for k, v in runtime.items() if "Launch" in k)
        return {"kernels": kernels, "kernel_time_us": kernel_us, "launch_calls": launches,
                "sync_and_copy_calls": syncs, "runtime_calls": runtime,
                "top_kernels": sorted(([k, c, round(t, 1)] for k, (c, t) in by_name.items()),
                                      key=lambda r: -r[2])[:15]}
    except Exception as exc:  # the profiler is a diagnostic: never fail the timing for it
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", required=True,
                   choices=["npflux", "npflux_numpy", "npflux_one_pass", "npflux_no_reuse", "torch_published", "torch_modern",
                            "sgemm_numpy", "sgemm_torch"],
                   help="npflux_numpy: npflux with its compiled kernels off (NPFLUX_NUMBA=0), the NumPy path only; "
                        "npflux_one_pass: npflux with its batch split over threads off (NPFLUX_SPLIT_BATCH=0); "
                        "npflux_no_reuse: npflux leaving glibc's malloc at its defaults (NPFLUX_REUSE_MEMORY=0)")
    p.add_argument("--preset", default="shakespeare-s1")
    p.add_argument("--batch", type=int)
    p.add_argument("--block", type=int)
    p.add_argument("--config", help="JSON of GPTConfig overrides (e.g. nanoGPT's architecture)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gemm-n", type=int, default=1024)
    p.add_argument("--profile", action="store_true", help="(cuda) count kernels and syncs of one step")
    args = p.parse_args(argv)

    if args.lib == "npflux_numpy":
        os.environ["NPFLUX_NUMBA"] = "0"
    if args.lib == "npflux_one_pass":
        os.environ["NPFLUX_SPLIT_BATCH"] = "0"
    if args.lib == "npflux_no_reuse":
        os.environ["NPFLUX_REUSE_MEMORY"] = "0"
    t_import = time.perf_counter()
    info = {"lib": args.lib, "device": args.device, "preset": args.preset, "dtype": args.dtype, "pid": os.getpid()}
    if args.lib.startswith("sgemm"):
        if args.lib == "sgemm_torch":
            import torch
            if args.threads:
                torch.set_num_threads(args.threads)
            info["torch_threads"] = torch.get_num_threads()
        elif args.threads:
            from npflux import parallel
            parallel.set_num_threads(args.threads)
        step = _sgemm(args.gemm_n, args.lib, args.device)
        info["flops_per_call"] = 2 * args.gemm_n ** 3
    else:
        from npflux.models import GPTConfig
        from npflux.train import TRAIN_PRESETS

        cfg = GPTConfig.from_preset(args.preset, **json.loads(args.config or "{}"))
        B = args.batch or TRAIN_PRESETS.get(args.preset, {}).get("batch_size", 16)
        T = args.block or cfg.block_size
        info.update(batch=B, block=T, config=cfg.to_dict())
        if args.lib.startswith("npflux"):
            import npflux
            from npflux import parallel

            if args.threads:
                parallel.set_num_threads(args.threads)
            info["npflux_threads"] = parallel.num_threads()
            info["npflux_version"] = npflux.__version__
            info["npflux_reuse_memory"] = npflux.memory.keeps_freed_memory()  # what npflux set up at import
            step = _npflux_step(cfg, B, T, args.device, args.dtype)
        else:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            info["torch_threads"] = torch.get_num_threads()
            info["torch_version"] = torch.__version__
            step = _torch_step(cfg, B, T, args.lib.split("_", 1)[1], args.device, args.dtype)
        from benchlib import train_step_flops

        info["flops_per_call"] = train_step_flops(cfg, B, T)["total"]
    info["setup_s"] = time.perf_counter() - t_import

    for _ in range(args.warmup):
        step()
    gc.collect()
    gc.disable()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    gc.enable()
    if args.profile and args.device == "cuda":
        info["profile"] = _profile_cuda(step)
    if hasattr(step, "model"):
        from npflux.training import threads

        info["npflux_batch_shares"] = threads.shares(step.model)  # 1: one pass; n: split over n threads
    info["blas"] = _blas_info()
    info["times_s"] = times
    info["median_s"] = statistics.median(times)
    info["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps(info))


if __name__ == "__main__":
    main()

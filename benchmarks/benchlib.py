"""The older benchmarks' library: npflux and PyTorch timed side by side in ONE process.

(The side-by-side training-step timings moved to ``harness.py``, one process per
candidate; the scripts still on this module are listed in README.md.)

The method, shared by ``npflux bench`` and the scripts in ``benchmarks/``:

- **Alternation.** The candidates of one measurement (npflux, the PyTorch
  reference in the published gpt.py style, the PyTorch reference in the
  modern fused-qkv/SDPA style) run in turn: npflux, torch-published,
  torch-modern, npflux, ... so a change in machine load (other processes,
  CPU frequency) hits all of them alike instead of whichever ran last.
- **Warm-up excluded, medians reported.** Each candidate runs ``warmup``
  times first (allocator, BLAS thread pool, caches); then ``reps`` timed
  runs each, and the median is the number reported (min and max are kept in
  the JSON). The garbage collector is off while timing.
- **Same threads.** ``torch.set_num_threads(N)``; the OpenMP/OpenBLAS/MKL
  environment variables are set to N before NumPy is imported where the
  entry point can (the ``benchmarks/`` scripts do), and NumPy's OpenBLAS is
  also told N at run time (``set_blas_threads``: threadpoolctl if installed,
  else OpenBLAS's own ``*_set_num_threads`` through ctypes), which is what
  ``npflux bench`` relies on since NumPy is loaded before it starts. N is
  ``os.cpu_count()`` unless ``--threads`` says otherwise; the JSON reports
  what each library ended up with.
- **float32** everywhere; the same weights (copied from npflux into torch,
  ``benchmarks/torch_models.py``) and the same batches.

PyTorch is optional: without it (or without ``benchmarks/torch_models.py``,
as in an installed wheel) only the npflux columns are filled.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from npflux import backend, ops, optim
from npflux.backend import scatter_add_rows
from npflux.models import GPT, GPTConfig
from npflux.training import train_step

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Idle thread pools sleep instead of spinning, so torch's and NumPy's take turns fairly
# on the same cores (benchmarks/_env.py explains; set before either library loads).
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
TRAIN_SHAPES = {"shakespeare-s1": (16, 32), "shakespeare-s2": (16, 32), "shakespeare-n": (64, 256)}
STYLES = ("published", "modern")


# ---------------------------------------------------------------------------
# threads, torch, machine description
# ---------------------------------------------------------------------------


def set_thread_env(n=None):
    """Set OMP/OpenBLAS/MKL thread counts in the environment (effective only before NumPy loads)."""
    n = int(n or os.cpu_count() or 1)
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    return n


def set_blas_threads(n):
    """Set NumPy's OpenBLAS thread count at run time (threadpoolctl when installed, else ctypes).

    Returns the count the library reports afterwards, or None when it cannot
    be set (then only the environment variables, read when NumPy loaded, apply).
    """
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(n), user_api="blas")
        return int(n)
    except ImportError:
        return backend.set_blas_threads(n)


blas_threads = backend.blas_threads


_TORCH = None


def load_torch(threads=None):
    """(torch, torch_models) or (None, None) when PyTorch or benchmarks/torch_models.py is missing."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
        except ImportError:
            _TORCH = (None, None)
        else:
            path = BENCH_DIR / "torch_models.py"
            if "torch_models" in sys.modules:
                _TORCH = (torch, sys.modules["torch_models"])
            elif path.is_file():
                spec = importlib.util.spec_from_file_location("torch_models", path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules["torch_models"] = mod
                spec.loader.exec_module(mod)
                _TORCH = (torch, mod)
            else:
                _TORCH = (None, None)
    torch = _TORCH[0]
    if threads:
        set_blas_threads(threads)
        if torch is not None:
            torch.set_num_threads(int(threads))
    return _TORCH


def _cpu_model():
    from harness import cpu_model

    return cpu_model()


def _blas_info():
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return {"name": blas.get("name"), "version": blas.get("version")}
    except Exception:  # older NumPy: no dict mode
        return None


def machine_info(threads):
    torch, _ = load_torch()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": affinity,
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "blas": _blas_info(),
        "torch": torch.__version__ if torch is not None else None,
        "threads_requested": threads,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "numpy_blas_threads": blas_threads(),
        "thread_env": {v: os.environ.get(v) for v in (*THREAD_ENV, *WAIT_ENV)},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "dtype": "float32",
    }
    return info


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def _summary(ts):
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def time_alternating(fns: dict, reps: int = 10, warmup: int = 2):
    """Time each callable ``reps`` times, in turn (a, b, c, a, b, c, ...), after ``warmup`` untimed rounds.

    Returns name -> {median_s, min_s, max_s, n}.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, reps)):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return {k: _summary(v) for k, v in times.items()}


def _ratio(a, b):
    return a / b if a and b else None


# ---------------------------------------------------------------------------
# FLOPs and the machine's own matmul throughput
# ---------------------------------------------------------------------------


def train_step_flops(cfg: GPTConfig, B: int, T: int) -> dict:
    """Floating-point operations of one training step (forward + backward), from the shapes.

    Counted: matrix products only (2 FLOPs per multiply-add); layer norms,
    activations, softmax, the optimizer and embedding lookups are left out
    (they are O(tokens * C), small beside the products), as in the PaLM /
    nanoGPT MFU convention. Per token of a (B, T) batch, forward:

    - per layer: c_attn C x 3C, attention projection C x C, c_fc C x 4C,
      MLP projection 4C x C: 12 C^2 multiply-adds;
    - lm_head: C x V multiply-adds;
    - attention per layer: q k^T is T multiply-adds per channel (T * C over
      the heads) and weights @ v another T * C: 2 T C multiply-adds. The full
      T x T square is counted, not the causal half, as PaLM does.

    So forward = 2 * (N_mm + 2 L T C) per token, N_mm = L * 12 C^2 + V C, and
    backward is twice the forward (one product for the input gradient and one
    for the weight gradient per forward product): step = 6 N_mm tokens +
    12 L T C tokens.
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    tokens = B * T
    n_mm = L * 12 * C * C + V * C
    fwd_mm = 2 * n_mm * tokens
    fwd_attn = 2 * L * 2 * T * C * tokens
    return {"matmul_params": n_mm, "tokens": tokens, "forward": fwd_mm + fwd_attn,
            "matmul": 3 * fwd_mm, "attention": 3 * fwd_attn, "total": 3 * (fwd_mm + fwd_attn)}


def forward_flops(cfg, B, T):
    return train_step_flops(cfg, B, T)["forward"]


def sgemm_gflops(n: int = 1024, reps: int = 5, warmup: int = 1, torch_too: bool = True):
    """Median float32 square-matmul throughput (GFLOP/s) of NumPy (and torch.mm), alternated."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    fns = {"numpy": lambda: np.matmul(a, b, out=out)}
    torch, _ = load_torch()
    if torch is not None and torch_too:
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
        fns["torch"] = lambda: torch.mm(ta, tb, out=tout)
    res = time_alternating(fns, reps=reps, warmup=warmup)
    return {k: 2 * n ** 3 / v["median_s"] / 1e9 for k, v in res.items()} | {"n": n}


# ---------------------------------------------------------------------------
# training step / forward
# ---------------------------------------------------------------------------


def random_batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    y = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    return x, y


def npflux_step_fns(cfg, B, T, seed=0, lr=1e-3):
    """(train_step, forward_only, model) closures for an npflux GPT."""
    model = GPT(cfg, seed=seed)
    opt = optim.AdamW(model.params, lr=lr)
    x, y = random_batch(cfg, B, T, seed)

    def step():
        model.train()
        train_step(model, opt, [(x, y)])  # the library's training step

    def forward():
        model.eval()
        model.forward(x, y)

    return step, forward, model


def torch_step_fns(cfg, B, T, style, npflux_model, seed=0, lr=1e-3):
    """(train_step, forward_only, model) closures for a torch reference with npflux's weights."""
    torch, tm = load_torch()
    model = tm.build(cfg, style, npflux_model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)  # torch defaults: betas (0.9, 0.999), wd 0.01
    x, y = (torch.from_numpy(a) for a in random_batch(cfg, B, T, seed))

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()

    def forward():
        model.eval()
        with torch.no_grad():
            model(x, y)

    return step, forward, model


def candidates(cfg, B, T, use_torch=True, seed=0):
    """name -> (train_step, forward) for npflux and, when available, both torch styles."""
    step, fwd, model = npflux_step_fns(cfg, B, T, seed)
    out = {"npflux": (step, fwd)}
    torch, _ = load_torch()
    if use_torch and torch is not None:
        torch.manual_seed(seed)
        for style in STYLES:
            s, f, _ = torch_step_fns(cfg, B, T, style, model, seed)
            out[f"torch_{style}"] = (s, f)
    return out


def bench_train_step(presets=("shakespeare-s1", "shakespeare-s2"), reps=10, warmup=2, big_reps=3,
                     use_torch=True, forward=True, peak=None, shapes=None, log=print):
    """Training-step (and forward-only) medians per preset; big_reps for shakespeare-n.

    ``peak``: NumPy sgemm GFLOP/s for the MFU column (measured here when None).
    """
    shapes = {**TRAIN_SHAPES, **(shapes or {})}
    if peak is None:
        peak = sgemm_gflops(reps=max(3, reps // 2))
    rows = []
    for preset in presets:
        cfg = GPTConfig.from_preset(preset)
        B, T = shapes[preset]
        r = big_reps if preset == "shakespeare-n" else reps
        w = min(warmup, 1) if preset == "shakespeare-n" else warmup
        cands = candidates(cfg, B, T, use_torch)
        flops = train_step_flops(cfg, B, T)
        for kind, idx in (("train_step", 0), ("forward", 1)):
            if kind == "forward" and not forward:
                continue
            res = time_alternating({k: v[idx] for k, v in cands.items()}, reps=r, warmup=w)
            fl = flops["total"] if kind == "train_step" else flops["forward"]
            row = {"kind": kind, "preset": preset, "B": B, "T": T, "params": _param_count(cfg), "flops": fl, "reps": r, "times": res}
            _add_timing_columns(row, res, fl, peak, tokens=B * T)
            rows.append(row)
            if log:
                log(f"  {kind:10s} {preset}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.2f} ms" for k, v in res.items()))
    return {"peak_gflops": peak, "rows": rows}


def _add_timing_columns(row, res, flops, peak, tokens=None):
    """Per candidate: median ms, MFU (and tokens/s, GFLOP/s); npflux / torch ratio per torch style."""
    for name, t in res.items():
        seconds = t["median_s"]
        row[f"{name}_ms"] = seconds * 1e3
        if tokens is not None:
            row[f"{name}_tok_s"] = tokens / seconds
            row[f"{name}_gflops"] = flops / seconds / 1e9
        row[f"{name}_mfu"] = flops / seconds / 1e9 / peak["numpy"]
    for style in STYLES:
        if f"torch_{style}" in res:
            row[f"ratio_{style}"] = _ratio(res["npflux"]["median_s"], res[f"torch_{style}"]["median_s"])


def _param_count(cfg):
    return GPT(cfg).num_parameters()


TRAIN_COLUMNS = [("kind", "what", "{}"), ("preset", "preset", "{}"), ("B", "B", "{}"), ("T", "T", "{}"),
                 ("npflux_ms", "npflux ms", "{:.2f}"), ("torch_published_ms", "torch-pub ms", "{:.2f}"),
                 ("torch_modern_ms", "torch-mod ms", "{:.2f}"), ("ratio_published", "np/pub", "{:.2f}"),
                 ("ratio_modern", "np/mod", "{:.2f}"), ("npflux_tok_s", "npflux tok/s", "{:,.0f}"),
                 ("npflux_mfu", "npflux MFU", "{:.1%}"), ("torch_modern_mfu", "torch-mod MFU", "{:.1%}")]


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------


def generation_config(base="shakespeare-s1", max_len=1024, prompt_len=1):
    """The base preset's architecture with block_size max_len + prompt_len (no cropping in any run)."""
    return GPTConfig.from_preset(base, block_size=max_len + prompt_len)


def bench_generate(lengths=(64, 256, 1024), reps=5, warmup=1, base="shakespeare-s1", use_torch=True,
                   long_reps=None, log=print):
    """Tokens/s of sampling (batch 1, a 1-token prompt, temperature 1) at each length.

    npflux with its KV cache, npflux recomputing the window every token, and
    the torch references (the published sampling loop: no cache).
    """
    cfg = generation_config(base, max(lengths))
    model = GPT(cfg, seed=0)
    model.eval()
    prompt = np.zeros((1, 1), dtype=np.int64)
    torch, tm = load_torch()
    tmodels = {}
    if use_torch and torch is not None:
        tmodels = {s: tm.build(cfg, s, model).eval() for s in STYLES}
    rows = []
    for n in lengths:
        fns = {"npflux_cache": lambda n=n: model.generate(prompt, n, seed=0, use_cache=True),
               "npflux_nocache": lambda n=n: model.generate(prompt, n, seed=0, use_cache=False)}
        for s, tmod in tmodels.items():
            tp = torch.from_numpy(prompt)
            gen = torch.Generator().manual_seed(0)
            fns[f"torch_{s}"] = lambda tmod=tmod, n=n, tp=tp, gen=gen: tmod.generate(tp, n, generator=gen)
        r = long_reps if (long_reps and n >= 1024) else reps
        res = time_alternating(fns, reps=r, warmup=warmup)
        row = {"new_tokens": n, "block_size": cfg.block_size, "reps": r, "times": res}
        for k, v in res.items():
            row[f"{k}_tok_s"] = n / v["median_s"]
        row["cache_speedup"] = res["npflux_nocache"]["median_s"] / res["npflux_cache"]["median_s"]
        rows.append(row)
        if log:
            log(f"  generate {n}: " + ", ".join(f"{k} {n / v['median_s']:,.0f} tok/s" for k, v in res.items()))
    return {"config": cfg.to_dict(), "rows": rows}


GEN_COLUMNS = [("new_tokens", "new tokens", "{}"), ("npflux_cache_tok_s", "npflux+cache tok/s", "{:,.0f}"),
               ("npflux_nocache_tok_s", "npflux no-cache tok/s", "{:,.0f}"),
               ("torch_published_tok_s", "torch-pub tok/s", "{:,.0f}"),
               ("torch_modern_tok_s", "torch-mod tok/s", "{:,.0f}"), ("cache_speedup", "cache x", "{:.1f}")]


# ---------------------------------------------------------------------------
# ops: forward + backward of each op at a preset's shapes
# ---------------------------------------------------------------------------


def op_shapes(preset):
    cfg = GPTConfig.from_preset(preset)
    B, T = TRAIN_SHAPES[preset]
    return dict(B=B, T=T, C=cfg.n_embd, H=cfg.n_head, D=cfg.n_embd // cfg.n_head, V=cfg.vocab_size)


def _op_cases(s, use_torch):
    """op name -> (shape string, {candidate: fn}) for one preset's shapes.

    Every closure binds its arrays as default arguments: the names are reused
    from case to case.
    """
    rng = np.random.default_rng(0)
    B, T, C, H, D, V = s["B"], s["T"], s["C"], s["H"], s["D"], s["V"]
    N = B * T
    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    torch, _ = load_torch() if use_torch else (None, None)
    cases = {}

    def tleaf(a):
        return torch.tensor(a, requires_grad=True)

    def torch_fb(fn, leaves, dy):
        def run():
            for t in leaves:
                t.grad = None
            fn().backward(dy)
        return run

    # linear: the MLP's c_fc, (N, C) @ (C, 4C) + b
    x, w, b, dy = f32(N, C), f32(C, 4 * C) * 0.02, f32(4 * C), f32(N, 4 * C)
    fns = {"npflux": lambda x=x, w=w, b=b, dy=dy: ops.linear_backward(dy, ops.linear_forward(x, w, b)[1])}
    if torch is not None:
        tx, tw, tb, tdy = tleaf(x), tleaf(w.T.copy()), tleaf(b), torch.tensor(dy)
        fns["torch"] = torch_fb(lambda tx=tx, tw=tw, tb=tb: torch.nn.functional.linear(tx, tw, tb), (tx, tw, tb), tdy)
    cases["linear"] = (f"({N},{C})x({C},{4 * C})", fns)

    # layernorm over C
    x, g, be, dy = f32(B, T, C), f32(C), f32(C), f32(B, T, C)
    fns = {"npflux": lambda x=x, g=g, be=be, dy=dy: ops.layernorm_backward(dy, ops.layernorm_forward(x, g, be)[1])}
    if torch is not None:
        tx, tg, tbe, tdy = tleaf(x), tleaf(g), tleaf(be), torch.tensor(dy)
        fns["torch"] = torch_fb(lambda tx=tx, tg=tg, tbe=tbe: torch.nn.functional.layer_norm(tx, (C,), tg, tbe),
                                 (tx, tg, tbe), tdy)
    cases["layernorm"] = (f"({B},{T},{C})", fns)

    # causal attention
    q, k, v, dy = f32(B, H, T, D), f32(B, H, T, D), f32(B, H, T, D), f32(B, H, T, D)
    fns = {"npflux": lambda q=q, k=k, v=v, dy=dy: ops.attention_backward(dy, ops.attention_forward(q, k, v, causal=True)[1])}
    if torch is not None:
        F = torch.nn.functional
        tq, tk, tv, tdy = tleaf(q), tleaf(k), tleaf(v), torch.tensor(dy)
        tril = torch.tril(torch.ones(T, T))

        def manual():
            wei = tq @ tk.transpose(-2, -1) * D ** -0.5
            wei = wei.masked_fill(tril == 0, float("-inf"))
            return F.softmax(wei, dim=-1) @ tv

        fns["torch"] = torch_fb(manual, (tq, tk, tv), tdy)
        fns["torch_sdpa"] = torch_fb(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True),
                                     (tq, tk, tv), tdy)
    cases["attention"] = (f"({B},{H},{T},{D}) causal", fns)

    # activations on the MLP's hidden layer
    x, dy = f32(B, T, 4 * C), f32(B, T, 4 * C)
    for name, fw, bw, tfn in (("gelu", ops.gelu_forward, ops.gelu_backward,
                                lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
                               ("relu", ops.relu_forward, ops.relu_backward, lambda t: torch.relu(t))):
        fns = {"npflux": lambda fw=fw, bw=bw, x=x, dy=dy: bw(dy, fw(x)[1])}
        if torch is not None:
            tx, tdy = tleaf(x), torch.tensor(dy)
            fns["torch"] = torch_fb(lambda tx=tx, tfn=tfn: tfn(tx), (tx,), tdy)
        cases[name] = (f"({B},{T},{4 * C})", fns)

    # cross-entropy over the vocabulary
    logits, tgt = f32(N, V), rng.integers(0, V, N)
    fns = {"npflux": lambda logits=logits, tgt=tgt: ops.cross_entropy_backward(1.0, ops.cross_entropy_forward(logits, tgt)[1])}
    if torch is not None:
        tl, tt = tleaf(logits), torch.tensor(tgt)
        fns["torch"] = torch_fb(lambda: torch.nn.functional.cross_entropy(tl, tt), (tl,), None)
    cases["cross_entropy"] = (f"({N},{V})", fns)
    return cases


def bench_ops(presets=("shakespeare-s1", "shakespeare-s2", "shakespeare-n"), reps=20, warmup=3, use_torch=True,
              log=print):
    rows = []
    for preset in presets:
        s = op_shapes(preset)
        for op, (shape, fns) in _op_cases(s, use_torch).items():
            res = time_alternating(fns, reps=reps, warmup=warmup)
            row = {"preset": preset, "op": op, "shape": shape, "times": res}
            for k, v in res.items():
                row[f"{k}_us"] = v["median_s"] * 1e6
            if "torch" in res:
                row["ratio"] = _ratio(res["npflux"]["median_s"], res["torch"]["median_s"])
            if "torch_sdpa" in res:
                row["ratio_sdpa"] = _ratio(res["npflux"]["median_s"], res["torch_sdpa"]["median_s"])
            rows.append(row)
            if log:
                log(f"  {preset} {op}: " + ", ".join(f"{k} {v['median_s'] * 1e6:.0f} us" for k, v in res.items()))
    return {"rows": rows}


OPS_COLUMNS = [("preset", "preset", "{}"), ("op", "op (fwd+bwd)", "{}"), ("shape", "shape", "{}"),
               ("npflux_us", "npflux us", "{:,.0f}"), ("torch_us", "torch us", "{:,.0f}"),
               ("torch_sdpa_us", "torch SDPA us", "{:,.0f}"), ("ratio", "np/torch", "{:.2f}"),
               ("ratio_sdpa", "np/SDPA", "{:.2f}")]


# ---------------------------------------------------------------------------
# scaling: step time against sequence length and width
# ---------------------------------------------------------------------------


def scaling_configs(quick=False):
    """(sweep, value, GPTConfig, B, T) for the two sweeps.

    Sequence length: shakespeare-s2's architecture (6 layers, 6 heads, C 192),
    batch 4, T = 32 ... 512 (block_size = T). Width: 4 layers, 4 heads,
    batch 8, T 64, C = 64 ... 512.
    """
    seqs = (32, 128) if quick else (32, 64, 128, 256, 512)
    widths = (64, 192) if quick else (64, 128, 192, 256, 384, 512)
    out = []
    for T in seqs:
        out.append(("seq_len", T, GPTConfig.from_preset("shakespeare-s2", block_size=T), 4, T))
    for C in widths:
        out.append(("width", C, GPTConfig.from_preset("shakespeare-s1", n_embd=C, n_head=4, block_size=64), 8, 64))
    return out


def bench_scaling(quick=False, reps=5, warmup=1, use_torch=True, peak=None, log=print):
    if peak is None:
        peak = sgemm_gflops(reps=max(3, reps))
    rows = []
    for sweep, value, cfg, B, T in scaling_configs(quick):
        cands = candidates(cfg, B, T, use_torch)
        res = time_alternating({k: v[0] for k, v in cands.items()}, reps=reps, warmup=warmup)
        fl = train_step_flops(cfg, B, T)["total"]
        row = {"sweep": sweep, "value": value, "B": B, "T": T, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
               "flops": fl, "times": res}
        _add_timing_columns(row, res, fl, peak)
        rows.append(row)
        if log:
            log(f"  {sweep}={value}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in res.items()))
    return {"peak_gflops": peak, "rows": rows}


SCALING_COLUMNS = [("sweep", "sweep", "{}"), ("value", "value", "{}"), ("B", "B", "{}"), ("T", "T", "{}"),
                   ("n_embd", "C", "{}"), ("npflux_ms", "npflux ms", "{:.1f}"),
                   ("torch_published_ms", "torch-pub ms", "{:.1f}"), ("torch_modern_ms", "torch-mod ms", "{:.1f}"),
                   ("ratio_published", "np/pub", "{:.2f}"), ("ratio_modern", "np/mod", "{:.2f}"),
                   ("npflux_mfu", "npflux MFU", "{:.1%}")]


def plot_scaling(rows, path):
    """Two panels (ms per step against T and against C), one line per framework; PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, label in ((axes[0], "seq_len", "sequence length T (s2 architecture, B=4)"),
                             (axes[1], "width", "width C (4 layers, 4 heads, B=8, T=64)")):
        rs = [r for r in rows if r["sweep"] == sweep]
        for name, style in (("npflux", "o-"), ("torch_published", "s--"), ("torch_modern", "^--")):
            pts = [(r["value"], r[f"{name}_ms"]) for r in rs if f"{name}_ms" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=name.replace("_", "-"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("training step, median ms")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("npflux vs PyTorch: training-step time (float32, CPU)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# peak memory of a training step (a fresh subprocess per framework)
# ---------------------------------------------------------------------------


def _maxrss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2 ** 20  # KiB on Linux, bytes on macOS


def _proc_status_mb(field):
    """VmRSS / VmHWM of this process from /proc (Linux), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); True if it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_child(framework, preset, steps, threads):
    """Runs in the child: warm up, build, take the baseline, run ``steps`` steps, read the peak.

    On Linux the baseline is the current RSS and the peak-RSS mark is reset
    there (``/proc/self/clear_refs``), so the peak read afterwards (VmHWM)
    belongs to the steps alone. ``ru_maxrss`` is not usable for this in a
    child: Linux carries the parent's high-water mark across fork and exec,
    so a child of a process holding torch starts with the parent's peak. It
    is still reported (``ru_maxrss_mb``), and is the fallback elsewhere.
    """
    state = {}

    def _baseline():
        rss = _proc_status_mb("VmRSS")
        state["reset"] = rss is not None and _reset_peak_rss()
        return rss if state["reset"] else _maxrss_mb()

    cfg = GPTConfig.from_preset(preset)
    B, T = TRAIN_SHAPES[preset]

    def make_step(cfg, B, T):
        x, y = random_batch(cfg, B, T)
        model = GPT(cfg, seed=0)
        if framework == "npflux":
            opt = [None]

            def step():  # the library's step, as `npflux train` runs it (its batch split over threads where it pays)
                if opt[0] is None:
                    opt[0] = optim.AdamW(model.params, lr=1e-3)
                train_step(model, opt[0], [(x, y)])
            return step
        torch, tm = load_torch(threads)
        tmodel = tm.build(cfg, framework.split("_", 1)[1], model).train()
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        topt = [None]

        def step():
            if topt[0] is None:
                topt[0] = torch.optim.AdamW(tmodel.parameters(), lr=1e-3)
            topt[0].zero_grad(set_to_none=True)
            _, loss = tmodel(tx, ty)
            loss.backward()
            topt[0].step()
        return step

    # Warm the library up on a tiny model of the same kind (lazily loaded code, thread pools),
    # so the number below is the step's memory, not the library's first use.
    tiny = make_step(GPTConfig.from_preset(preset, n_layer=1, n_embd=cfg.n_head * 4, block_size=8), 2, 8)
    tiny()
    tiny()
    del tiny
    gc.collect()
    step = make_step(cfg, B, T)  # model, its weights and the batch; the optimizer comes with the first step
    base = _baseline()
    for _ in range(steps):
        step()
    peak = _proc_status_mb("VmHWM") if state["reset"] else _maxrss_mb()
    return {"framework": framework, "preset": preset, "B": B, "T": T, "steps": steps,
            "method": "VmRSS, clear_refs, VmHWM" if state["reset"] else "ru_maxrss",
            "baseline_mb": base, "peak_mb": peak, "step_mb": peak - base, "ru_maxrss_mb": _maxrss_mb()}


def bench_memory(presets=("shakespeare-s1", "shakespeare-s2", "shakespeare-n"), steps=3, threads=None,
                 use_torch=True, log=print):
    """Peak RSS of training steps, each framework in a fresh subprocess.

    The child imports NumPy (and torch when it measures torch; torch's import
    cost is therefore in its baseline, not in its number), runs two training
    steps of a tiny one-layer model of the same framework (so code loaded on
    first use and thread pools are in the baseline too), builds the model
    and a batch, takes the baseline (current RSS, with the kernel's peak-RSS
    mark reset to it), builds the optimizer, runs ``steps`` training steps
    and reads the peak RSS. The number reported is the difference: the
    optimizer state plus the activations, gradients and temporaries of a step
    at their highest. See ``_memory_child`` for why this reads /proc rather
    than ``ru_maxrss`` on Linux (it falls back to ``ru_maxrss`` elsewhere).
    The absolute figures are in the JSON too.
    """
    frameworks = ["npflux"]
    torch, _ = load_torch()
    if use_torch and torch is not None:
        frameworks += [f"torch_{s}" for s in STYLES]
    rows = []
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in THREAD_ENV})
    for preset in presets:
        row = {"preset": preset, "B": TRAIN_SHAPES[preset][0], "T": TRAIN_SHAPES[preset][1]}
        for fw in frameworks:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", fw, preset, str(steps), str(threads or 0)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
            if out.returncode != 0:
                raise RuntimeError(f"memory child {fw} {preset} failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            row[f"{fw}_mb"] = res["step_mb"]
            row[f"{fw}_baseline_mb"] = res["baseline_mb"]
            row[f"{fw}_peak_mb"] = res["peak_mb"]
        rows.append(row)
        if log:
            log(f"  memory {preset}: " + ", ".join(f"{fw} +{row[f'{fw}_mb']:.1f} MB" for fw in frameworks))
    return {"steps": steps, "rows": rows}


MEMORY_COLUMNS = [("preset", "preset", "{}"), ("B", "B", "{}"), ("T", "T", "{}"),
                  ("npflux_mb", "npflux +MB", "{:.1f}"), ("torch_published_mb", "torch-pub +MB", "{:.1f}"),
                  ("torch_modern_mb", "torch-mod +MB", "{:.1f}"), ("npflux_peak_mb", "npflux peak MB", "{:.0f}"),
                  ("torch_modern_peak_mb", "torch-mod peak MB", "{:.0f}")]


# ---------------------------------------------------------------------------
# scatter-add (the embedding backward)
# ---------------------------------------------------------------------------


def scatter_add_methods():
    """name -> fn(out, ids, rows) for the ways of out[ids] += rows with repeats."""

    def add_at(out, ids, rows):
        np.add.at(out, ids, rows)

    def one_hot(out, ids, rows):
        oh = np.zeros((ids.size, out.shape[0]), dtype=rows.dtype)
        oh[np.arange(ids.size), ids] = 1
        out += oh.T @ rows

    def reduceat(out, ids, rows):
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        out[s[starts]] += np.add.reduceat(rows[order], starts, axis=0)

    def bincount(out, ids, rows):
        V, C = out.shape
        flat = (ids[:, None] * C + np.arange(C)).ravel()
        out += np.bincount(flat, weights=rows.ravel(), minlength=V * C).reshape(V, C).astype(out.dtype)

    return {"add_at": add_at, "one_hot_matmul": one_hot, "sorted_reduceat": reduceat,
            "flat_bincount": bincount, "scatter_add_rows": scatter_add_rows}


def bench_scatter_add(cases=None, reps=20, warmup=2, use_torch=True, one_hot_limit_mb=256, log=print):
    """Each method at (N ids, V rows, C columns); torch's index_add_ as a reference."""
    cases = cases or [(512, 65, 64), (16384, 65, 384), (512, 10000, 64), (16384, 10000, 384)]
    torch, _ = load_torch() if use_torch else (None, None)
    rows = []
    for N, V, C in cases:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, V, N)
        upd = rng.standard_normal((N, C), dtype=np.float32)
        out = np.zeros((V, C), dtype=np.float32)
        ref = np.zeros((V, C), dtype=np.float64)
        np.add.at(ref, ids, upd.astype(np.float64))
        fns, skipped = {}, []
        for name, fn in scatter_add_methods().items():
            if name == "one_hot_matmul" and N * V * 4 / 2 ** 20 > one_hot_limit_mb:
                skipped.append(name)
                continue
            check = np.zeros((V, C), dtype=np.float32)
            fn(check, ids, upd)
            if not np.allclose(check, ref, atol=1e-3):
                raise AssertionError(f"scatter-add method {name} is wrong at N={N}, V={V}")
            fns[name] = lambda fn=fn: fn(out, ids, upd)
        if torch is not None:
            tout, tids, tupd = torch.zeros(V, C), torch.from_numpy(ids), torch.from_numpy(upd)
            fns["torch_index_add"] = lambda: tout.index_add_(0, tids, tupd)
        res = time_alternating(fns, reps=reps, warmup=warmup)
        row = {"N": N, "V": V, "C": C, "skipped": skipped, "times": res}
        for k, v in res.items():
            row[f"{k}_us"] = v["median_s"] * 1e6
        rows.append(row)
        if log:
            log(f"  scatter N={N} V={V}: " + ", ".join(f"{k} {v['median_s'] * 1e6:.0f} us" for k, v in res.items()))
    return {"rows": rows}


SCATTER_COLUMNS = [("N", "ids N", "{}"), ("V", "rows V", "{}"), ("C", "C", "{}"), ("add_at_us", "np.add.at us", "{:,.0f}"),
                   ("one_hot_matmul_us", "one-hot us", "{:,.0f}"), ("sorted_reduceat_us", "reduceat us", "{:,.0f}"),
                   ("flat_bincount_us", "bincount us", "{:,.0f}"),
                   ("scatter_add_rows_us", "scatter_add_rows us", "{:,.0f}"),
                   ("torch_index_add_us", "torch index_add_ us", "{:,.0f}")]


# ---------------------------------------------------------------------------
# tables and JSON
# ---------------------------------------------------------------------------


def format_table(rows, columns):
    """A plain-text table; columns are (key, header, format); missing values print as '-'."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(name, payload, results_dir=None):
    d = Path(results_dir) if results_dir else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------
# the short version: ``npflux bench``
# ---------------------------------------------------------------------------


def run_quick(threads=None, reps=5, use_torch=True, json_path=None, log=print):
    """Training step (s1, s2) and generation (64, 256 tokens), npflux vs torch, a short run."""
    threads = int(threads or os.cpu_count() or 1)
    load_torch(threads)
    info = machine_info(threads)
    log(f"npflux bench: {info['cpu']}, {threads} threads, numpy {info['numpy']}, torch {info['torch']}")
    peak = sgemm_gflops(reps=3)
    log(f"float32 matmul 1024^2: numpy {peak['numpy']:.1f} GFLOP/s"
        + (f", torch {peak['torch']:.1f} GFLOP/s" if "torch" in peak else ""))
    train = bench_train_step(("shakespeare-s1", "shakespeare-s2"), reps=reps, warmup=2, use_torch=use_torch,
                             peak=peak, log=None)
    log("\ntraining step and forward (median; ratio = npflux / torch, > 1 means npflux is slower)")
    log(format_table(train["rows"], TRAIN_COLUMNS))
    gen = bench_generate((64, 256), reps=max(2, reps // 2), warmup=1, use_torch=use_torch, log=None)
    log(f"\ngeneration (batch 1, shakespeare-s1 architecture, block_size {gen['config']['block_size']})")
    log(format_table(gen["rows"], GEN_COLUMNS))
    payload = {"benchmark": "quick", "machine": info, "peak_gflops": peak, "train_step": train, "generate": gen}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
        log(f"\nwrote {json_path}")
    return payload


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--memory-child":
        fw, preset, steps, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_memory_child(fw, preset, steps, threads or None)))
    else:
        run_quick()

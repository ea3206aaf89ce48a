"""nanoGPT's own CPU recipe, trained by npflux and by a PyTorch reference, each in its own process.

    python benchmarks/nanogpt_cpu.py [--data PATH] [--max-iters 2000] [--threads N] [--rounds 1]

nanoGPT's README trains a "baby GPT" on a CPU with

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

("about ~3 minutes ... a loss of only 1.88"). Here:

- npflux trains it as a user would: ``npflux train --preset nanogpt-cpu`` (the preset holds exactly
  those settings: GELU, no biases, tied head, GPT-2 init with scaled residual projections, AdamW
  with weight decay 0.1 on matrices, beta2 0.99, warmup 100, cosine to 1e-4, clip 1.0, evaluation
  every 250 steps on 20 batches), timed as the whole command's wall clock;
- the PyTorch reference (benchmarks/torch_models.py, "modern" style: nanoGPT's layout with fused
  q/k/v and scaled_dot_product_attention; eager, as that command runs) trains the same model from
  the same initial weights with the same recipe in this script's ``--torch-child`` mode, also
  timed as a whole process, with ``torch.set_num_threads(N)`` and PyTorch's defaults otherwise.

Both final models are then scored on the same 400 fixed windows of the validation split (the last
10% of the text, as nanoGPT's prepare.py splits it). Results: benchmarks/results/nanogpt_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

PRESET = "nanogpt-cpu"
EVAL_WINDOWS, EVAL_SEED = 400, 4321


def corpus_path(arg=None) -> Path:
    from npflux.data import find_corpus

    if arg:
        return Path(arg)
    if not os.environ.get("NPFLUX_DATA_DIR"):
        shared = harness.REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
        if shared.is_file():
            return shared
    return find_corpus()


def data(path):
    from npflux.data import load_text, prepare_dataset

    return prepare_dataset(load_text(path), "char", val_fraction=0.1)


def fixed_windows(val_ids, block, n=EVAL_WINDOWS, seed=EVAL_SEED):
    starts = np.random.default_rng(seed).integers(0, len(val_ids) - block - 1, n)
    x = np.stack([val_ids[s: s + block] for s in starts]).astype(np.int64)
    y = np.stack([val_ids[s + 1: s + block + 1] for s in starts]).astype(np.int64)
    return x, y


def npflux_val_loss(ckpt_dir, val_ids):
    from npflux.train import model_from_checkpoint

    model, _, _ = model_from_checkpoint(ckpt_dir)
    model.eval()
    x, y = fixed_windows(val_ids, model.config.block_size)
    losses = [float(model.forward(x[i: i + 50], y[i: i + 50])[1]) for i in range(0, len(x), 50)]
    return float(np.mean(losses))


def torch_child(args):
    """Train the PyTorch reference with nanoGPT's loop; print JSON (wall time, losses)."""
    t0 = time.perf_counter()
    import torch
    import torch_models
    from npflux.models import GPT, GPTConfig
    from npflux.train import TRAIN_PRESETS, TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    _, train_ids, val_ids = data(args.data)
    cfg = GPTConfig.from_preset(PRESET)
    tc = TrainConfig(**{**TRAIN_PRESETS[PRESET], "max_iters": args.max_iters})
    torch.manual_seed(tc.seed)
    model = torch_models.build(cfg, "modern", GPT(cfg, seed=tc.seed))  # npflux's initial weights
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.learning_rate, betas=(tc.beta1, tc.beta2))
    B, T = tc.batch_size, cfg.block_size
    rng = np.random.default_rng(tc.seed)
    train_t, val_t = torch.from_numpy(train_ids.astype(np.int64)), torch.from_numpy(val_ids.astype(np.int64))

    def batch(src):
        ix = rng.integers(0, len(src) - T - 1, B)
        return (torch.stack([src[i: i + T] for i in ix]), torch.stack([src[i + 1: i + T + 1] for i in ix]))

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {}
        for name, src in (("train", train_t), ("val", val_t)):
            out[name] = float(np.mean([model(*batch(src))[1].item() for _ in range(tc.eval_iters)]))
        model.train()
        return out

    history = []
    model.train()
    for it in range(tc.max_iters):
        if it % tc.eval_interval == 0:
            history.append({"step": it, **estimate()})
        for g in opt.param_groups:
            g["lr"] = tc.lr_at(it)
        x, y = batch(train_t)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
    history.append({"step": tc.max_iters, **estimate()})
    wall = time.perf_counter() - t0
    model.eval()
    x, y = fixed_windows(val_ids, T)
    with torch.no_grad():
        fixed = float(np.mean([model(torch.from_numpy(x[i: i + 50]), torch.from_numpy(y[i: i + 50]))[1].item()
                               for i in range(0, len(x), 50)]))
    print(json.dumps({"wall_s": wall, "history": history, "val_loss_fixed": fixed,
                      "torch_threads": torch.get_num_threads(), "torch": torch.__version__}))


def run_npflux(args, out_dir):
    cmd = [sys.executable, "-m", "npflux.cli", "train", "--preset", PRESET, "--data", str(args.data),
           "--out-dir", str(out_dir), "--max-iters", str(args.max_iters), "--quiet", "--sample-tokens", "0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(harness.REPO), os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["NPFLUX_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"npflux train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    history = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "history": history, "command": " ".join(cmd[1:])}


def run_torch(args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-child", "--data", str(args.data),
           "--max-iters", str(args.max_iters)] + (["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(harness.REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torch reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--threads", type=int, help="threads for each library (default: each library's default)")
    p.add_argument("--rounds", type=int, default=1, help="pairs of runs (npflux, torch), alternating")
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    args.data = corpus_path(args.data)
    if args.torch_child:
        return torch_child(args)
    info = harness.machine()
    print(f"nanoGPT CPU recipe, {args.max_iters} iterations, on {info['cpu']} ({info['cpus_usable']} usable CPUs), "
          f"load average {info['load_average']}")
    _, _, val_ids = data(args.data)
    runs = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            n = run_npflux(args, tmp)
            n["val_loss_fixed"] = npflux_val_loss(Path(tmp) / "ckpt", val_ids)
        print(f"  round {r + 1}: npflux {n['wall_s']:.1f} s, val {n['history'][-1]['val_loss']:.4f} "
              f"(fixed windows {n['val_loss_fixed']:.4f})")
        t = run_torch(args)
        print(f"  round {r + 1}: torch  {t['wall_s']:.1f} s, val {t['history'][-1]['val']:.4f} "
              f"(fixed windows {t['val_loss_fixed']:.4f})")
        runs.append({"npflux": n, "torch": t})
    med = lambda xs: float(np.median(xs))  # noqa: E731
    summary = {"npflux_wall_s": med([r["npflux"]["wall_s"] for r in runs]),
               "torch_wall_s": med([r["torch"]["wall_s"] for r in runs]),
               "npflux_val_fixed": med([r["npflux"]["val_loss_fixed"] for r in runs]),
               "torch_val_fixed": med([r["torch"]["val_loss_fixed"] for r in runs])}
    summary["wall_ratio"] = summary["npflux_wall_s"] / summary["torch_wall_s"]
    info["load_average_after"] = harness.machine()["load_average"]
    print(f"\nnpflux {summary['npflux_wall_s']:.1f} s, val {summary['npflux_val_fixed']:.4f}; "
          f"torch {summary['torch_wall_s']:.1f} s, val {summary['torch_val_fixed']:.4f}; "
          f"wall ratio {summary['wall_ratio']:.2f}")
    path = harness.write("nanogpt_cpu", {"benchmark": "nanogpt_cpu", "machine": info, "settings": {
        k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

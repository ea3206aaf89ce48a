"""Train a char-level GPT on Tiny Shakespeare with npflux AND with the PyTorch reference, in one run.

    python benchmarks/train_shakespeare.py [--preset shakespeare-s1|shakespeare-s2] [--iters 5000]
        [--recipe published|best] [--lr LR] [--warmup-iters N] [--min-lr LR] [--weight-decay WD]
        [--beta2 B2] [--grad-clip C] [--init normal|torch] [--dropout P] [--eval-interval N]
        [--eval-iters-interval 20] [--data PATH] [--threads N] [--no-torch] [--seed 1337]

Both sides see the same thing: the same initial weights (npflux's, copied
into the published-style torch model of benchmarks/torch_models.py), the same
sequence of batches (get_batch with the same seeded generator), the same
AdamW hyperparameters and schedule. Each reports the final train and val
loss, each the mean over 200 batches drawn from a fixed seed (the same
batches for both), and its training wall time. Evaluation happens only at the
end (and, with --eval-interval, every N steps on a few batches, excluded
from the timing), so the times are training alone.

Both recipes start from the preset's initialisation: for s1 and s2 that is
PyTorch's layer defaults (GPTConfig.init="torch"), as the published small
gpt.py trains (it has no _init_weights); --init normal gives GPT-2's
N(0, 0.02) instead (measured: s2 published recipe val 1.7743 with it,
1.6763 with torch's defaults).

Recipes (--recipe):
- published: the published gpt.py: constant lr 1e-3, AdamW with torch's
  defaults (betas 0.9/0.999, weight decay 0.01 on every parameter).
- best: linear warmup (100 steps) then cosine decay to lr/10, weight decay
  0.1 on matrices only (nanoGPT's grouping), beta2 0.99, gradient clipping
  at 1.0, peak lr 2e-3. Every knob has a flag so it can be tuned
  (--no-scaled-init matters only with --init normal).

Writes benchmarks/results/train_<preset>_<recipe>.json.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse
import json
import time

import numpy as np

import benchlib as bench
from npflux.data import find_corpus, get_batch, load_text, prepare_char_dataset
from npflux.models import GPT, GPTConfig
from npflux.train import TrainConfig, estimate_loss, make_optimizer
from npflux.training import train_step

RECIPES = {
    "published": dict(learning_rate=1e-3, lr_schedule="constant", weight_decay=0.01, decay_matrices_only=False,
                      beta2=0.999, grad_clip=0.0, scaled_proj_init=False, warmup_iters=0),
    "best": dict(learning_rate=2e-3, lr_schedule="cosine", weight_decay=0.1, decay_matrices_only=True,
                 beta2=0.99, grad_clip=1.0, scaled_proj_init=True, warmup_iters=100),  # scaled: with --init normal
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shakespeare-s1", choices=["shakespeare-s1", "shakespeare-s2"])
    p.add_argument("--recipe", default="published", choices=sorted(RECIPES))
    p.add_argument("--iters", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (published 1e-3, best 2e-3)")
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--min-lr", type=float, help="cosine floor (default lr/10)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--beta2", type=float)
    p.add_argument("--grad-clip", type=float, help="0 disables")
    p.add_argument("--init", choices=["normal", "torch"], help="weight init (GPTConfig.init; default: the preset's)")
    p.add_argument("--dropout", type=float, help="model dropout (default: the preset's)")
    p.add_argument("--no-scaled-init", dest="scaled_proj_init", action="store_false", default=None)
    p.add_argument("--eval-iters", type=int, default=200, help="batches per final evaluation")
    p.add_argument("--eval-interval", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-iters-interval", type=int, default=20, help="batches per intermediate evaluation")
    p.add_argument("--eval-seed", type=int, default=12345)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", help="corpus file (default: $NPFLUX_DATA_DIR/tinyshakespeare.txt)")
    p.add_argument("--threads", type=int, default=_env.THREADS)
    p.add_argument("--torch", dest="torch", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the PyTorch published-style reference (default on)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train_<preset>_<recipe>.json)")
    return p.parse_args()


def settings_from(args):
    r = dict(RECIPES[args.recipe])
    for flag, key in (("lr", "learning_rate"), ("warmup_iters", "warmup_iters"), ("weight_decay", "weight_decay"),
                      ("beta2", "beta2"), ("grad_clip", "grad_clip"), ("scaled_proj_init", "scaled_proj_init")):
        if getattr(args, flag) is not None:
            r[key] = getattr(args, flag)
    r["min_lr"] = args.min_lr
    r["warmup_iters"] = min(r["warmup_iters"], args.iters)  # a short (smoke) run cannot warm up longer than it lasts
    return r


def train_npflux(mcfg, tcfg, train_ids, val_ids, args, log):
    model = GPT(mcfg, seed=tcfg.seed)
    init = {k: v.copy() for k, v in model.params.items()}
    opt = make_optimizer(model, tcfg)
    rng = np.random.default_rng(tcfg.seed)
    B, T = tcfg.batch_size, args.block_size
    history, train_time = [], 0.0
    model.train()
    for step in range(tcfg.max_iters):
        if args.eval_interval and step % args.eval_interval == 0 and step:
            history.append(_eval_np(model, train_ids, val_ids, args, step, args.eval_iters_interval, log))
            model.train()
        t0 = time.perf_counter()
        opt.lr = tcfg.lr_at(step)
        train_step(model, opt, [get_batch(train_ids, B, T, rng)], grad_clip=tcfg.grad_clip)  # the library's step
        train_time += time.perf_counter() - t0
    final = _eval_np(model, train_ids, val_ids, args, tcfg.max_iters, args.eval_iters, None)
    return {"train_loss": final["train_loss"], "val_loss": final["val_loss"], "train_time_s": train_time,
            "history": history}, init


def _eval_np(model, train_ids, val_ids, args, step, n, log):
    tl = estimate_loss(model, train_ids, n, args.batch_size, args.block_size, args.eval_seed)
    vl = estimate_loss(model, val_ids, n, args.batch_size, args.block_size, args.eval_seed + 1)
    if log:
        log(f"  npflux step {step}: train {tl:.4f}, val {vl:.4f} ({n} batches)")
    return {"step": step, "train_loss": tl, "val_loss": vl}


def train_torch(mcfg, tcfg, init_model, train_ids, val_ids, args, log):
    torch, tm = bench.load_torch(args.threads)
    torch.manual_seed(tcfg.seed)
    model = tm.build(mcfg, "published", init_model)
    params = dict(model.named_parameters())
    if tcfg.decay_matrices_only:
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(params.values()), "weight_decay": tcfg.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(tcfg.beta1, tcfg.beta2))
    rng = np.random.default_rng(tcfg.seed)  # the same batch sequence as npflux
    B, T = tcfg.batch_size, args.block_size
    history, train_time = [], 0.0
    model.train()
    for step in range(tcfg.max_iters):
        if args.eval_interval and step % args.eval_interval == 0 and step:
            history.append(_eval_torch(torch, model, train_ids, val_ids, args, step, args.eval_iters_interval, log))
            model.train()
        t0 = time.perf_counter()
        lr = tcfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(train_ids, B, T, rng)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        train_time += time.perf_counter() - t0
    final = _eval_torch(torch, model, train_ids, val_ids, args, tcfg.max_iters, args.eval_iters, None)
    return {"train_loss": final["train_loss"], "val_loss": final["val_loss"], "train_time_s": train_time,
            "history": history}


def _eval_torch(torch, model, train_ids, val_ids, args, step, n, log):
    model.eval()
    out = {"step": step}
    with torch.no_grad():
        for split, data, seed in (("train", train_ids, args.eval_seed), ("val", val_ids, args.eval_seed + 1)):
            rng = np.random.default_rng(seed)  # the same batches estimate_loss draws
            total = 0.0
            for _ in range(n):
                x, y = get_batch(data, args.batch_size, args.block_size, rng)
                total += float(model(torch.from_numpy(x), torch.from_numpy(y))[1])
            out[f"{split}_loss"] = total / n
    if log:
        log(f"  torch  step {step}: train {out['train_loss']:.4f}, val {out['val_loss']:.4f} ({n} batches)")
    return out


def _min_lr(tcfg):
    if tcfg.lr_schedule != "cosine":
        return "-"
    return tcfg.learning_rate / 10 if tcfg.min_lr is None else tcfg.min_lr


def main():
    args = parse_args()
    bench.load_torch(args.threads)
    info = bench.machine_info(args.threads)
    path = find_corpus(path=args.data)
    tok, train_ids, val_ids = prepare_char_dataset(load_text(path))
    r = settings_from(args)
    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    if args.init is not None:
        overrides["init"] = args.init
    mcfg = GPTConfig.from_preset(args.preset, vocab_size=tok.vocab_size, block_size=args.block_size,
                                 scaled_proj_init=r.pop("scaled_proj_init"), **overrides)
    tcfg = TrainConfig(batch_size=args.batch_size, block_size=args.block_size, max_iters=args.iters,
                       eval_iters=args.eval_iters, seed=args.seed, progress=False, **r)
    name = f"train_{args.preset}_{args.recipe}"
    print(f"{name}: {info['cpu']}, {args.threads} threads; data {path}; {args.iters} iters, "
          f"batch {args.batch_size} x {args.block_size}")
    print(f"  model {mcfg}")
    print(f"  recipe {args.recipe}: lr {tcfg.learning_rate} ({tcfg.lr_schedule}, warmup {tcfg.warmup_iters}, "
          f"min_lr {_min_lr(tcfg)}), "
          f"wd {tcfg.weight_decay} ({'matrices only' if tcfg.decay_matrices_only else 'all'}), "
          f"betas ({tcfg.beta1}, {tcfg.beta2}), clip {tcfg.grad_clip or 'off'}, init {mcfg.init}"
          + (f", scaled proj init {mcfg.scaled_proj_init}" if mcfg.init == "normal" else ""))

    results = {}
    res, init = train_npflux(mcfg, tcfg, train_ids, val_ids, args, print)
    results["npflux"] = res
    print(f"  npflux done: {res['train_time_s']:.1f} s")
    torch, _ = bench.load_torch()
    if args.torch and torch is not None:
        init_model = GPT(mcfg, seed=tcfg.seed)
        init_model.load_state_dict(init)
        results["torch_published"] = train_torch(mcfg, tcfg, init_model, train_ids, val_ids, args, print)
        print(f"  torch done: {results['torch_published']['train_time_s']:.1f} s")

    rows = [{"framework": k, "train_loss": v["train_loss"], "val_loss": v["val_loss"], "time_s": v["train_time_s"],
             "ms_per_step": v["train_time_s"] / max(args.iters, 1) * 1e3} for k, v in results.items()]
    print(f"\nfinal losses (mean of {args.eval_iters} fixed batches each) and training wall time")
    print(bench.format_table(rows, [("framework", "framework", "{}"), ("train_loss", "train loss", "{:.4f}"),
                                    ("val_loss", "val loss", "{:.4f}"), ("time_s", "train time s", "{:.1f}"),
                                    ("ms_per_step", "ms/step", "{:.2f}")]))
    payload = {"benchmark": name, "machine": info, "settings": vars(args), "model": mcfg.to_dict(),
               "train": {k: getattr(tcfg, k) for k in ("batch_size", "block_size", "max_iters", "learning_rate",
                                                         "lr_schedule", "warmup_iters", "min_lr", "weight_decay",
                                                         "decay_matrices_only", "beta1", "beta2", "grad_clip", "seed")},
               "data": str(path), "results": results, "rows": rows}
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2, default=bench._jsonable) + "\n")
        print(f"\nwrote {args.out}")
    else:
        print(f"\nwrote {bench.write_json(name, payload)}")


if __name__ == "__main__":
    main()

"""int8 quantization (size, val loss, perplexity) and LoRA / QLoRA fine-tuning of trained models (char or BPE).

    python benchmarks/finetune_quant.py --checkpoint s1=/path/s1/ckpt --checkpoint s2=/path/s2/ckpt \
        --finetune-base s2 [--max-iters 300] [--threads 1] [--no-torch]

Quantization: every checkpoint, per output channel and per group (--group-sizes),
is scored on the Tiny Shakespeare validation text (its last 10%, every token
once: ``npflux.finetune.windows_loss``), float32 and int8 in the same run, with
the eval time of both (medians of --reps passes over the first 64 windows; a
ratio, not a speed claim). Size counts every array the model keeps.

Fine-tuning: LoRA on each --lora set ("TARGETS@RANK", targets comma-separated;
"attn.c_attn[q,v]" is only the q and v blocks of the fused projection) of the --finetune-base model,
trained on the NeuraFlux corpus (characters outside Tiny Shakespeare's
vocabulary dropped; every 10th line held out), over the float32 base and over
its int8 per-channel copy (QLoRA-style). Loss on the held-out lines before and
after, trainable fraction, training time; and the median time of one training
step, full fine-tuning against LoRA and QLoRA, in the same run.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse
import math
import statistics
import time

from npflux.data import find_corpus, load_text
from npflux.finetune import (
    FinetuneConfig, checkpoint_doc_sep, encode_for, finetune, model_size, quantize_model, split_text, windows_loss,
)
from npflux.train import model_from_checkpoint
from npflux.training import train_step


def eval_seconds(model, ids, reps):
    probe = ids[: 64 * model.config.block_size + 1]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        windows_loss(model, probe)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantization_rows(name, ckpt, val_ids, group_sizes, reps):
    model, _, _ = model_from_checkpoint(ckpt)
    size = model_size(model)
    loss = windows_loss(model, val_ids)
    t_float = eval_seconds(model, val_ids, reps)
    rows = []
    for group in [None, *group_sizes]:
        q, _, _ = model_from_checkpoint(ckpt)
        paths = quantize_model(q, group_size=group)
        qsize = model_size(q)
        qloss = windows_loss(q, val_ids)
        t_int8 = eval_seconds(q, val_ids, reps)
        row = {"model": name, "scheme": "per-channel" if group is None else f"group {group}", "layers": len(paths),
               "mb_float32": size["mb"], "mb_int8": qsize["mb"], "compression": size["total"] / qsize["total"],
               "int8_bytes": qsize["int8"], "scale_bytes": qsize["scales"], "float_bytes": qsize["float"],
               "val_loss_float32": loss, "val_loss_int8": qloss, "val_loss_increase": qloss - loss,
               "ppl_float32": math.exp(loss), "ppl_int8": math.exp(qloss),
               "eval_s_float32": t_float, "eval_s_int8": t_int8, "eval_time_ratio": t_int8 / t_float}
        rows.append(row)
        print(f"{name:3s} {row['scheme']:12s} {row['mb_float32']:7.3f} MB -> {row['mb_int8']:6.3f} MB "
              f"({row['compression']:.2f}x)  val loss {loss:.5f} -> {qloss:.5f} ({qloss - loss:+.5f})  "
              f"ppl {row['ppl_float32']:.3f} -> {row['ppl_int8']:.3f}  eval time x{row['eval_time_ratio']:.2f}")
    return rows


def step_seconds(ckpt, mode, ids, args, reps):
    """Median seconds of one training step (forward, backward, AdamW) on batch 16 x block_size:
    ``full`` updates every parameter; ``lora`` / ``qlora`` only the adapters (float / int8 base)."""
    from npflux import optim
    from npflux.data import get_batch
    from npflux.nn.convert import apply_lora
    from npflux.nn.lora import lora_gradients, lora_parameters

    model, _, _ = model_from_checkpoint(ckpt)
    if mode == "qlora":
        quantize_model(model)
    if mode == "full":
        params, grads = model.params, model.grads
    else:
        targets, rank = lora_sets(args)[0]
        apply_lora(model, targets, rank=rank)
        params, grads = lora_parameters(model), lora_gradients(model)
    opt = optim.AdamW(params, lr=1e-4)
    rng = __import__("numpy").random.default_rng(0)
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        x, y = get_batch(ids, 16, model.config.block_size, rng)
        t0 = time.perf_counter()
        train_step(model, opt, [(x, y)], grads=grads)  # the library's step
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def lora_sets(args):
    """[(targets, rank)] from the --lora strings "attn.c_attn[q,v],mlp.c_fc@4"."""
    import re

    sets = []
    for spec in args.lora:
        targets, _, rank = spec.partition("@")
        sets.append((tuple(t for t in re.split(r",(?![^\[]*\])", targets) if t), int(rank or 8)))
    return sets


def finetune_rows(name, ckpt, corpus, args):
    rows = []
    for (targets, rank), base in [(lora, base) for lora in lora_sets(args) for base in ("float32", "int8")]:
        model, tok, saved = model_from_checkpoint(ckpt)
        if base == "int8":
            quantize_model(model)
        train_text, val_text = split_text(corpus, 0.1, "lines")
        doc_sep = checkpoint_doc_sep(saved)  # a BPE model's [BOS] doc [EOS] layout, as it was trained
        train_ids, _, dropped_train = encode_for(tok, train_text, unknown="drop", doc_sep=doc_sep)
        val_ids, _, dropped_val = encode_for(tok, val_text, unknown="drop", doc_sep=doc_sep)
        cfg = FinetuneConfig(rank=rank, alpha=2.0 * rank, targets=targets, max_iters=args.max_iters,
                             learning_rate=args.learning_rate, eval_interval=args.max_iters, seed=1337, progress=False)
        s = finetune(model, train_ids, val_ids, cfg)
        row = {"model": name, "base": base, "rank": rank, "targets": list(targets),
               "trainable_parameters": s["trainable_parameters"], "base_parameters": s["base_parameters"],
               "trainable_percent": 100 * s["trainable_fraction"], "steps": args.max_iters,
               "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
               "dropped_characters": dropped_train + dropped_val,
               "val_loss_before": s["val_loss_before"], "val_loss_after": s["val_loss_after"],
               "val_loss_change": s["val_loss_after"] - s["val_loss_before"],
               "train_loss_before": s["history"][0]["train_loss"], "train_loss_after": s["history"][-1]["train_loss"],
               "train_seconds": s["train_seconds"]}
        rows.append(row)
        print(f"{name} LoRA {','.join(targets)} @{rank} over {base}: val loss {row['val_loss_before']:.4f} -> {row['val_loss_after']:.4f} "
              f"({row['val_loss_change']:+.4f}), {row['trainable_percent']:.2f}% trainable, {row['train_seconds']:.1f} s")
    return rows


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--checkpoint", action="append", required=True, help="NAME=DIR of a trained model, char or BPE (repeatable)")
    p.add_argument("--group-sizes", type=int, nargs="*", default=[32], help="per-group variants (default 32)")
    p.add_argument("--finetune-base", help="NAME of the checkpoint to fine-tune (default: the last)")
    p.add_argument("--max-iters", type=int, default=300)
    p.add_argument("--lora", nargs="+", default=["attn.c_attn@8", "attn.c_attn[q,v]@8",
                                                  "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj@2"],
                   help="adapter sets TARGETS@RANK (the first is also timed per step)")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    _, write = _env.setup(args, "finetune_quant")
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    shakespeare = load_text(find_corpus())
    corpus = load_text(find_corpus("neuraflux_corpus.txt", verify=False))

    quant = []
    for name, ckpt in checkpoints.items():
        _, tok, saved = model_from_checkpoint(ckpt)
        val_ids, _, _ = encode_for(tok, split_text(shakespeare, 0.1, "tail")[1], doc_sep=checkpoint_doc_sep(saved))
        quant += quantization_rows(name, ckpt, val_ids, args.group_sizes, reps)
    name = args.finetune_base or list(checkpoints)[-1]
    tuned = finetune_rows(name, checkpoints[name], corpus, args)
    _, tok, saved = model_from_checkpoint(checkpoints[name])
    ids, _, _ = encode_for(tok, corpus, unknown="drop", doc_sep=checkpoint_doc_sep(saved))
    steps = {mode: step_seconds(checkpoints[name], mode, ids, args, 3 * reps) for mode in ("full", "lora", "qlora")}
    step_time = {"model": name, **{f"{m}_s": t for m, t in steps.items()},
                 **{f"{m}_over_full": steps[m] / steps["full"] for m in ("lora", "qlora")}}
    print(f"{name} training step (median of {3 * reps}): full {steps['full'] * 1e3:.1f} ms, "
          f"LoRA {steps['lora'] * 1e3:.1f} ms (x{step_time['lora_over_full']:.2f}), "
          f"QLoRA {steps['qlora'] * 1e3:.1f} ms (x{step_time['qlora_over_full']:.2f})")
    write({"checkpoints": checkpoints, "quantization": quant, "finetune": tuned, "step_time": step_time})


if __name__ == "__main__":
    main()

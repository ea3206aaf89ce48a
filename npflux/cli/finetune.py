"""``npflux finetune`` (LoRA adapters on a trained model) and ``npflux quantize`` (int8 checkpoint).

    npflux quantize out/ckpt [--out out/ckpt-int8] [--group-size 64] [--data input.txt]
    npflux finetune --checkpoint out/ckpt --data new.txt --lora-rank 8 [--out-dir out-lora]
    npflux sample --checkpoint out-lora/adapter          (base + adapter, loaded together)

A quantized checkpoint as ``--checkpoint`` of finetune gives QLoRA-style
fine-tuning: adapters in float over the frozen int8 base.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .common import add_backend_flag, add_overwrite_flag, finite_float, positive_float, positive_int, print_sample


def _quantize(args):
    from ..data import load_text
    from ..finetune import (
        checkpoint_doc_sep, encode_for, model_size, quantize_model, save_quantized, split_text, windows_loss,
    )
    from ..checkpoint.outdir import claim_output
    from ..train import model_from_checkpoint

    out = Path(args.out or str(Path(args.checkpoint).resolve()) + "-int8")
    claim = claim_output(out, kind="gpt-int8", overwrite=args.overwrite, inputs=[args.checkpoint], flag="--out",
                         can_resume=False)
    model, tokenizer, ckpt = model_from_checkpoint(args.checkpoint, backend=args.backend)
    if "quantization" in ckpt.config or "adapter" in ckpt.config:
        raise ValueError(f"{args.checkpoint} is already a quantized or adapter checkpoint; quantize the float model")
    val_ids = None
    if args.data:
        val_text = split_text(load_text(args.data), args.val_fraction, "tail")[1]
        val_ids, _, _ = encode_for(tokenizer, val_text, doc_sep=checkpoint_doc_sep(ckpt))
    before = model_size(model)
    loss_before = windows_loss(model, val_ids, progress="val loss, float") if val_ids is not None else None
    t0 = time.perf_counter()
    paths = quantize_model(model, group_size=args.group_size)
    seconds = time.perf_counter() - t0
    after = model_size(model)
    claim.begin()
    save_quantized(out, model, ckpt.config, tokenizer=ckpt.tokenizer,
                   extra={"source_checkpoint": str(Path(args.checkpoint).resolve())})
    claim.complete()
    result = {"checkpoint": str(args.checkpoint), "out": str(out), "group_size": args.group_size,
              "quantized_layers": len(paths), "quantize_seconds": seconds,
              "float_dtype": str(model.dtype), "size_mb_float": before["mb"], "size_mb_int8": after["mb"],
              "compression": before["total"] / after["total"], "bytes_int8": after}
    print(f"quantized {len(paths)} linear layers to int8 ({'per output channel' if args.group_size is None else f'groups of {args.group_size}'}); "
          f"embeddings, norms, biases and lm_head stay {model.dtype}")
    print(f"size: {before['mb']:.3f} MB -> {after['mb']:.3f} MB ({result['compression']:.2f}x smaller): "
          f"int8 {after['int8'] / 1e6:.3f} MB + scales {after['scales'] / 1e6:.3f} MB + float {after['float'] / 1e6:.3f} MB")
    if val_ids is not None:
        import math

        loss_after = windows_loss(model, val_ids, progress="val loss, int8")
        result.update({"val_tokens": int(len(val_ids)), "val_loss_float": loss_before, "val_loss_int8": loss_after,
                       "val_loss_increase": loss_after - loss_before, "perplexity_float": math.exp(loss_before),
                       "perplexity_int8": math.exp(loss_after)})
        print(f"val loss ({len(val_ids):,} tokens, the last {args.val_fraction:g} of {args.data}): "
              f"{loss_before:.5f} -> {loss_after:.5f} ({loss_after - loss_before:+.5f} nats); "
              f"perplexity {math.exp(loss_before):.3f} -> {math.exp(loss_after):.3f}")
    else:
        print("(pass --data FILE to measure the change in val loss and perplexity)")
    print(f"checkpoint: {out}   (npflux sample --checkpoint {out})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _finetune(args):
    from ..data import load_text
    from ..finetune import FinetuneConfig, checkpoint_doc_sep, encode_for, finetune, save_adapter, split_text
    from ..checkpoint.outdir import claim_output
    from ..train import model_from_checkpoint

    out = Path(args.out_dir)
    adapter_dir = out / "adapter"
    claim = claim_output(adapter_dir, kind="gpt-lora", overwrite=args.overwrite, inputs=[args.checkpoint],
                         companions=[out / "finetune.json"], can_resume=False)
    model, tokenizer, ckpt = model_from_checkpoint(args.checkpoint, backend=args.backend)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer; cannot encode {args.data}")
    if "adapter" in ckpt.config:
        raise ValueError(f"{args.checkpoint} is an adapter; fine-tune its base checkpoint "
                         f"({ckpt.config['adapter']['base_checkpoint']})")
    _, text, dropped = encode_for(tokenizer, load_text(args.data), unknown=args.unknown_chars)  # checks all of it
    train_text, val_text = split_text(text, args.val_fraction, args.val_split)
    doc_sep = checkpoint_doc_sep(ckpt)  # a BPE base saw [BOS] doc [EOS]: fine-tune on text laid out the same way
    train_ids, val_ids = (encode_for(tokenizer, t, doc_sep=doc_sep)[0] for t in (train_text, val_text))
    if dropped:
        print(f"dropped {dropped} character(s) of {args.data} that are not in the model's vocabulary")
    if min(len(train_ids), len(val_ids)) < 2:
        raise ValueError(f"{args.data} is too short to split into train and validation text")
    targets = tuple(t.strip() for t in re.split(r",(?![^\[]*\])", args.targets) if t.strip())  # not inside [q,v]
    cfg = FinetuneConfig(rank=args.lora_rank, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
                         targets=targets, max_iters=args.max_iters, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                         eval_interval=args.eval_interval, seed=args.seed, progress=not args.quiet)
    base_kind = "int8 (QLoRA-style)" if "quantization" in ckpt.config else str(model.dtype)
    print(f"data: {args.data} ({len(train_ids):,} train / {len(val_ids):,} val tokens, {args.val_split} split); base {base_kind}")
    summary = finetune(model, train_ids, val_ids, cfg)
    claim.begin()
    save_adapter(adapter_dir, model, args.checkpoint,
                 {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(targets), "seed": cfg.seed},
                 tokenizer=ckpt.tokenizer, train=summary["config"],
                 extra={"history": summary["history"], "data": str(Path(args.data).resolve())})
    summary.update({"base_checkpoint": str(Path(args.checkpoint).resolve()), "base": base_kind,
                    "data": str(args.data), "val_split": args.val_split, "dropped_characters": dropped, "adapter": str(adapter_dir),
                    "adapter_bytes": (adapter_dir / "model.safetensors").stat().st_size})
    (out / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    claim.complete()
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    print(f"val loss on the new text: {before:.4f} -> {after:.4f} ({after - before:+.4f} nats) in "
          f"{summary['train_seconds']:.1f} s of training; {summary['trainable_parameters']:,} trainable parameters "
          f"({100 * summary['trainable_fraction']:.2f}%)")
    print(f"adapter: {adapter_dir} ({summary['adapter_bytes'] / 1e3:.1f} kB)   summary: {out / 'finetune.json'}")
    if args.sample_tokens:
        print_sample(model, tokenizer, text[: min(8, len(text))], args.sample_tokens, temperature=0.8, top_k=None,
                      top_p=None, seed=args.seed)


def add_parsers(sub):
    q = sub.add_parser("quantize", help="write an int8 (weight-only) copy of a checkpoint; report size and val loss")
    q.add_argument("checkpoint", help="a checkpoint directory (e.g. out/ckpt)")
    q.add_argument("--out", help="where to write the quantized checkpoint (default: CHECKPOINT-int8)")
    add_overwrite_flag(q, "a checkpoint already at --out")
    q.add_argument("--group-size", type=int, help="one scale per this many input rows (default: one per output channel)")
    q.add_argument("--data", help="text file to measure val loss and perplexity on, float vs int8")
    q.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of --data is the val text (default 0.1, as train)")
    q.add_argument("--json", help="also write the numbers as JSON here")
    add_backend_flag(q)
    q.set_defaults(func=_quantize)

    f = sub.add_parser("finetune", help="train LoRA adapters of a checkpoint on a new text; saves only the adapters")
    f.add_argument("--checkpoint", required=True, help="base checkpoint (float, or int8 from `npflux quantize` for QLoRA)")
    f.add_argument("--data", required=True, help="the new text")
    f.add_argument("--out-dir", default="out-lora", help="OUT_DIR/adapter is the adapter checkpoint (default out-lora)")
    add_overwrite_flag(f, "OUT_DIR/adapter and finetune.json")
    f.add_argument("--lora-rank", type=positive_int, default=8, help="rank r of the adapters A (r x in) and B (out x r) (default 8)")
    f.add_argument("--lora-alpha", type=finite_float, help="scaling alpha / rank (default alpha = 2 * rank)")
    f.add_argument("--targets", default="attn.c_attn",
                   help="comma-separated module path patterns (fnmatch, suffix match), e.g. attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj; "
                        "attn.c_attn[q,v] adapts only the q and v blocks of the fused q/k/v projection")
    f.add_argument("--max-iters", type=positive_int, default=300, help="fine-tuning steps (default 300)")
    f.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default 16)")
    f.add_argument("--learning-rate", type=positive_float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    f.add_argument("--weight-decay", type=finite_float, default=0.0, help="AdamW weight decay on the adapters (default 0)")
    f.add_argument("--grad-clip", type=finite_float, default=1.0, help="0 disables clipping")
    f.add_argument("--eval-interval", type=positive_int, default=100, help="steps between evaluations (default 100)")
    f.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of --data is held out")
    f.add_argument("--val-split", choices=["tail", "lines"], default="tail",
                   help="held-out text: the last --val-fraction of it (default), or every k-th line (a text of unrelated lines)")
    f.add_argument("--unknown-chars", choices=["error", "drop"], default="error",
                   help="characters outside a char model's vocabulary: stop with an error (default) or drop them")
    f.add_argument("--seed", type=int, default=1337, help="seed for the adapters' initialisation and the batches (default 1337)")
    f.add_argument("--sample-tokens", type=int, default=200, help="print a sample of this many tokens at the end (0: none)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_flag(f)
    f.set_defaults(func=_finetune)

"""Compression and adaptation of a trained GPT: int8 models, LoRA fine-tuning.

    quantize_model(model)            block linears -> QuantizedLinear (int8 + float32 scales)
    finetune(model, ...)             LoRA adapters trained with AdamW, every other weight frozen

Their checkpoints are kinds of ``npflux.checkpoint`` (``gpt-int8`` written by
``save_quantized``, ``gpt-lora`` by ``save_adapter``: the adapters only, and the
base checkpoint they belong to), and ``npflux.checkpoint.load_model`` reads
them, so ``npflux sample`` and ``npflux eval`` run from any of them. An
adapter over a quantized base is QLoRA-style fine-tuning. ``save_quantized``,
``save_adapter``, ``load_adapter`` and ``special_from_checkpoint`` are still
importable from here for one release.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from .. import optim
from ..backend import get_backend
from ..checkpoint import load_adapter, model_from, save_adapter, save_quantized  # noqa: F401  (old names, one release)
from ..data import get_batch
from ..nn.convert import apply_lora, quantize_linears
from ..nn.lora import lora_gradients, lora_parameters
from ..nn.quant import named_buffers
from .loop import progress as progress_bar
from .loop import Diverged, train_step
from .loop import windows_loss as _windows_loss

# The block linears: fused q/k/v, attention output, both FFN matrices. GPT's lm_head is
# not a Linear module (it may share wte's matrix), so it, the embeddings and the norms stay float.
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DEFAULT_LORA_TARGETS = ("attn.c_attn",)


# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------


def model_size(model) -> dict:
    """Bytes held by the model's arrays, by kind, and the total in MB (10^6 bytes).

    ``float``: parameters and float buffers (embeddings, norms, biases, frozen
    float weights); ``int8``: quantized weights; ``scales``: their float32 scales.
    """
    sizes = {"float": 0, "int8": 0, "scales": 0}
    arrays = {**model.params, **named_buffers(model)}
    for name, a in arrays.items():
        kind = "int8" if a.dtype.itemsize == 1 else "scales" if name.endswith("weight_scale") else "float"
        sizes[kind] += int(a.nbytes)
    sizes["total"] = sum(sizes.values())
    sizes["mb"] = sizes["total"] / 1e6
    return sizes


def weight_count(model) -> int:
    """Numbers the model computes with: its parameters plus its frozen and int8 weights and biases (not scales)."""
    frozen = sum(int(a.size) for k, a in named_buffers(model).items() if not k.endswith("weight_scale"))
    return model.num_parameters() + frozen


# ---------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------


def quantize_model(model, group_size=None, targets=BLOCK_LINEARS):
    """Replace the block linears by int8 QuantizedLinear layers in place; returns the quantized paths."""
    return quantize_linears(model, group_size=group_size, targets=targets)


def special_from_checkpoint(ckpt, directory, backend=None, dtype=None):
    """(model, tokenizer) for a quantized or an adapter checkpoint already read.

    Kept for one release: ``npflux.checkpoint.model_from(ckpt, directory, ...)`` reads every kind.
    """
    return model_from(ckpt, directory, backend, dtype, expect=("gpt-int8", "gpt-lora"))


# ---------------------------------------------------------------------------
# text for a model's vocabulary
# ---------------------------------------------------------------------------


def encode_for(tokenizer, text, unknown="error", doc_sep=None):
    """(ids, text actually used, characters dropped). A character tokenizer cannot encode characters
    outside its vocabulary: ``unknown="error"`` says which ones; ``"drop"`` removes them (and counts them).

    The ids are laid out as the model was trained (``npflux.data.pack_documents``): for a tokenizer
    with [BOS]/[EOS] (BPE), ``[BOS] doc [EOS]`` per document of ``text`` split at ``doc_sep``, the
    base checkpoint's ``config["train"]["doc_sep"]`` (``checkpoint_doc_sep``).
    """
    import numpy as np

    from ..data import pack_documents

    dropped = 0
    if unknown not in ("error", "drop"):
        raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    vocab = getattr(tokenizer, "stoi", None)
    if vocab is not None:
        bad = sorted({c for c in set(text) if c not in vocab})
        if bad and unknown == "error":
            shown = ", ".join(repr(c) for c in bad[:20])
            raise ValueError(f"the text has {len(bad)} character(s) outside the model's vocabulary ({shown}); "
                             f"pass --unknown-chars drop to remove them")
        if bad:
            kept = "".join(c for c in text if c in vocab)
            dropped = len(text) - len(kept)
            text = kept
    return np.asarray(pack_documents(tokenizer, text, doc_sep), dtype=np.int64), text, dropped


def checkpoint_doc_sep(ckpt):
    """Where the checkpoint's model was trained to see document boundaries (None: one running text)."""
    return ckpt.config.get("train", {}).get("doc_sep")


def split_text(text, val_fraction=0.1, how="tail"):
    """(train text, val text). ``tail``: the last ``val_fraction`` of the characters (as ``npflux train``);
    ``lines``: every k-th line (k = round(1 / val_fraction)), for a text of unrelated lines whose
    tail would be a different topic from the rest."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if how == "tail":
        n_train = int(len(text) * (1.0 - val_fraction))
        return text[:n_train], text[n_train:]
    if how != "lines":
        raise ValueError(f"split must be 'tail' or 'lines', got {how!r}")
    lines = text.splitlines(keepends=True)
    k = max(2, round(1.0 / val_fraction))
    if len(lines) < k:
        raise ValueError(f"a 'lines' split with val_fraction {val_fraction} needs at least {k} lines, the text has {len(lines)}")
    val = [ln for i, ln in enumerate(lines) if i % k == k - 1]
    train = [ln for i, ln in enumerate(lines) if i % k != k - 1]
    return "".join(train), "".join(val)


# ---------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = DEFAULT_LORA_TARGETS
    max_iters: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 100
    seed: int = 1337
    progress: bool = True

    def __post_init__(self):
        # One pattern as a string is one target (a str is iterable: it would become one target per character).
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        for name in ("rank", "max_iters", "batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):  # (nan <= 0 is false)
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")


def windows_loss(model, ids, batch_size=16, progress=False):
    """``npflux.training.windows_loss`` (the one window evaluator, whose loss ``train.evaluate_text``
    reports too); ``progress``: a progress bar over the batches with this text as its label."""
    return _windows_loss(model, ids, batch_size, progress_label=progress or None)


def finetune(model, train_ids, val_ids, cfg: FinetuneConfig, log=print):
    """Put LoRA adapters on ``model`` and train only them on ``train_ids``; returns a summary dict.

    The base weights are frozen (no gradient arrays); the optimizer gets the
    adapters' parameters and nothing else. Losses are full passes over the
    validation ids (``windows_loss``), before, during and after.
    """
    base_params = weight_count(model)
    paths = apply_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
    params, grads = lora_parameters(model), lora_gradients(model)
    trainable = sum(int(p.size) for p in params.values())
    opt = optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    block = min(model.config.block_size, len(train_ids) - 1)
    rng = get_backend("numpy").rng(cfg.seed)
    log(f"LoRA rank {cfg.rank}, alpha {cfg.alpha} on {len(paths)} layers ({', '.join(cfg.targets)}): "
        f"{trainable:,} trainable parameters = {100 * trainable / base_params:.2f}% of the base's {base_params:,}")

    history = [{"step": 0, "train_loss": windows_loss(model, train_ids), "val_loss": windows_loss(model, val_ids)}]
    log(f"step 0: train loss {history[0]['train_loss']:.4f}, val loss {history[0]['val_loss']:.4f}")
    bar = progress_bar(cfg.max_iters, enabled=cfg.progress)
    model.train()
    t0 = time.perf_counter()
    train_time = 0.0
    for step in range(1, cfg.max_iters + 1):
        t_step = time.perf_counter()
        try:
            loss, _ = train_step(model, opt, [get_batch(train_ids, cfg.batch_size, block, rng)],
                                 grad_clip=cfg.grad_clip, grads=grads)
        except Diverged as exc:
            if bar:
                bar.close()
            raise Diverged(f"fine-tuning diverged at step {step}: {exc} (learning rate {cfg.learning_rate:g}); "
                           f"no adapter was written: lower --learning-rate") from None
        train_time += time.perf_counter() - t_step
        if bar:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            bar.update(1)
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            entry = {"step": step, "train_loss": windows_loss(model, train_ids), "val_loss": windows_loss(model, val_ids)}
            history.append(entry)
            msg = f"step {step}: train loss {entry['train_loss']:.4f}, val loss {entry['val_loss']:.4f}"
            bar.write(msg) if bar else log(msg)
    if bar:
        bar.close()
    return {"adapted_layers": paths, "trainable_parameters": trainable, "base_parameters": base_params,
            "trainable_fraction": trainable / base_params, "history": history,
            "val_loss_before": history[0]["val_loss"], "val_loss_after": history[-1]["val_loss"],
            "train_seconds": train_time, "total_seconds": time.perf_counter() - t0,
            "config": {**dataclasses.asdict(cfg), "targets": list(cfg.targets)}}


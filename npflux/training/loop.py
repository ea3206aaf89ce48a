"""The one training step, and what every training workflow shares around it.

A training step, whatever the model (GPT, encoder-decoder, LoRA adapters, a
sparse autoencoder)::

    zero_grad
    for each of n micro-batches:  loss = forward(batch);  backward(scale 1/n)
    clip the gradients' global norm (if asked)
    a non-finite loss or gradient norm: stop (Diverged), the weights untouched
    optimizer step

``train_step`` is that, written once; the workflows (``npflux.train`` for a
GPT, ``npflux.train_seq2seq``, ``npflux.finetune`` for LoRA, ``npflux.interp``
for SAEs) are short loops over it that only choose their batches, what to
evaluate and what to save. Also here, each written once: ``evaluating(model)``
(eval mode for a block, restored even on an error), ``Diverged`` (what
``train_step`` raises on a non-finite loss or gradient norm), ``progress`` (the tqdm bar
every long command shows), ``RunLog`` and ``plot_losses`` (a run's log.jsonl and
loss.png), and ``windows_loss`` (the loss of a model over a token array cut into
windows: the one evaluator of a text).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from .. import optim
from ..distributed import GradientSync
from .threads import batch_split

ONE_PROCESS = GradientSync()  # train_step's default: one process, nothing to synchronise


def train_step(model, optimizer, micro_batches, *, grad_clip=0.0, grads=None, loss=None, backward=None, sync=None):
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns (mean loss, grad norm).

    ``loss(batch)`` runs the forward pass and returns the loss (default:
    ``model.forward(*batch)[1]``, as GPT and Seq2SeqTransformer give
    (logits, loss)); ``backward(scale)`` runs the backward pass with the loss
    multiplied by ``scale`` (default ``model.backward(loss_scale=scale)``).
    A non-finite loss or gradient norm raises ``Diverged`` before the
    optimizer step (the divergence guard of every workflow).
    Each micro-batch's gradient is scaled by 1/n, so n micro-batches of b
    rows give the gradient of one batch of n*b rows. ``grads`` are the
    gradients the optimizer steps with (default ``model.grads``; LoRA passes
    only the adapters'). The norm is None when ``grad_clip`` is 0 (no clipping).

    ``sync`` (``npflux.distributed.GradientSync``) is the data-parallel hook:
    this process's share of the global batch scales its backward, the
    gradients are summed over the processes (``sync.reduce``, overlapped with
    the last backward where it can) before the norm, the clipping and the
    step, and the loss is summed likewise; by default one process, for which
    all of that is nothing.

    On the CPU with several threads, the model's own forward and backward of
    a large enough batch run split over the threads, each on its share of the
    rows (``npflux.training.threads``; the setting ``split_batch``): the same
    gradients to rounding.
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("train_step: no micro-batches")
    split = batch_split(model, micro_batches, custom=loss is not None or backward is not None or grads is not None,
                        one_process=sync is None or sync is ONE_PROCESS)
    loss = loss if loss is not None else (lambda batch: model.forward(*batch)[1])
    backward = backward if backward is not None else (lambda scale: model.backward(loss_scale=scale))
    grads = grads if grads is not None else model.grads
    sync = sync if sync is not None else ONE_PROCESS
    model.zero_grad()
    n = len(micro_batches)
    total, scale = 0.0, sync.share / n
    # Overflow on the way to a non-finite loss is what the guard below reports, in one line: NumPy's
    # RuntimeWarnings about it would only print the same news first, as noise.
    with np.errstate(over="ignore", invalid="ignore"):
        if split is not None:  # the rows of each micro-batch over the worker threads, one replica each
            total = split.forward_backward(micro_batches, scale)
        else:
            for i, batch in enumerate(micro_batches):
                total += float(loss(batch))
                sync.backward(lambda: backward(scale), last=i == n - 1)
        mean = sync.sum(total * scale)  # the global batch's mean: each process's share-weighted mean, added
        grads = sync.reduce(grads)
        across = sync.norm_across
        norm = optim.clip_grad_norm(grads, grad_clip, across) if grad_clip > 0 else optim.global_norm(grads, across)
    if not (math.isfinite(mean) and math.isfinite(norm)):  # the divergence guard: the weights stay as they were
        raise Diverged(f"the loss is {mean:.4g}" if not math.isfinite(mean) else f"the gradient norm is {norm:.4g}")
    optimizer.step(grads)
    return mean, (norm if grad_clip > 0 else None)


class Diverged(ValueError):
    """Training met a non-finite loss or gradient norm; ``train_step`` raised it before the optimizer
    step, so the weights are the last good ones. The workflows add where it happened and what to do."""


@contextlib.contextmanager
def evaluating(model):
    """``with evaluating(model):`` is ``model.evaluating()`` (eval mode for the block, the previous mode
    back after, also on an error) that also drops the loss cache an evaluation forward left behind."""
    with model.evaluating():
        try:
            yield model
        finally:
            if hasattr(model, "loss_cache"):
                model.loss_cache = None


def progress(total=None, *, enabled=True, initial=0, unit="step", desc=None, leave=True):
    """A tqdm progress bar on stderr, or None when ``enabled`` is false (tqdm loads only when used)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)


def windows_loss(model, ids, batch_size=16, progress_label=None):
    """Mean loss over ``ids`` cut into windows of block_size + 1 tokens, each predicting its last block_size,
    so every token after the first is predicted once (a remainder shorter than a window is left out).

    ``progress_label``: show a bar over the batches with this label.
    """
    T = model.config.block_size
    if len(ids) < 2:
        raise ValueError("windows_loss: need at least two tokens")
    T = min(T, len(ids) - 1)
    n = (len(ids) - 1) // T
    windows = np.stack([ids[i * T: i * T + T + 1] for i in range(n)])
    starts = range(0, n, batch_size)
    bar = progress(len(starts), enabled=bool(progress_label), unit="batch", desc=str(progress_label), leave=False)
    total = 0.0
    with evaluating(model):
        for start in starts:
            batch = windows[start: start + batch_size]
            _, loss = model.forward(batch[:, :-1], batch[:, 1:])
            total += float(loss) * batch.shape[0]
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return total / n


class RunLog:
    """A run's ``log.jsonl``: one JSON object per line, one line per evaluation.

    ``RunLog(path, kept)`` starts the file with the entries a resumed run kept
    (the lines past its checkpoint belong to a run that did not survive), or
    empty; ``append(entry)`` adds a line at once, so a stopped run keeps every
    evaluation it finished.
    """

    def __init__(self, path, kept=()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            for entry in kept:
                f.write(json.dumps(entry) + "\n")

    def append(self, entry):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def diverged_step(history, keys=("train_loss", "val_loss")):
    """The first step of ``history`` that diverged (marked ``"diverged"``, or a non-finite loss), else None."""
    for e in history:
        if "diverged" in e or any(not math.isfinite(e.get(k, 0.0)) for k in keys):
            return e["step"]
    return None


def loss_figure(history, keys=("train_loss", "val_loss")):
    """The matplotlib figure of ``plot_losses``: each key against the step, and a red line where training diverged
    (matplotlib would leave a NaN point out and the curve would look healthy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(e["step"], e[key]) for e in history if key in e and math.isfinite(e[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key.replace("_loss", ""))
    step = diverged_step(history, keys)
    if step is not None:
        ax.axvline(step, color="red", linestyle="--", label=f"diverged at step {step}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_losses(history, path, log=print, keys=("train_loss", "val_loss")):
    """The ``keys`` of each history entry against its step, as a PNG (skipped with a note without matplotlib);
    where training diverged is marked (``loss_figure``)."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed; skipping the loss plot (pip install matplotlib)")
        return None
    fig = loss_figure(history, keys)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

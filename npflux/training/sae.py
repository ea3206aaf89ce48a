"""Training a sparse autoencoder on a model's activations: Adam over rows of (N, d), with the
decoder's columns kept at unit norm. The activations come from ``npflux.interp``."""
from __future__ import annotations

import math

import numpy as np

from .loop import progress as progress_bar
from .loop import Diverged, train_step


def train_sae(sae, x, steps, batch_size=1024, lr=1e-3, l1_warmup=0.05, seed=0, progress=False,
              log_every=0, log=print):
    """Adam on ``sae`` over the rows of host array x (N, d); returns the history of (step, loss, recon, l1 term).

    Each step: a batch of rows (shuffled epochs), zero_grad, loss, backward,
    ``project_decoder_grad`` (the unit-norm constraint, see models/sae.py),
    the Adam step (``npflux.optim.AdamW`` with weight_decay 0 is Adam),
    ``normalize_decoder``. b_dec starts at the mean of x; the L1 coefficient
    ramps up linearly over the first ``l1_warmup`` fraction of the steps
    (features that are penalised from step 0 tend to die before they find
    anything to encode).
    """
    from ..optim import AdamW

    if x.ndim != 2 or x.shape[1] != sae.config.d_in:
        raise ValueError(f"train_sae: x must be (N, {sae.config.d_in}), got {x.shape}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"train_sae: lr must be a finite number > 0, got {lr}")
    if len(x) < batch_size:
        raise ValueError(f"train_sae: {len(x)} rows are fewer than one batch of {batch_size}")
    sae.p["b_dec"][...] = sae.backend.asarray(x.mean(axis=0), dtype=sae.dtype)
    optimizer = AdamW(sae.params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(len(x)), 0
    warm = max(1, int(l1_warmup * steps))
    history = []
    bar = progress_bar(steps, unit="step", enabled=progress)
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(x)), 0
        batch = sae.backend.asarray(x[order[cursor : cursor + batch_size]], dtype=sae.dtype)
        cursor += batch_size
        terms = []
        l1 = sae.config.l1 * min(1.0, (step + 1) / warm)

        def sae_loss(rows):
            terms[:] = sae.loss(rows, l1=l1)  # (loss, reconstruction, l1 term)
            return terms[0]

        def sae_backward(scale):
            sae.backward_loss(scale)
            sae.project_decoder_grad()  # decoder columns stay unit-norm: no gradient along them

        try:
            train_step(sae, optimizer, [batch], loss=sae_loss, backward=sae_backward)
        except Diverged as exc:
            if bar:
                bar.close()
            raise Diverged(f"SAE training diverged at step {step}: {exc} (lr {lr:g}); nothing was written: "
                           f"lower --lr") from None
        sae.normalize_decoder()
        loss, recon, l1_term = terms
        history.append((step, loss, recon, l1_term))
        if bar:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", recon=f"{recon:.4f}", l1=f"{l1_term:.2f}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step}: loss {loss:.4f}, reconstruction {recon:.4f}, L1 {l1_term:.3f}")
    if bar:
        bar.close()
    return history

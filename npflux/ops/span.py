"""The loss of an extractive reader: where the answer starts and where it ends, two classifications over positions.

    P_start = softmax over the allowed positions of start_logits (B, T)
    P_end   = softmax over the allowed positions of end_logits (B, T)
    loss = (1/B) sum_b [ -log P_start[b, s_b]  -  log P_end[b, e_b] ]

the sum of the two mean cross-entropies (as BERT's SQuAD head, Devlin et
al. 2019, which averages them instead: a factor 1/2). ``mask`` (B, T), True
where a span may start or end (the passage's tokens), keeps the question,
the separator and the padding out of both softmaxes: their probability and
their gradient are exactly 0.
"""
from ..backend import check_float, check_int, get_array_module
from .softmax import log_softmax_rows


def _masked_log_softmax(xp, z, mask):
    """log softmax over the allowed positions of each row; -inf at the others."""
    return log_softmax_rows(xp, xp.where(mask, z, -xp.inf))


def span_loss_forward(start_logits, end_logits, starts, ends, mask=None):
    """The loss above as a 0-d array of the logits' dtype, and the cache.

    start_logits and end_logits (B, T); starts and ends (B,) positions in
    [0, T), each one allowed by ``mask`` (default: every position). A row
    whose mask allows nothing, or a target outside its mask, is a ValueError.
    """
    check_float(start_logits, "span_loss: start_logits")
    check_float(end_logits, "span_loss: end_logits")
    check_int(starts, "span_loss: starts")
    check_int(ends, "span_loss: ends")
    if start_logits.ndim != 2 or start_logits.shape != end_logits.shape:
        raise ValueError(f"span_loss: start and end logits must both be (B, T), got {start_logits.shape} "
                         f"and {end_logits.shape}")
    B, T = start_logits.shape
    xp = get_array_module(start_logits)
    starts, ends = xp.asarray(starts), xp.asarray(ends)
    if starts.shape != (B,) or ends.shape != (B,):
        raise ValueError(f"span_loss: starts and ends must be ({B},), got {starts.shape} and {ends.shape}")
    mask = xp.ones((B, T), dtype=bool) if mask is None else xp.asarray(mask)
    if mask.shape != (B, T) or mask.dtype != bool:
        raise ValueError(f"span_loss: mask must be boolean of shape {(B, T)}, got {mask.dtype} {mask.shape}")
    if not bool(mask.any(axis=1).all()):
        raise ValueError("span_loss: a row's mask allows no position")
    for name, pos in (("starts", starts), ("ends", ends)):
        if B and (int(pos.min()) < 0 or int(pos.max()) >= T):
            raise ValueError(f"span_loss: {name} must lie in [0, {T})")
        if not bool(mask[xp.arange(B), pos].all()):
            raise ValueError(f"span_loss: {name} fall on positions the mask leaves out")
    rows = xp.arange(B)
    log_ps = _masked_log_softmax(xp, start_logits, mask)
    log_pe = _masked_log_softmax(xp, end_logits, mask)
    loss = -(log_ps[rows, starts].sum() + log_pe[rows, ends].sum()) / max(B, 1)
    return xp.asarray(loss, dtype=start_logits.dtype), (xp.exp(log_ps), xp.exp(log_pe), starts, ends)


def span_loss_backward(dloss, cache):
    """(dstart_logits, dend_logits): each dloss * (P - onehot(target)) / B, the softmax cross-entropy's gradient.

    P is 0 at the masked positions, and no target lies there, so their gradient is exactly 0.

    At the target, P - 1 is written as minus the other positions' probabilities: when the
    model is sure (P = 0.995), P - 1 cancels, and in float32 the rounding of P (6e-8) becomes a
    1e-5 error in a gradient of 5e-3; the sum of the others has no cancellation.
    """
    p_start, p_end, starts, ends = cache
    xp = get_array_module(p_start)
    B = p_start.shape[0]
    rows = xp.arange(B)
    scale = float(dloss) / max(B, 1)
    grads = []
    for p, target in ((p_start, starts), (p_end, ends)):
        g = p * scale
        g[rows, target] = 0
        g[rows, target] = -g.sum(axis=1)  # (P - 1) * scale at the target, without the cancellation
        grads.append(g)
    return tuple(grads)

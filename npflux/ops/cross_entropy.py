"""Softmax cross-entropy, averaged over the positions whose target is not ignored."""
from ..backend import check_float, check_int, get_array_module


def flat_targets(xp, targets, V, ignore_index, who):
    """(targets flattened with ignored ones set to 0, the mask of the others); a target outside [0, V) is an error."""
    t = xp.asarray(targets).reshape(-1)
    valid = t != ignore_index
    t_safe = xp.where(valid, t, 0)
    if t.size and (int(t_safe.min()) < 0 or int(t_safe.max()) >= V):
        raise ValueError(f"{who}: targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    return t_safe, valid


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """loss = -(1/N) sum_n log softmax(logits[n])[targets[n]] over the N non-ignored n.

    logits (..., V), targets (...) integers in [0, V) or ``ignore_index``.
    Computed as logsumexp(z - m) - (z_t - m), m the row maximum, so logits of
    +-1e4 stay finite. If every target is ignored the loss is 0 and so is the
    gradient (nothing was predicted), where PyTorch would give NaN.
    Returns (loss as a 0-d array of the logits' dtype, cache).
    """
    check_float(logits, "cross_entropy: logits")
    check_int(targets, "cross_entropy: targets")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, got {targets.shape}")
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t_safe, valid = flat_targets(xp, targets, V, ignore_index, "cross_entropy")

    shifted = z - z.max(axis=-1, keepdims=True)
    exp = xp.exp(shifted)
    sumexp = exp.sum(axis=-1)
    rows = xp.arange(z.shape[0])
    nll = xp.log(sumexp) - shifted[rows, t_safe]
    count = int(valid.sum())
    loss = (nll * valid).sum() / max(count, 1)
    probs = exp / sumexp[:, None]
    return xp.asarray(loss, dtype=logits.dtype), (probs, t_safe, valid, count, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits[n] = dloss * (softmax(z[n]) - onehot(t[n])) / N for non-ignored n, 0 otherwise."""
    probs, t_safe, valid, count, shape = cache
    xp = get_array_module(probs)
    # float() keeps a float64 dloss from upcasting float32 gradients.
    row_scale = valid.astype(probs.dtype) * (float(dloss) / max(count, 1))
    dz = probs * row_scale[:, None]
    dz[xp.arange(dz.shape[0]), t_safe] -= row_scale
    return dz.reshape(shape)

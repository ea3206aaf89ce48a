"""Scaled dot-product attention, batched over all heads at once.

q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv) -> out (B, H, Tq, Dv).
"""
import math

from ..backend import check_float, get_array_module


def causal_mask(Tq, Tk, xp):
    """(Tq, Tk) boolean, True where query i may see key j: j <= i + (Tk - Tq).

    Queries are aligned with the END of the keys, so a decoding step with one
    query and Tk cached keys sees all of them, and Tq == Tk is the usual
    lower-triangular mask.
    """
    return xp.tri(Tq, Tk, k=Tk - Tq, dtype=bool)


def attention_forward(q, k, v, causal=False, mask=None):
    """out = softmax(q k^T / sqrt(D) + masking) v.

    ``mask`` is boolean, broadcastable to (B, H, Tq, Tk), True = may attend;
    ``causal`` adds the causal mask above. A query that may attend to nothing
    gets all-zero weights (and output zero) rather than NaN.
    Returns (out, cache); the attention weights are ``cache[3]``.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float(a, f"attention: {name}")
        if a.ndim != 4:
            raise ValueError(f"attention: {name} must be (B, H, T, D), got shape {a.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    xp = get_array_module(q)
    Tq, Tk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])

    allowed = None
    if causal:
        allowed = causal_mask(Tq, Tk, xp)
    if mask is not None:
        mask = xp.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"attention: mask must be boolean (True = may attend), got {mask.dtype}")
        try:
            xp.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], Tq, Tk))
        except ValueError:
            raise ValueError(f"attention: mask of shape {mask.shape} does not broadcast to {(q.shape[0], q.shape[1], Tq, Tk)}") from None
        allowed = mask if allowed is None else (allowed & mask)

    # The softmax runs in place on the (B, H, Tq, Tk) scores, the largest array here.
    weights = (q * scale) @ k.swapaxes(-1, -2)
    if allowed is not None:
        xp.copyto(weights, -xp.inf, where=~allowed)
    row_max = weights.max(axis=-1, keepdims=True)
    # Causal alone (Tq <= Tk) leaves every row something to see; other masks may not.
    may_empty = mask is not None or Tq > Tk
    if may_empty:
        # A row with nothing allowed has max -inf; 0 keeps exp(-inf - 0) = 0.
        row_max[~xp.isfinite(row_max)] = 0
    weights -= row_max
    xp.exp(weights, out=weights)
    denom = weights.sum(axis=-1, keepdims=True)
    if may_empty:
        denom[denom == 0] = 1
    weights /= denom
    out = weights @ v
    return out, (q, k, v, weights, scale)


def attention_backward(dout, cache):
    """Gradients of out = P v with P = softmax(S), S = scale * q k^T.

        dv = P^T dout
        dP = dout v^T
        dS = P * (dP - sum_j dP_j P_j)      (softmax backward, row by row)
        dq = scale * dS k,   dk = scale * dS^T q
    Masked positions have P = 0, so dS = 0 there and nothing leaks through them.
    """
    q, k, v, weights, scale = cache
    dv = weights.swapaxes(-1, -2) @ dout
    dweights = dout @ v.swapaxes(-1, -2)
    # dscores overwrites dweights in place; scale goes on the smaller q/k side.
    row_dot = (dweights * weights).sum(axis=-1, keepdims=True)
    dscores = dweights
    dscores -= row_dot
    dscores *= weights
    dq = (dscores @ k) * scale
    dk = (dscores.swapaxes(-1, -2) @ q) * scale
    return dq, dk, dv

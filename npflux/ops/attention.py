"""Scaled dot-product attention, batched over all heads at once.

q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv) -> out (B, H, Tq, Dv).
"""
import math

from ..backend import check_float, get_array_module
from ..parallel import num_threads, parallel_map


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

    blocked = None if allowed is None else ~allowed
    B = q.shape[0]
    weights = xp.empty((B, q.shape[1], Tq, Tk), dtype=q.dtype)
    # out is (B, H, Tq, Dv) but laid out as (B, Tq, H, Dv), so merging the heads afterwards is free
    out = xp.empty((B, Tq, q.shape[1], v.shape[3]), dtype=q.dtype).transpose(0, 2, 1, 3)
    qs = q * scale
    # The (B, H, Tq, Tk) weights are the largest array here. Working through
    # them a few batch rows at a time keeps each chunk in the CPU cache across
    # the softmax's passes (max, subtract, exp, sum, divide), which then cost
    # one trip to memory instead of six. The math is the same for any chunk,
    # and chunks are independent, so they also spread over the CPU's cores.
    def chunk(rows):
        w = weights[rows]
        xp.matmul(qs[rows], k[rows].swapaxes(-1, -2), out=w)
        _masked_softmax_(xp, w, _rows_of(blocked, rows), may_be_empty=mask is not None or Tq > Tk)
        xp.matmul(w, v[rows], out=out[rows])

    parallel_map(chunk, _batch_chunks(xp, weights))
    return out, (q, k, v, weights, scale)


def _masked_softmax_(xp, s, blocked, may_be_empty):
    """s <- softmax(s with -inf where ``blocked``) over the last axis, in place.

    A row with nothing allowed gets all-zero weights: its max is -inf, which
    is replaced by 0 so that exp(-inf - 0) = 0, and its sum 0 by 1.
    (Causal alone with Tq <= Tk leaves every row something to see.)
    """
    if blocked is not None:
        xp.copyto(s, -xp.inf, where=blocked)
    row_max = s.max(axis=-1, keepdims=True)
    if may_be_empty:
        row_max[~xp.isfinite(row_max)] = 0
    s -= row_max
    xp.exp(s, out=s)
    denom = _row_sum(s, xp)
    if may_be_empty:
        denom[denom == 0] = 1
    s /= denom


def _row_sum(a, xp):
    """a.sum(axis=-1, keepdims=True) for a contiguous array, as one matrix-vector product.

    With rows as short as attention's (T = 32..1024), NumPy's reduction over
    the last axis pays per row; BLAS does not (4x faster at T = 32).
    """
    return (a.reshape(-1, a.shape[-1]) @ xp.ones(a.shape[-1], dtype=a.dtype)).reshape(a.shape[:-1] + (1,))


_CHUNK_BYTES = 1 << 20  # about L2-sized; one batch row at least
_SPLIT_BYTES = 320 << 10  # below this a second thread costs more than it saves (256 KB loses, 384 KB gains)


def _batch_chunks(xp, a):
    """Slices over a's first axis: ~_CHUNK_BYTES each, and at least one per
    worker thread when there is enough work; the whole axis at once off the CPU."""
    n = a.shape[0]
    if xp.__name__ != "numpy":
        return [slice(0, n)]
    per_row = max(a[:1].nbytes, 1)
    step = max(1, min(n, _CHUNK_BYTES // per_row))
    if n * per_row >= _SPLIT_BYTES:
        step = min(step, -(-n // num_threads()))
    return [slice(i, i + step) for i in range(0, n, step)]


def _rows_of(mask, rows):
    """The part of a (broadcastable) mask that goes with batch rows ``rows``."""
    if mask is None or mask.ndim < 4 or mask.shape[0] == 1:
        return mask
    return mask[rows]


def attention_backward(dout, cache, out=None):
    """Gradients of out = P v with P = softmax(S), S = scale * q k^T.

        dv = P^T dout
        dP = dout v^T
        dS = P * (dP - sum_j dP_j P_j)      (softmax backward, row by row)
        dq = scale * dS k,   dk = scale * dS^T q
    Masked positions have P = 0, so dS = 0 there and nothing leaks through them.
    """
    q, k, v, weights, scale = cache
    xp = get_array_module(dout)
    # ``out=(dq, dk, dv)`` lets the caller receive them in place (e.g. in views of one dqkv array)
    dq, dk, dv = out if out is not None else (xp.empty_like(q), xp.empty_like(k), xp.empty_like(v))
    # Chunked like the forward, so dP and dS of a chunk stay in cache.
    def chunk(rows):
        P = weights[rows]
        xp.matmul(P.swapaxes(-1, -2), dout[rows], out=dv[rows])
        dscores = dout[rows] @ v[rows].swapaxes(-1, -2)  # dP, then dS in place
        row_dot = _row_sum(dscores * P, xp)
        dscores -= row_dot
        dscores *= P
        xp.matmul(dscores, k[rows], out=dq[rows])
        xp.matmul(dscores.swapaxes(-1, -2), q[rows], out=dk[rows])

    parallel_map(chunk, _batch_chunks(xp, weights))
    # scale goes on the smaller q/k side
    dq *= scale
    dk *= scale
    return dq, dk, dv

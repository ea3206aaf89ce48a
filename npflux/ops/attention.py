"""Scaled dot-product attention, batched over all heads at once.

q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv) -> out (B, H, Tq, Dv).
"""
import math

from .. import kernels
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
    Returns (out, cache); the attention weights are ``cache[3]``. A long causal
    self-attention skips the blocks above the diagonal (``_causal_block``).
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
    if causal and mask is not None:  # (a causal mask alone is the cached additive bias below)
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

    # A causal mask alone becomes an additive (Tq, Tk) bias of 0 / -inf (one add, cheaper than a
    # masked copy); any other mask is applied by copying -inf where it blocks.
    bias = blocked = None
    if mask is None and causal:
        bias = _causal_bias(Tq, Tk, q.dtype, xp)
    elif allowed is not None:
        blocked = ~allowed
    B = q.shape[0]
    weights = xp.empty((B, q.shape[1], Tq, Tk), dtype=q.dtype)
    # out is (B, H, Tq, Dv) but laid out as (B, Tq, H, Dv), so merging the heads afterwards is free
    out = xp.empty((B, Tq, q.shape[1], v.shape[3]), dtype=q.dtype).transpose(0, 2, 1, 3)
    # k^T scaled, in a contiguous (B, H, D, Tk) array: the scale costs one pass over k, and a
    # contiguous right operand makes the batched product about twice as fast as a transposed view.
    k_t = xp.empty(k.shape[:2] + (k.shape[3], Tk), dtype=k.dtype)
    xp.multiply(k.swapaxes(-1, -2), scale, out=k_t)
    # The (B, H, Tq, Tk) weights are the largest array here. Working through
    # them a few batch rows at a time keeps each chunk in the CPU cache across
    # the softmax's passes (max, subtract, exp, sum, divide), which then cost
    # one trip to memory instead of six. The math is the same for any chunk,
    # and chunks are independent, so they also spread over the CPU's cores.
    fused = blocked is None and kernels.use_for(q, k_t)
    may_be_empty = mask is not None or Tq > Tk

    def chunk(rows):
        w = weights[rows]
        xp.matmul(q[rows], k_t[rows], out=w)
        if fused:  # the bias, the max and the sum compiled, NumPy's exp between: the lines below
            kernels.softmax_rows_(w.reshape(-1, Tk), bias, may_be_empty=may_be_empty)
        else:
            if bias is not None:
                w += bias
            _masked_softmax_(xp, w, _rows_of(blocked, rows), may_be_empty=may_be_empty)
        xp.matmul(w, v[rows], out=out[rows])

    def block_causal_chunk(rows):  # the same, skipping the blocks above the diagonal
        for q0, q1 in _spans(Tq, block):
            s = xp.matmul(q[rows, :, q0:q1], k_t[rows, :, :, :q1])  # (r, H, q1 - q0, q1)
            s[..., q0:] += bias[q0:q1, q0:q1]
            _masked_softmax_(xp, s, None, may_be_empty=False)
            weights[rows, :, q0:q1, :q1] = s
            weights[rows, :, q0:q1, q1:] = 0
            xp.matmul(s, v[rows, :, :q1], out=out[rows, :, q0:q1])

    block = _causal_block(xp, Tq, Tk, causal, mask)
    parallel_map(block_causal_chunk if block else chunk, _batch_chunks(xp, weights))
    return out, (q, k, v, weights, scale, block)


def _causal_bias(Tq, Tk, dtype, xp):
    """The (Tq, Tk) additive causal mask: 0 where query i may see key j, -inf where not.

    Every layer of every step asks for the same one, so it is made once per
    shape and dtype and kept, read-only (on NumPy; nothing here writes to it).
    """
    device = None if xp.__name__ == "numpy" else xp.cuda.Device().id  # a GPU's arrays stay on that GPU
    key = (Tq, Tk, xp.dtype(dtype).str, xp.__name__, device)
    bias = _CAUSAL_BIASES.get(key)
    if bias is None:
        bias = xp.zeros((Tq, Tk), dtype=dtype)
        bias[~causal_mask(Tq, Tk, xp)] = -xp.inf
        if xp.__name__ == "numpy":
            bias.flags.writeable = False
        if len(_CAUSAL_BIASES) >= 64:  # lengths seen while decoding one token at a time: keep a few
            _CAUSAL_BIASES.clear()
        _CAUSAL_BIASES[key] = bias
    return bias


_CAUSAL_BIASES: dict = {}
_CAUSAL_BLOCK = 64       # query rows per block of the block-causal path
_BLOCK_CAUSAL_MIN = 128  # from this length on, skipping the masked blocks pays (measured)


def _causal_block(xp, Tq, Tk, causal, mask):
    """The block size for block-causal work, or 0 for the plain path.

    With a causal mask alone and T >= _BLOCK_CAUSAL_MIN, query block i only
    needs keys 0 .. end of block i: the products and the softmax skip the
    blocks above the diagonal, whose weights are exactly 0 anyway. With n
    blocks that is (n + 1) / 2n of the work (5/8 at T = 256). The weights kept
    for the backward (and heat maps) are the full (T, T) matrix, zeros above.
    """
    if xp.__name__ != "numpy" or not causal or mask is not None or Tq != Tk or Tq < _BLOCK_CAUSAL_MIN:
        return 0
    return _CAUSAL_BLOCK


def _spans(T, block):
    return [(i, min(i + block, T)) for i in range(0, T, block)]


def _masked_softmax_(xp, s, blocked, may_be_empty):
    """s <- softmax(s with -inf where ``blocked``) over the last axis, in place.

    A row with nothing allowed gets all-zero weights: its max is -inf, which
    is replaced by 0 so that exp(-inf - 0) = 0, and its sum 0 by 1.
    (Causal alone with Tq <= Tk leaves every row something to see.)
    """
    if blocked is not None:
        xp.copyto(s, -xp.inf, where=blocked)
    row_max = _row_max(s, xp)
    if may_be_empty:
        row_max[~xp.isfinite(row_max)] = 0
    s -= row_max
    xp.exp(s, out=s)
    denom = _row_sum(s, xp)
    if may_be_empty:
        denom[denom == 0] = 1
    s /= denom


_SHORT_ROW = 64  # measured: up to here the transposed max wins (2.5x at T = 32, 1.2x at 64)


def _row_max(a, xp):
    """a.max(axis=-1, keepdims=True) for a contiguous array.

    NumPy reduces a short last axis row by row, paying per row; for rows up to
    ``_SHORT_ROW`` long a transposed copy reduced over its first axis (one
    vectorised pass along all rows at once) is faster, copy included.
    """
    T = a.shape[-1]
    if xp.__name__ != "numpy" or T > _SHORT_ROW:
        return a.max(axis=-1, keepdims=True)
    return xp.ascontiguousarray(a.reshape(-1, T).T).max(axis=0).reshape(a.shape[:-1] + (1,))


def _row_sum(a, xp):
    """a.sum(axis=-1, keepdims=True) for a contiguous array, as one matrix-vector product.

    With rows as short as attention's (T = 32..1024), NumPy's reduction over
    the last axis pays per row; BLAS does not (4x faster at T = 32).
    """
    return (a.reshape(-1, a.shape[-1]) @ xp.ones(a.shape[-1], dtype=a.dtype)).reshape(a.shape[:-1] + (1,))


_CHUNK_BYTES = 1 << 20  # about L2-sized; one batch row at least
_SPLIT_BYTES = 512 << 10  # below this a second thread costs more than it saves (measured: 384 KB loses, 768 KB gains)


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
    q, k, v, weights, scale, block = cache
    xp = get_array_module(dout)
    # ``out=(dq, dk, dv)`` lets the caller receive them in place (e.g. in views of one dqkv array)
    dq, dk, dv = out if out is not None else (xp.empty_like(q), xp.empty_like(k), xp.empty_like(v))
    # Chunked like the forward, so dP and dS of a chunk stay in cache.
    fused = kernels.use_for(weights, dout)

    def chunk(rows):
        P = weights[rows]
        xp.matmul(P.swapaxes(-1, -2), dout[rows], out=dv[rows])
        # dP, then dS in place; in C order (a product takes its inputs' layout), so the kernel's 2-D view is one
        dscores = xp.matmul(dout[rows], v[rows].swapaxes(-1, -2), out=xp.empty(P.shape, dtype=P.dtype))
        if fused:  # one compiled pass of the three lines below
            kernels.softmax_backward_rows_(dscores.reshape(-1, P.shape[-1]), P.reshape(-1, P.shape[-1]))
        else:
            row_dot = _row_sum(dscores * P, xp)
            dscores -= row_dot
            dscores *= P
        xp.matmul(dscores, k[rows], out=dq[rows])
        xp.matmul(dscores.swapaxes(-1, -2), q[rows], out=dk[rows])

    def block_causal_chunk(rows):  # the same, skipping the blocks above the diagonal, where P = dS = 0
        T = weights.shape[-1]
        P = weights[rows]
        dS = xp.empty_like(P)  # only the blocks on and below the diagonal are written and read
        for q0, q1 in _spans(T, block):          # by query block: dS and dq
            Pi = P[:, :, q0:q1, :q1]
            d = dout[rows, :, q0:q1] @ v[rows, :, :q1].swapaxes(-1, -2)
            d -= _row_sum(d * Pi, xp)
            d *= Pi
            dS[:, :, q0:q1, :q1] = d
            xp.matmul(d, k[rows, :, :q1], out=dq[rows, :, q0:q1])
        for k0, k1 in _spans(T, block):          # by key block: the queries from k0 on see it
            xp.matmul(P[:, :, k0:, k0:k1].swapaxes(-1, -2), dout[rows, :, k0:], out=dv[rows, :, k0:k1])
            xp.matmul(dS[:, :, k0:, k0:k1].swapaxes(-1, -2), q[rows, :, k0:], out=dk[rows, :, k0:k1])

    parallel_map(block_causal_chunk if block else chunk, _batch_chunks(xp, weights))
    # scale goes on the smaller q/k side
    dq *= scale
    dk *= scale
    return dq, dk, dv

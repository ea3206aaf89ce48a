"""Linear (affine) layer: y = x @ w + b.

Shapes: x (..., I), w (I, O), b (O,) -> y (..., O). ``w`` is stored (in, out),
as GPT-2's Conv1D checkpoints store it, so the forward is one plain matmul.
"""
from ..backend import check_float


def _check_same_dtype(x, w, b):
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError(
            f"linear: x, w and b must share one dtype (got x {x.dtype}, w {w.dtype}"
            + (f", b {b.dtype})" if b is not None else ")")
            + "; npflux never upcasts silently"
        )


def linear_forward(x, w, b=None):
    """y = x @ w + b.  Returns (y, cache)."""
    check_float(x, "linear: x")
    check_float(w, "linear: w")
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has last dim {x.shape[-1:]} but w has shape {w.shape} (expected (in, out))")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"linear: b has shape {b.shape}, expected ({w.shape[1]},)")
    _check_same_dtype(x, w, b)
    # One 2-D matmul over all leading positions: faster than a stacked 3-D one.
    y = x.reshape(-1, w.shape[0]) @ w
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """Gradients of y = x @ w + b.

    Each y[n, o] = sum_i x[n, i] w[i, o] + b[o], so
        dx = dy @ w.T            (I of every row of x touches every output)
        dw = x.T @ dy            (summed over all leading positions n)
        db = sum_n dy[n]
    Leading axes are flattened into one row axis n for dw and db.
    """
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, w.shape[1])
    dx = (dy2 @ w.T).reshape(x.shape)
    dw = x.reshape(-1, w.shape[0]).T @ dy2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db

"""Softmax over the last axis."""
from ..backend import check_float, get_array_module


def softmax_forward(x):
    """y_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j.

    Subtracting the row maximum changes nothing mathematically and keeps exp()
    from overflowing for large logits.
    """
    check_float(x, "softmax: x")
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dy, cache):
    """dx_i = sum_j dy_j dy_j/dx_i = y_i (dy_i - sum_j dy_j y_j)  (Jacobian diag(y) - y y^T).

    Computed as y_i ((dy_i - c) - sum_j y_j (dy_j - c)) with c = dy_k at the
    row's largest y_k: the same value, since sum_j y_j = 1. When y_k is near 1
    the plain form subtracts two nearly equal numbers (dy_k - sum_j dy_j y_j)
    and float32 keeps few digits (2.5e-5 relative error for y_k = 0.995);
    centred, the dominant term is exactly zero and the sum is of small terms.
    """
    y = cache
    xp = get_array_module(y)
    dominant = xp.take_along_axis(dy, y.argmax(axis=-1)[..., None], axis=-1)
    centred = dy - dominant
    return y * (centred - (centred * y).sum(axis=-1, keepdims=True))


def log_softmax_rows(xp, z):
    """log softmax over the last axis, as z - m - log sum exp(z - m) with m the row maximum (no overflow).

    A helper of the losses (distillation, the span loss), not an op: their backwards use its exp.
    A position at -inf gets log-probability -inf and probability exactly 0.
    """
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))

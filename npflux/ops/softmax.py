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
    """dx_i = sum_j dy_j dy_j/dx_i = y_i (dy_i - sum_j dy_j y_j)  (Jacobian diag(y) - y y^T)."""
    y = cache
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))

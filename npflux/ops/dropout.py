"""Inverted dropout: zero each value with probability p, scale the kept ones by 1/(1-p)."""
from ..backend import check_float, get_array_module


def dropout_forward(x, p, rng):
    """y = x * keep / (1 - p),  keep ~ Bernoulli(1 - p) drawn from ``rng``.

    ``rng`` is the backend's random Generator (numpy.random.Generator on
    NumPy, cupy.random.Generator on CuPy). Scaling at training time keeps the
    expected value of y equal to x, so evaluation needs no rescaling.
    """
    check_float(x, "dropout: x")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if p == 0.0:
        return x, None
    xp = get_array_module(x)
    # One buffer: uniform draws, then in place the 0/1 keep mask, then keep / (1 - p).
    scaled_keep = rng.random(x.shape, dtype=x.dtype)
    xp.greater_equal(scaled_keep, p, out=scaled_keep)
    scaled_keep *= x.dtype.type(1.0 / (1.0 - p))
    return x * scaled_keep, scaled_keep


def dropout_backward(dy, cache):
    """dx = dy * keep / (1 - p): the same mask, the same scale."""
    return dy if cache is None else dy * cache

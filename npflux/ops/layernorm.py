"""Layer normalisation over the last axis."""
from ..backend import check_float, get_array_module


def _row_mean(a2, xp):
    """Mean over the last axis of a 2-D array, as one matrix-vector product.

    NumPy's reductions over a short last axis (C = 64..1536) pay a per-row
    overhead; a product with the vector 1/C runs at BLAS speed instead.
    """
    C = a2.shape[1]
    return a2 @ xp.full(C, 1.0 / C, dtype=a2.dtype)


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * xhat + beta,  xhat = (x - mean) / sqrt(var + eps).

    mean and the biased variance are taken over the last axis (C), as
    torch.nn.LayerNorm does. Returns (y, cache).
    """
    check_float(x, "layernorm: x")
    C = x.shape[-1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"layernorm: gamma and beta must be ({C},), got {gamma.shape} and {beta.shape}")
    if gamma.dtype != x.dtype or beta.dtype != x.dtype:
        raise TypeError(f"layernorm: x {x.dtype}, gamma {gamma.dtype}, beta {beta.dtype} must share one dtype")
    xp = get_array_module(x)
    x2 = x.reshape(-1, C)
    xhat = x2 - _row_mean(x2, xp)[:, None]              # centred; normalised in place below
    var = xp.einsum("nc,nc->n", xhat, xhat) / C        # sum of squares without a squared copy
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat *= rstd[:, None]
    y = xhat * gamma
    y += beta
    return y.reshape(x.shape), (xhat, rstd, gamma)


def layernorm_backward(dy, cache):
    """Gradients of layer norm.

    dbeta  = sum_n dy,  dgamma = sum_n dy * xhat,  and with g = dy * gamma:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    (the two means, over C, are the paths through the mean and the variance).
    """
    xhat, rstd, gamma = cache
    xp = get_array_module(dy)
    C = xhat.shape[-1]
    dy2 = dy.reshape(-1, C)
    dbeta = dy2.sum(axis=0)
    dgamma = xp.einsum("nc,nc->c", dy2, xhat)
    g = dy2 * gamma
    # dx is built in g's buffer: the same formula, no further full-size temporaries but one
    g_xhat_mean = xp.einsum("nc,nc->n", g, xhat) / C
    g -= _row_mean(g, xp)[:, None]
    g -= xhat * g_xhat_mean[:, None]
    g *= rstd[:, None]
    return g.reshape(dy.shape), dgamma, dbeta

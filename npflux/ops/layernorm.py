"""Layer normalisation over the last axis."""
from ..backend import check_float, get_array_module


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
    xhat = x - x.mean(axis=-1, keepdims=True)  # centred; normalised in place below
    var = xp.mean(xp.square(xhat), axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat *= rstd
    y = xhat * gamma
    y += beta
    return y, (xhat, rstd, gamma)


def layernorm_backward(dy, cache):
    """Gradients of layer norm.

    dbeta  = sum_n dy,  dgamma = sum_n dy * xhat,  and with g = dy * gamma:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    (the two means, over C, are the paths through the mean and the variance).
    """
    xhat, rstd, gamma = cache
    C = xhat.shape[-1]
    dy2 = dy.reshape(-1, C)
    dbeta = dy2.sum(axis=0)
    dgamma = (dy2 * xhat.reshape(-1, C)).sum(axis=0)
    g = dy * gamma
    # dx built in place in g's buffer: the same formula, two fewer full-size temporaries
    g_xhat_mean = (g * xhat).mean(axis=-1, keepdims=True)
    g -= g.mean(axis=-1, keepdims=True)
    g -= xhat * g_xhat_mean
    g *= rstd
    return g, dgamma, dbeta

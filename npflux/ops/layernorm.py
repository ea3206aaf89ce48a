"""Layer normalisation over the last axis."""
from .. import kernels
from ..backend import check_float, get_array_module
from ..parallel import parallel_map, row_chunks


def _row_mean(a2, xp):
    """Mean over the last axis of a 2-D array, as one matrix-vector product.

    NumPy's reductions over a short last axis (C = 64..1536) pay a per-row
    overhead; a product with a vector of ones runs at BLAS speed instead.
    The division comes after the sum: multiplying by a rounded 1/C instead
    (1/3 in float32) doubled the float32 error of dx on nearly-constant rows.
    """
    C = a2.shape[1]
    return (a2 @ xp.ones(C, dtype=a2.dtype)) / C


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * xhat + beta,  xhat = (x - mean) / sqrt(var + eps).

    mean and the biased variance are taken over the last axis (C), as
    torch.nn.LayerNorm does. Returns (y, cache).
    Rows are independent, so large inputs are split over the worker threads.
    With numba installed each chunk is one compiled pass
    (``kernels.layernorm_forward_rows``); the NumPy passes below are the reference.
    """
    check_float(x, "layernorm: x")
    C = x.shape[-1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"layernorm: gamma and beta must be ({C},), got {gamma.shape} and {beta.shape}")
    if gamma.dtype != x.dtype or beta.dtype != x.dtype:
        raise TypeError(f"layernorm: x {x.dtype}, gamma {gamma.dtype}, beta {beta.dtype} must share one dtype")
    xp = get_array_module(x)
    x2 = x.reshape(-1, C)
    xhat, y = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty(x2.shape[0], dtype=x.dtype)
    fused = kernels.use_for(x2, gamma, beta)

    def rows(r):
        if fused:
            return kernels.layernorm_forward_rows(x2[r], gamma, beta, eps, y[r], xhat[r], rstd[r])
        xc = xhat[r]
        xp.subtract(x2[r], _row_mean(x2[r], xp)[:, None], out=xc)   # centred
        var = xp.einsum("nc,nc->n", xc, xc) / C                     # no squared copy
        rstd[r] = 1.0 / xp.sqrt(var + eps)
        xc *= rstd[r, None]                                          # now xhat
        xp.multiply(xc, gamma, out=y[r])
        y[r] += beta

    parallel_map(rows, row_chunks(xp, *x2.shape))
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
    dx = xp.empty_like(dy2)
    fused = kernels.use_for(dy2, xhat, gamma)

    def rows(r):
        if fused:  # one compiled pass (the NumPy lines below are the reference)
            return kernels.layernorm_backward_rows(dy2[r], xhat[r], rstd[r], gamma, dx[r])
        d, xh, g = dy2[r], xhat[r], dx[r]
        xp.multiply(d, gamma, out=g)                                 # dx is built in g's place
        g_xhat_mean = xp.einsum("nc,nc->n", g, xh) / C
        g -= _row_mean(g, xp)[:, None]
        g -= xh * g_xhat_mean[:, None]
        g *= rstd[r, None]
        return d.sum(axis=0), xp.einsum("nc,nc->c", d, xh)          # this chunk's dbeta, dgamma

    parts = parallel_map(rows, row_chunks(xp, *dy2.shape))
    dbeta, dgamma = parts[0]
    for db, dg in parts[1:]:
        dbeta, dgamma = dbeta + db, dgamma + dg
    if fused:  # the kernel summed them in float64
        dbeta, dgamma = dbeta.astype(dy.dtype), dgamma.astype(dy.dtype)
    return dx.reshape(dy.shape), dgamma, dbeta

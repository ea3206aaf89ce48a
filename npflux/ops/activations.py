"""Element-wise activations: GELU (tanh form, as GPT-2) and ReLU."""
import math

from .. import kernels
from ..backend import check_float, get_array_module
from ..parallel import parallel_map, row_chunks

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    This is torch.nn.functional.gelu(x, approximate="tanh"), GPT-2's form.
    The formula as written is ``ops.reference.gelu_forward``; here it is
    regrouped as u = sqrt(2/pi) x (1 + 0.044715 x^2) and computed in place in
    one scratch array, which saves four of the (N, 4C) temporaries and about
    a third of the time (benchmarks/bench_ops.py); large inputs are split
    by rows over the worker threads.
    """
    check_float(x, "gelu: x")
    xp = get_array_module(x)
    # t and y in C order whatever x's layout, so that their 2-D reshapes are views that the rows write
    # through (empty_like would copy a transposed x's layout, and reshaping that copies)
    t, y = xp.empty(x.shape, dtype=x.dtype), xp.empty(x.shape, dtype=x.dtype)
    x2, t2, y2 = (a.reshape(-1, x.shape[-1]) if x.ndim else a.reshape(1, 1) for a in (x, t, y))

    fused = kernels.use_for(x2)

    def rows(r):
        xr, tr, yr = x2[r], t2[r], y2[r]
        if fused:  # the same steps, the arithmetic on each side of the tanh compiled
            return kernels.gelu_forward_rows(xr, _GELU_C, _GELU_A, tr, yr)
        xp.multiply(xr, xr, out=tr)
        tr *= _GELU_A * _GELU_C
        tr += _GELU_C
        tr *= xr                      # u
        xp.tanh(tr, out=tr)           # t = tanh(u), kept for the backward
        xp.add(tr, 1.0, out=yr)
        yr *= xr
        yr *= 0.5

    parallel_map(rows, row_chunks(xp, *x2.shape))
    return y, (x, t)


def gelu_backward(dy, cache, out=None):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).

    ``out=dy`` writes the result over dy (the caller must own dy).
    """
    x, t = cache
    xp = get_array_module(dy)
    if out is not None and not out.flags.c_contiguous:  # its reshape would be a copy: write there after
        dx = gelu_backward(dy, cache)
        out[...] = dx
        return out
    dx = xp.empty(dy.shape, dtype=dy.dtype) if out is None else out  # C order: dx2 below is a view
    shape2 = (-1, x.shape[-1]) if x.ndim else (1, 1)
    x2, t2, dy2, dx2 = (a.reshape(shape2) for a in (x, t, dy, dx))

    fused = kernels.use_for(x2, dy2)

    def rows(r):
        xr, tr = x2[r], t2[r]
        if fused:  # one compiled pass of the formula below
            return kernels.gelu_backward_rows(dy2[r], xr, tr, _GELU_C, _GELU_A, dx2[r])
        g = xp.multiply(xr, xr)
        g *= 3.0 * _GELU_A * _GELU_C
        g += _GELU_C                  # du/dx
        g *= xr
        s = xp.multiply(tr, tr)
        xp.subtract(1.0, s, out=s)    # 1 - t^2
        g *= s
        g += tr
        g += 1.0
        g *= 0.5                      # d gelu / dx
        xp.multiply(dy2[r], g, out=dx2[r])

    parallel_map(rows, row_chunks(xp, *x2.shape))
    return dx


def relu_forward(x, out=None):
    """relu(x) = max(x, 0).  ``out=x`` computes it in place (the caller must own x).

    The cache is the output itself: y > 0 exactly where x > 0, so the
    backward needs no separate mask (and the next layer keeps y anyway).
    """
    check_float(x, "relu: x")
    xp = get_array_module(x)
    if _same_layout(x, out) and kernels.use_for(x):  # one compiled pass of the line below
        if out is x:
            kernels.relu_(x.reshape(-1))
            return x, x
        y = xp.empty_like(x) if out is None else out
        kernels.relu_(x.reshape(-1), y.reshape(-1))
        return y, y
    y = xp.maximum(x, 0, out=out)
    return y, y


def relu_backward(dy, cache, out=None):
    """d relu / dx = 1 where x > 0, else 0 (the subgradient at 0 is 0, as PyTorch).

    ``out=dy`` writes the result over dy (the caller must own dy).
    """
    xp = get_array_module(dy)
    if _same_layout(dy, out, cache) and kernels.use_for(dy, cache):  # one compiled pass of the line below
        if out is dy:
            kernels.relu_backward_(dy.reshape(-1), cache.reshape(-1))
            return dy
        dx = xp.empty_like(dy) if out is None else out
        kernels.relu_backward_(dy.reshape(-1), cache.reshape(-1), dx.reshape(-1))
        return dx
    return xp.multiply(dy, cache > 0, out=out)


def _same_layout(first, *others):
    """Whether the arrays (None: one the op allocates) share one shape and dtype and are C-contiguous,
    so that their 1-D reshapes are views that line up element for element (else the NumPy line runs,
    with NumPy's broadcasting, casting and errors)."""
    return first.flags.c_contiguous and all(
        a is None or (a.shape == first.shape and a.dtype == first.dtype and a.flags.c_contiguous) for a in others)

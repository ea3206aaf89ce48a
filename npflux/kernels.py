"""Compiled element-wise kernels (Numba), an optional fast path on the CPU.

NumPy does element-wise work one pass over memory per operation: layer norm's
forward is eight passes (mean, subtract, square-sum, sqrt, scale, multiply,
add, ...), AdamW's update twelve. Each kernel here does the same arithmetic in
one or two passes, row by row, so a row stays in registers or L1 between its
steps. That is what CuPy's ElementwiseKernel does on the GPU.

The NumPy code in ``npflux.ops`` and ``npflux.optim`` stays the reference:
the ops call a kernel only when ``use_for(array)`` says so, and
tests/test_kernels.py checks each kernel against the NumPy path (and so
against PyTorch and numerical gradients, which that path is checked against).
The kernels are used when

- numba is installed (``pip install npflux[fast]``; the test extra has it),
- the setting ``numba`` is on (``NPFLUX_NUMBA``, default on; ``NPFLUX_NUMBA=0``
  runs the NumPy path everywhere), and
- the arrays are NumPy float32 or float64 (never CuPy's).

Only arithmetic is compiled. Numba calls a scalar ``exp``/``tanh`` per element,
several times slower than NumPy's vectorised ones (measured: exp over 196,608
float32 numbers 466 us vs 89 us, tanh 3,220 us vs 72 us), so the
transcendental functions stay NumPy calls between two kernels.

Precision: float32 stays float32 (every scalar, 1 and 0.5 included, is passed
in the arrays' dtype: a literal 1.0 in a kernel is a float64 and would widen
the arithmetic), except layer norm's dgamma and dbeta, sums over all rows,
which accumulate in float64. Each element is computed by
the NumPy path's formula in its order; only the sums along a row are
reassociated (Numba's ``fastmath`` "reassoc", so they vectorise), which moves
them by rounding, as BLAS's sums already differ between kernels. No flag that
assumes no NaN or inf is set: a diverging run still shows NaN.

Each kernel is compiled on first use for the dtypes it meets and cached on
disk by Numba, so later processes load it (measured: the first training step
of a GPT takes 2.6 s longer on a fresh install, 0.4 s once the cache is
there). ``nogil`` lets ``parallel_map`` run a kernel on several row chunks at
once.
"""
from __future__ import annotations

import threading

import numpy

from . import settings

_NUMBA = None      # the numba module once imported, False when it is not installed
_COMPILED = {}     # python function -> its compiled version
_DTYPES = (numpy.float32, numpy.float64)
_LOCK = threading.Lock()  # the first use may come from two threads at once (training.threads' shares)


def available() -> bool:
    """Whether numba can be imported (the first call imports it, and compiles the sums below)."""
    if _NUMBA is None:
        with _LOCK:
            if _NUMBA is None:
                _import_numba()
    return _NUMBA is not False


def _import_numba():
    global _NUMBA, _sum, _dot
    try:
        import numba
    except ImportError:
        numba = False
    if numba:
        # Sums over a row may be reassociated, so they vectorise; nothing else may:
        # the kernels' element-wise formulas keep the NumPy path's order exactly.
        reassociate = numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
        _sum, _dot = reassociate(_sum), reassociate(_dot)
    _NUMBA = numba


def use_for(*arrays) -> bool:
    """Whether the ops should run ``arrays`` through a compiled kernel."""
    if not settings.get("numba") or not available():
        return False
    return all(type(a) is numpy.ndarray and a.dtype in _DTYPES for a in arrays)


def _compiled(fn):
    kernel = _COMPILED.get(fn)
    if kernel is None:
        if not available():
            raise RuntimeError("npflux.kernels: numba is not installed (pip install -e \".[fast]\")")
        with _LOCK:
            kernel = _COMPILED.get(fn)
            if kernel is None:
                kernel = _NUMBA.njit(nogil=True, cache=True, error_model="numpy")(fn)
                _COMPILED[fn] = kernel
    return kernel


def _scalar(x, like):
    return like.dtype.type(x)


def _sum(a):
    """sum_i a[i] of a 1-D array, in a's dtype."""
    s = a[0]
    for i in range(1, a.size):
        s += a[i]
    return s


def _dot(a, b):
    """sum_i a[i] b[i] of two 1-D arrays, in their dtype."""
    s = a[0] * b[0]
    for i in range(1, a.size):
        s += a[i] * b[i]
    return s


# ---------------------------------------------------------------------------
# layer norm (npflux.ops.layernorm)
# ---------------------------------------------------------------------------
def _layernorm_forward_rows(x, gamma, beta, eps, count, one, y, xhat, rstd):
    N, C = x.shape
    for n in range(N):
        mean = _sum(x[n]) / count
        for c in range(C):
            xhat[n, c] = x[n, c] - mean
        r = one / numpy.sqrt(_dot(xhat[n], xhat[n]) / count + eps)
        rstd[n] = r
        for c in range(C):
            xhat[n, c] *= r
            y[n, c] = xhat[n, c] * gamma[c] + beta[c]


def layernorm_forward_rows(x, gamma, beta, eps, y, xhat, rstd):
    """y = gamma * xhat + beta, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), row by row.

    x, y, xhat (N, C); rstd (N,); written in place."""
    count = _scalar(x.shape[1], x)
    _compiled(_layernorm_forward_rows)(x, gamma, beta, _scalar(eps, x), count, _scalar(1, x), y, xhat, rstd)


def _layernorm_backward_rows(dy, xhat, rstd, gamma, count, dx, dgamma, dbeta):
    N, C = dy.shape
    for n in range(N):
        for c in range(C):
            dx[n, c] = dy[n, c] * gamma[c]  # g, in dx's place
        mean_gx = _dot(dx[n], xhat[n]) / count
        mean_g = _sum(dx[n]) / count
        r = rstd[n]
        for c in range(C):
            dx[n, c] = (dx[n, c] - mean_g - xhat[n, c] * mean_gx) * r
            dbeta[c] += dy[n, c]
            dgamma[c] += dy[n, c] * xhat[n, c]


def layernorm_backward_rows(dy, xhat, rstd, gamma, dx):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma, row by row, into ``dx``.

    Returns these rows' (dbeta, dgamma) = (sum_n dy, sum_n dy * xhat), summed in float64."""
    C = dy.shape[1]
    dgamma, dbeta = numpy.zeros(C), numpy.zeros(C)
    _compiled(_layernorm_backward_rows)(dy, xhat, rstd, gamma, _scalar(C, dy), dx, dgamma, dbeta)
    return dbeta, dgamma


# ---------------------------------------------------------------------------
# AdamW's update (npflux.optim.AdamW)
# ---------------------------------------------------------------------------
def _adamw_update(p, g, m, v, decay, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, minus_step_size):
    for i in range(p.size):
        p[i] *= decay
        m[i] = m[i] * b1 + g[i] * one_minus_b1
        v[i] = v[i] * b2 + g[i] * g[i] * one_minus_b2
        p[i] += m[i] / (numpy.sqrt(v[i]) / bc2_sqrt + eps) * minus_step_size


def adamw_update(p, g, m, v, b1, b2, step_size, bc2_sqrt, eps, decay=1.0):
    """p <- decay p;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - step_size m / (sqrt(v) / bc2_sqrt + eps).

    One pass over 1-D p, g, m, v, in place; every element gets the NumPy path's
    operations in its order (the decay is AdamW's decoupled weight decay,
    1 - lr * wd, or 1: a product by 1 is exact), so the two agree to the bit."""
    s = [_scalar(a, p) for a in (decay, b1, 1.0 - b1, b2, 1.0 - b2, bc2_sqrt, eps, -step_size)]
    _compiled(_adamw_update)(p, g, m, v, *s)


# ---------------------------------------------------------------------------
# GELU, tanh form (npflux.ops.activations)
# ---------------------------------------------------------------------------
def _gelu_inner(x, c, ac, u):
    for n in range(x.shape[0]):
        for j in range(x.shape[1]):
            u[n, j] = (x[n, j] * x[n, j] * ac + c) * x[n, j]


def _gelu_outer(x, t, one, half, y):
    for n in range(x.shape[0]):
        for j in range(x.shape[1]):
            y[n, j] = (t[n, j] + one) * x[n, j] * half


def gelu_forward_rows(x, c, a, t, y):
    """u = sqrt(2/pi) x (1 + a x^2), t = tanh(u), y = 0.5 x (1 + t), for 2-D x; t and y written in place.

    The tanh is NumPy's (vectorised); the arithmetic on each side of it is one
    kernel, in the NumPy path's order, so the two agree to the bit."""
    _compiled(_gelu_inner)(x, _scalar(c, x), _scalar(a * c, x), t)
    numpy.tanh(t, out=t)
    _compiled(_gelu_outer)(x, t, _scalar(1, x), _scalar(0.5, x), y)


def _gelu_backward(dy, x, t, c, ac3, one, half, dx):
    for n in range(x.shape[0]):
        for j in range(x.shape[1]):
            du_dx = x[n, j] * x[n, j] * ac3 + c
            slope = ((du_dx * x[n, j] * (one - t[n, j] * t[n, j]) + t[n, j]) + one) * half
            dx[n, j] = dy[n, j] * slope


def gelu_backward_rows(dy, x, t, c, a, dx):
    """dx = dy * 0.5 (1 + t + x (1 - t^2) du/dx), du/dx = sqrt(2/pi) (1 + 3 a x^2), for 2-D arrays
    (dx may be dy); in the NumPy path's order, so the two agree to the bit."""
    _compiled(_gelu_backward)(dy, x, t, _scalar(c, x), _scalar(3.0 * a * c, x), _scalar(1, x), _scalar(0.5, x), dx)


# ---------------------------------------------------------------------------
# ReLU (npflux.ops.activations)
# ---------------------------------------------------------------------------
def _relu(x, zero, y):
    for i in range(x.size):
        v = x[i]
        # numpy.maximum(v, 0): v where v >= 0 or v is NaN, else 0
        y[i] = v if (v >= zero or v != v) else zero


def _relu_in_place(x, zero):
    for i in range(x.size):
        v = x[i]
        x[i] = v if (v >= zero or v != v) else zero


def relu_(x, y=None):
    """y = max(x, 0) as numpy.maximum(x, 0) gives it (NaN stays NaN), for 1-D arrays; in place without y.

    NumPy's maximum against a scalar is not vectorised: 50 us for a
    (512, 256) float32 array, against 11 us here. In place is a kernel of its
    own: given one array as both x and y, the compiler cannot rule out that
    they overlap and leaves the loop unvectorised (70 us)."""
    if y is None:
        _compiled(_relu_in_place)(x, _scalar(0, x))
    else:
        _compiled(_relu)(x, _scalar(0, x), y)


def _relu_backward(dy, y, one, zero, dx):
    for i in range(dy.size):
        dx[i] = dy[i] * (one if y[i] > zero else zero)


def _relu_backward_in_place(dy, y, one, zero):
    for i in range(dy.size):
        dy[i] = dy[i] * (one if y[i] > zero else zero)


def relu_backward_(dy, y, dx=None):
    """dx = dy * (y > 0) for 1-D arrays, over dy without dx: the NumPy path's product, so the two
    agree to the bit (NaN * 0 is NaN in both); one pass, no boolean mask to make and cast."""
    if dx is None:
        _compiled(_relu_backward_in_place)(dy, y, _scalar(1, dy), _scalar(0, dy))
    else:
        _compiled(_relu_backward)(dy, y, _scalar(1, dy), _scalar(0, dy), dx)


# ---------------------------------------------------------------------------
# softmax's forward (attention), around NumPy's exp
# ---------------------------------------------------------------------------
def _shift_rows(s, bias, has_bias, may_be_empty, zero):
    N, T = s.shape
    Tq = bias.shape[0]
    for n in range(N):
        if has_bias:
            for j in range(T):
                s[n, j] += bias[n % Tq, j]
        row_max = s[n, 0]
        for j in range(1, T):
            row_max = max(row_max, s[n, j])
        if may_be_empty and not numpy.isfinite(row_max):
            row_max = zero  # a row that may see nothing: exp(-inf - 0) = 0 everywhere
        for j in range(T):
            s[n, j] -= row_max


def _normalise_rows(s, may_be_empty, one):
    N, T = s.shape
    for n in range(N):
        denom = _sum(s[n])
        if may_be_empty and denom == 0:
            denom = one
        for j in range(T):
            s[n, j] /= denom


def softmax_rows_(s, bias=None, may_be_empty=False):
    """s <- softmax(s + bias) along each row of 2-D ``s``, in place.

    ``bias`` (Tq, T) is added to row n as bias[n % Tq] (the rows are (batch, head, query)
    flattened), as attention's causal 0/-inf mask. A row with nothing allowed (all -inf)
    gets all-zero weights when ``may_be_empty``, as in the NumPy path."""
    has_bias = bias is not None
    if bias is None:
        bias = s[:1]  # unread: a placeholder of the same type, as the compiled kernel needs an array
    _compiled(_shift_rows)(s, bias, has_bias, may_be_empty, _scalar(0, s))
    numpy.exp(s, out=s)
    _compiled(_normalise_rows)(s, may_be_empty, _scalar(1, s))


# ---------------------------------------------------------------------------
# softmax's backward (attention)
# ---------------------------------------------------------------------------
def _softmax_backward_rows(dp, p):
    N, T = p.shape
    for n in range(N):
        dot = _dot(dp[n], p[n])
        for j in range(T):
            dp[n, j] = (dp[n, j] - dot) * p[n, j]


def softmax_backward_rows_(dp, p):
    """dp <- p * (dp - sum_j dp_j p_j), row by row, in place: dS from dP for P = softmax(S).

    dp and p are 2-D (rows, T)."""
    _compiled(_softmax_backward_rows)(dp, p)

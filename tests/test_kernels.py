"""The compiled kernels (npflux.kernels) against the NumPy path they replace.

The NumPy path is the reference: it is the one checked against PyTorch and
numerical gradients in test_ops.py and test_reference.py when numba is absent
or NPFLUX_NUMBA=0 (.ci/run runs those files that way too). Each kernel
computes every element with the NumPy path's operations in the same order, so:

- GELU (forward and backward) and AdamW are element-wise: equal to the bit.
- Layer norm and softmax's backward also sum along a row, and those sums are
  reassociated (vectorised). A sum of n terms computed in two orders differs
  by at most 2 gamma_n (gamma_n = n u / (1 - n u), Higham, Accuracy and
  Stability, 3.1) times the sum of the terms' magnitudes; each test bounds
  every element by that, carried through the one or two operations after it.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux import kernels, ops, optim, parallel, settings

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed (pip install npflux[fast])")

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**31 - 1)


def gamma(n, dtype):
    u = np.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def both_paths(fn):
    """fn() with the kernels, then with the NumPy path."""
    with settings.override(numba=True):
        fused = fn()
    with settings.override(numba=False):
        plain = fn()
    return fused, plain


@given(rows=st.integers(1, 40), cols=st.integers(1, 70), dtype=dtypes, seed=seeds, threads=st.sampled_from([1, 2]))
def test_gelu_kernels_equal_numpy_to_the_bit(rows, cols, dtype, seed, threads):
    r = np.random.default_rng(seed)
    x = (3 * r.standard_normal((rows, cols))).astype(dtype)
    dy = r.standard_normal((rows, cols)).astype(dtype)

    def run():
        y, cache = ops.gelu_forward(x)
        return y, ops.gelu_backward(dy, cache)

    with settings.override(num_threads=threads):
        (y1, dx1), (y2, dx2) = both_paths(run)
    assert y1.dtype == dx1.dtype == dtype
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)


@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=3), dtype=dtypes, seed=seeds, in_place=st.booleans())
def test_relu_kernels_equal_numpy_to_the_bit(shape, dtype, seed, in_place):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape).astype(dtype)
    x.reshape(-1)[::3] = 0.0  # the subgradient at 0, and a NaN that must pass through both ways
    if x.size > 1:
        x.reshape(-1)[1] = np.nan
    dy = r.standard_normal(shape).astype(dtype)

    def run():
        xx, dd = x.copy(), dy.copy()
        y, cache = ops.relu_forward(xx, out=xx if in_place else None)
        return y.copy(), ops.relu_backward(dd, cache, out=dd if in_place else None)

    (y1, dx1), (y2, dx2) = both_paths(run)
    assert y1.dtype == dx1.dtype == dtype
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)


def test_relu_kernel_leaves_other_layouts_to_numpy():
    """A transposed input or a cache of another dtype takes the NumPy line, as it is."""
    x = np.arange(-3.0, 3.0).reshape(2, 3)
    with settings.override(numba=True):
        y, cache = ops.relu_forward(x.T)
        np.testing.assert_array_equal(y, np.maximum(x.T, 0))
        dy, other = np.ones((2, 3), np.float32), cache.T.astype(np.float64)
        dx = ops.relu_backward(dy, other)
    np.testing.assert_array_equal(dx, np.multiply(dy, other > 0))
    assert dx.dtype == np.float32  # dy's, as the plain line gives it


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_kernel_equals_numpy_to_the_bit(flat, dtype, monkeypatch):
    from npflux.models import GPT, GPTConfig

    monkeypatch.setattr(parallel, "_MIN_SPLIT_ELEMENTS", 1)  # the flat buffer split over the threads too
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    results = []
    for use in (True, False):
        model = GPT(cfg, seed=0, dtype=dtype)
        params = model.params if flat else {k: v.copy() for k, v in model.params.items()}
        opt = optim.AdamW(params, lr=1e-2, weight_decay=0.1, decay_filter=optim.nanogpt_decay)
        assert (opt.flat_params is not None) == flat
        r = np.random.default_rng(1)
        with settings.override(numba=use, num_threads=2):
            for _ in range(5):
                grads = {k: r.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
                opt.step(grads)
        results.append({k: v.copy() for k, v in params.items()})
    for k in results[0]:
        assert results[0][k].dtype == dtype
        np.testing.assert_array_equal(results[0][k], results[1][k])


@given(rows=st.integers(1, 30), C=st.integers(1, 96), dtype=dtypes, seed=seeds, shift=st.sampled_from([0.0, 5.0]))
def test_layernorm_kernels_within_the_reordered_sums_bound(rows, C, dtype, seed, shift):
    r = np.random.default_rng(seed)
    x = (shift + r.standard_normal((rows, C))).astype(dtype)  # shift: rows far from zero mean
    g, b = r.standard_normal(C).astype(dtype), r.standard_normal(C).astype(dtype)
    dy = r.standard_normal((rows, C)).astype(dtype)

    def run():
        y, cache = ops.layernorm_forward(x, g, b, 1e-5)
        return (y, cache[0], cache[1]) + tuple(ops.layernorm_backward(dy, cache))

    (y1, xh1, rs1, dx1, dg1, db1), (y2, xh2, rs2, dx2, dg2, db2) = both_paths(run)
    for a in (y1, xh1, rs1, dx1, dg1, db1):
        assert a.dtype == dtype
    u = np.finfo(dtype).eps / 2
    x64, g64, dy64 = (a.astype(np.float64) for a in (x, g, dy))
    rstd = rs2.astype(np.float64)[:, None]
    # mean: a sum of C terms of size |x|, then the centred values are off by that much;
    # the variance's sum of C squares is off by 2 gamma_C of itself, so rstd by about gamma_C.
    mean_err = 2 * gamma(C, dtype) * np.abs(x64).mean(axis=1, keepdims=True)
    xhat_bound = (mean_err + 4 * u * np.abs(x64)) * rstd + 2 * gamma(C, dtype) * np.abs(xh2)
    assert np.all(np.abs(xh1 - xh2) <= 2 * xhat_bound + 1e-30)
    # y = xhat gamma + beta: xhat's error times gamma, and the rounding of the product and the sum
    # (relative to the terms: beta may cancel xhat gamma)
    assert np.all(np.abs(y1 - y2) <= 2 * xhat_bound * np.abs(g64) + 4 * u * (np.abs(xh2 * g64) + np.abs(b)) + 1e-30)
    # dx = rstd (g - mean(g) - xhat mean(g xhat)): each mean a sum of C terms, and xhat as above
    gy = np.abs(dy64 * g64)
    mean_g_err = 2 * gamma(C, dtype) * gy.mean(axis=1, keepdims=True)
    mean_gx = np.abs(dy64 * g64 * xh2).mean(axis=1, keepdims=True)
    dx_bound = rstd * (mean_g_err + 2 * gamma(C, dtype) * mean_gx * np.abs(xh2) + xhat_bound * mean_gx
                       + 4 * u * (gy + gy.mean(axis=1, keepdims=True) + np.abs(xh2) * mean_gx))
    dx_bound += 2 * gamma(C, dtype) * np.abs(dx2)  # through rstd
    assert np.all(np.abs(dx1 - dx2) <= 2 * dx_bound + 1e-30)
    # dgamma, dbeta: sums over the rows (the kernel's in float64, NumPy's in dtype)
    assert np.all(np.abs(db1 - db2) <= 2 * gamma(rows, dtype) * np.abs(dy64).sum(0) + 4 * u * np.abs(db2))
    dg_bound = gamma(rows, dtype) * np.abs(dy64 * xh2).sum(0) + (np.abs(dy64) * np.abs(xh1 - xh2)).sum(0)
    assert np.all(np.abs(dg1 - dg2) <= 2 * dg_bound + 4 * u * np.abs(dg2) + 1e-30)


@given(rows=st.integers(1, 50), T=st.integers(1, 130), dtype=dtypes, seed=seeds)
def test_softmax_backward_kernel_within_the_reordered_sum_bound(rows, T, dtype, seed):
    r = np.random.default_rng(seed)
    s = 3 * r.standard_normal((rows, T))
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    dp = r.standard_normal((rows, T)).astype(dtype)
    fused = dp.copy()
    kernels.softmax_backward_rows_(fused, p)
    plain = (dp - (dp * p).sum(axis=1, keepdims=True)) * p
    u = np.finfo(dtype).eps / 2
    dot_terms = np.abs(dp.astype(np.float64) * p).sum(axis=1, keepdims=True)
    bound = p * (2 * 2 * gamma(T, dtype) * dot_terms) + 4 * u * np.abs(plain)
    assert fused.dtype == dtype
    assert np.all(np.abs(fused - plain) <= 2 * bound + 1e-30)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_backward_with_the_kernel_matches_numpy_path(dtype):
    r = np.random.default_rng(0)
    q, k, v, dout = (r.standard_normal((2, 3, 17, 8)).astype(dtype) for _ in range(4))

    def run():
        out, cache = ops.attention_forward(q, k, v, causal=True)
        return ops.attention_backward(dout, cache)

    tol = {np.float32: 1e-5, np.float64: 1e-13}[dtype]  # sums of 17 terms in another order, through two products
    for a, b in zip(*both_paths(run)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_kernels_off_means_never_called(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran with NPFLUX_NUMBA off")

    for name in ("layernorm_forward_rows", "layernorm_backward_rows", "adamw_update",
                 "gelu_forward_rows", "gelu_backward_rows", "softmax_rows_", "softmax_backward_rows_",
                 "relu_", "relu_backward_"):
        monkeypatch.setattr(kernels, name, boom)
    monkeypatch.setenv("NPFLUX_NUMBA", "0")
    x = np.random.default_rng(0).standard_normal((4, 6))
    y, c = ops.layernorm_forward(x, np.ones(6), np.zeros(6))
    ops.layernorm_backward(x, c)
    y, c = ops.gelu_forward(x)
    ops.gelu_backward(x, c)
    y, c = ops.relu_forward(x)
    ops.relu_backward(x, c)
    q = x.reshape(1, 1, 4, 6)
    out, c = ops.attention_forward(q, q, q, causal=True)
    ops.attention_backward(q, c)
    optim.AdamW({"w": x.copy()}).step({"w": x})


def test_use_for_only_numpy_float_arrays(monkeypatch):
    with settings.override(numba=True):
        assert kernels.use_for(np.zeros(3, np.float32), np.zeros(3))
        assert not kernels.use_for(np.zeros(3, np.float16))
        assert not kernels.use_for(np.zeros(3, np.int64))
        assert not kernels.use_for([1.0, 2.0])
        monkeypatch.setattr(kernels, "_NUMBA", False)  # as without numba installed
        assert not kernels.use_for(np.zeros(3))
    with settings.override(numba=False):
        assert not kernels.use_for(np.zeros(3))


def test_bad_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("NPFLUX_NUMBA", "maybe")
    with pytest.raises(ValueError, match="NPFLUX_NUMBA"):
        kernels.use_for(np.zeros(3))


def test_nan_still_propagates():
    # no fastmath flag that assumes finite values: a diverged input stays visible
    x = np.array([[1.0, np.nan, 2.0]], dtype=np.float32)
    with settings.override(numba=True):
        y, c = ops.layernorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
        assert np.isnan(y).all()
        g, _ = ops.gelu_forward(x)
        assert np.isnan(g[0, 1]) and np.isfinite(g[0, [0, 2]]).all()

@given(rows=st.integers(1, 50), T=st.integers(1, 130), dtype=dtypes, seed=seeds, causal=st.booleans())
def test_softmax_forward_kernel_within_the_reordered_sum_bound(rows, T, dtype, seed, causal):
    r = np.random.default_rng(seed)
    s = (3 * r.standard_normal((rows, T))).astype(dtype)
    bias = None
    if causal:  # rows are (query) rows of a causal mask, repeated
        Tq = min(T, 7)
        bias = np.where(np.tri(Tq, T, k=T - Tq, dtype=bool), 0, -np.inf).astype(dtype)
    fused = s.copy()
    kernels.softmax_rows_(fused, bias)
    plain = s + bias[np.arange(rows) % bias.shape[0]] if causal else s.copy()
    plain -= plain.max(axis=1, keepdims=True)  # the shift is exact either way: equal exponentials
    np.exp(plain, out=plain)
    plain /= plain.sum(axis=1, keepdims=True)
    # a sum of T positive terms in two orders: within 2 gamma_T of each other, relatively
    assert fused.dtype == dtype
    assert np.all(np.abs(fused - plain) <= (2 * 2 * gamma(T, dtype) + 4 * np.finfo(dtype).eps) * plain)


def test_softmax_forward_kernel_rows_that_see_nothing_get_zeros():
    s = np.array([[-np.inf, -np.inf], [0.0, 1.0]])
    kernels.softmax_rows_(s, may_be_empty=True)
    np.testing.assert_array_equal(s[0], [0.0, 0.0])
    np.testing.assert_allclose(s[1], np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum(), rtol=1e-15)


@pytest.mark.parametrize("Tq,Tk,causal", [(17, 17, True), (5, 9, False), (9, 5, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_forward_with_the_kernel_matches_numpy_path(Tq, Tk, causal, dtype):
    r = np.random.default_rng(0)
    q = r.standard_normal((2, 3, Tq, 8)).astype(dtype)
    k, v = (r.standard_normal((2, 3, Tk, 8)).astype(dtype) for _ in range(2))
    (o1, c1), (o2, c2) = both_paths(lambda: ops.attention_forward(q, k, v, causal=causal))
    tol = {np.float32: 1e-5, np.float64: 1e-13}[dtype]
    assert o1.dtype == dtype
    np.testing.assert_allclose(c1[3], c2[3], rtol=tol, atol=0)  # the weights: relative, zeros exact
    np.testing.assert_allclose(o1, o2, rtol=tol, atol=tol * np.abs(o2).max())

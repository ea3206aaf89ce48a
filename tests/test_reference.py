"""The fast ops equal the textbook ones in npflux.ops.reference, and the textbook ones are right.

Each pair computes the same function with the floating-point operations in
another order (chunks, threads, in-place regrouping, sums as matrix-vector
products), so they agree to rounding, not to the bit. Bound: every value here
is a sum or product chain of at most n = max(C, T, D) terms of O(1) inputs;
each computed sum lies within gamma_n = n u / (1 - n u) of the exact one
(Higham, 3.1), times the sum of the terms' magnitudes, so two orders differ by
at most about 2 n u times that magnitude. With n <= 64 and u = 2^-53 that is
1.4e-14 per unit of magnitude; the norm-wise tolerance 1e-12 allows a
magnitude-to-result ratio (condition) of about 70, far above what these
O(1) random inputs produce. float32 (u = 2^-24): 2 * 64 * 6e-8 = 7.6e-6 per
unit, so 1e-4 norm-wise.
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux import ops, parallel
from npflux.gradcheck import check_op, rel_error
from npflux.ops import reference as ref

TOL = {np.float64: 1e-12, np.float32: 1e-4}
dims = st.integers(1, 64)
small = st.integers(1, 6)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([np.float64, np.float32])


def randn(r, *shape, dtype=np.float64):
    return r.standard_normal(shape).astype(dtype)


def close(a, b, dtype):
    assert rel_error(a, b) <= TOL[dtype], rel_error(a, b)


@contextlib.contextmanager
def patched(module, **values):
    """Module-level settings of ``module`` set for a block and put back after (hypothesis reuses fixtures,
    so monkeypatch cannot scope them per example)."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def split_over(threads):
    """Run whole (1) or split over worker threads with chunks forced small (3)."""
    return patched(parallel, _NUM_THREADS=threads, _MIN_SPLIT_ELEMENTS=1)


threads_param = pytest.mark.parametrize("threads", [1, 3])


@threads_param
@given(N=small, C=dims, dtype=dtypes, seed=seeds)
def test_gelu_fast_equals_textbook(threads, N, C, dtype, seed):
    with split_over(threads):
        r = np.random.default_rng(seed)
        x, dy = 3 * randn(r, N, C, dtype=dtype), randn(r, N, C, dtype=dtype)
        y, cache = ops.gelu_forward(x)
        y_ref, cache_ref = ref.gelu_forward(x)
        assert y.dtype == dtype
        # gelu(x) = 0.5 x + 0.5 x tanh(u): for x below about -2 the two terms nearly cancel, so both
        # versions are exact only to rounding of the TERMS, about u |x|, not of the small result; the
        # norm-wise error is measured against that magnitude (rel_error's floor). Likewise each
        # derivative term is bounded by |dy| (1 + |x| du/dx).
        assert rel_error(y, y_ref, floor=np.linalg.norm(x)) <= TOL[dtype]
        dx = ops.gelu_backward(dy, cache)
        assert dx.dtype == dtype
        terms = np.linalg.norm(dy * (1 + np.abs(x) * (1 + 0.135 * x * x)))
        assert rel_error(dx, ref.gelu_backward(dy, cache_ref), floor=terms) <= TOL[dtype]
        close(ops.gelu_backward(dy.copy(), cache, out=None), dx, dtype)
        mine = dy.copy()
        assert ops.gelu_backward(mine, cache, out=mine) is mine  # in place over the caller's dy
        np.testing.assert_array_equal(mine, dx)  # the same arithmetic on the same values: bit for bit


@threads_param
@given(B=small, T=small, C=dims, dtype=dtypes, seed=seeds)
def test_layernorm_fast_equals_textbook(threads, B, T, C, dtype, seed):
    with split_over(threads):
        r = np.random.default_rng(seed)
        x, dy = randn(r, B, T, C, dtype=dtype) + 0.5, randn(r, B, T, C, dtype=dtype)
        gamma, beta = randn(r, C, dtype=dtype), randn(r, C, dtype=dtype)
        y, cache = ops.layernorm_forward(x, gamma, beta)
        y_ref, cache_ref = ref.layernorm_forward(x, gamma, beta)
        close(y, y_ref, dtype)
        for got, want in zip(ops.layernorm_backward(dy, cache), ref.layernorm_backward(dy, cache_ref)):
            assert got.dtype == dtype
            close(got, want, dtype)


@given(N=small, V=dims, dtype=dtypes, seed=seeds)
def test_softmax_and_cross_entropy_fast_equal_textbook(N, V, dtype, seed):
    r = np.random.default_rng(seed)
    z, dy = 2 * randn(r, N, V, dtype=dtype), randn(r, N, V, dtype=dtype)
    y, c = ops.softmax_forward(z)
    y_ref, c_ref = ref.softmax_forward(z)
    close(y, y_ref, dtype)
    close(ops.softmax_backward(dy, c), ref.softmax_backward(dy, c_ref), dtype)
    t = r.integers(0, V, N)
    loss, c = ops.cross_entropy_forward(z, t)
    loss_ref, c_ref = ref.cross_entropy_forward(z, t)
    close(loss, loss_ref, dtype)
    close(ops.cross_entropy_backward(1.0, c), ref.cross_entropy_backward(1.0, c_ref), dtype)


@threads_param
@given(B=small, H=st.integers(1, 3), T=st.integers(1, 24), D=st.integers(1, 16), causal=st.booleans(),
       dtype=dtypes, seed=seeds)
def test_attention_fast_equals_textbook(threads, B, H, T, D, causal, dtype, seed):
    with split_over(threads):
        r = np.random.default_rng(seed)
        q, k, v, dout = (randn(r, B, H, T, D, dtype=dtype) for _ in range(4))
        out, cache = ops.attention_forward(q, k, v, causal=causal)
        out_ref, cache_ref = ref.attention_forward(q, k, v, causal=causal)
        close(out, out_ref, dtype)
        for got, want in zip(ops.attention_backward(dout, cache), ref.attention_backward(dout, cache_ref)):
            assert got.dtype == dtype
            close(got, want, dtype)


@pytest.mark.parametrize("name", ["gelu", "layernorm", "softmax", "attention"])
def test_textbook_ops_pass_the_numerical_gradient_check(name):
    """The reference versions are right on their own, not just equal to the fast ones."""
    r = np.random.default_rng(5)
    if name == "gelu":
        errs = check_op(ref.gelu_forward, ref.gelu_backward, {"x": randn(r, 3, 5)})
    elif name == "layernorm":
        errs = check_op(ref.layernorm_forward, ref.layernorm_backward,
                        {"x": randn(r, 2, 3, 5), "gamma": randn(r, 5), "beta": randn(r, 5)})
    elif name == "softmax":
        errs = check_op(ref.softmax_forward, ref.softmax_backward, {"x": randn(r, 3, 5)})
    else:
        errs = check_op(ref.attention_forward, ref.attention_backward,
                        {"q": randn(r, 2, 2, 4, 3), "k": randn(r, 2, 2, 4, 3), "v": randn(r, 2, 2, 4, 3)},
                        kwargs={"causal": True})
    assert max(errs.values()) < 1e-7, errs


def small_causal_blocks(block):
    """The block-causal path at test sizes: blocks of ``block`` rows from T = 2 on."""
    from npflux.ops import attention

    return patched(attention, _CAUSAL_BLOCK=block, _BLOCK_CAUSAL_MIN=2)


@threads_param
@given(B=small, H=st.integers(1, 3), T=st.integers(2, 40), D=st.integers(1, 16), block=st.integers(1, 16),
       dtype=dtypes, seed=seeds)
def test_block_causal_attention_equals_textbook(threads, B, H, T, D, block, dtype, seed):
    """Long causal self-attention skips the blocks above the diagonal; the result is the full one's."""
    r = np.random.default_rng(seed)
    q, k, v, dout = (randn(r, B, H, T, D, dtype=dtype) for _ in range(4))
    with split_over(threads), small_causal_blocks(block):
        out, cache = ops.attention_forward(q, k, v, causal=True)
        assert cache[5] == block  # the block path ran
        grads = ops.attention_backward(dout, cache)
    out_ref, cache_ref = ref.attention_forward(q, k, v, causal=True)
    close(out, out_ref, dtype)
    close(cache[3], cache_ref[3], dtype)  # the kept weights: zeros above the diagonal, as the full ones
    assert not np.triu(cache[3], k=1).any()
    for got, want in zip(grads, ref.attention_backward(dout, cache_ref)):
        assert got.dtype == dtype
        close(got, want, dtype)


def test_block_causal_attention_passes_the_numerical_gradient_check():
    r = np.random.default_rng(6)
    with small_causal_blocks(2):
        errs = check_op(ops.attention_forward, ops.attention_backward,
                        {"q": randn(r, 2, 2, 5, 3), "k": randn(r, 2, 2, 5, 3), "v": randn(r, 2, 2, 5, 3)},
                        kwargs={"causal": True})
    assert max(errs.values()) < 1e-7, errs

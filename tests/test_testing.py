"""npflux.testing: its assertions pass correct layers and catch wrong ones.

A checker that never fails proves nothing, so every assertion here is run on
a correct op (npflux's own) and on one broken the way hand-written backward
passes break: off by a factor 2, a term missing, a gradient not returned, a
silent float64 upcast, a different function than torch's. The docstring's
example test is extracted and run, so it cannot rot.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npflux.testing as nt
from npflux import ops
from npflux.backend import get_array_module, get_backend, to_numpy
from npflux.gradcheck import GradcheckError
from npflux.nn import LayerNorm, Linear, Module
from npflux.testing import (
    UPSTREAM_SEED_BASE,
    assert_gradients_match,
    assert_matches_torch,
    assert_module_gradients_match,
    assert_module_matches_torch,
    assert_module_preserves_dtype,
    assert_preserves_dtype,
    random_inputs,
    randomize_parameters,
)

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------
# The module docstring's examples run
# --------------------------------------------------------------------------
def _docstring_tests():
    """The literal blocks (``::``) of npflux.testing's docstring that define a test."""
    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", nt.__doc__)
    return [textwrap.dedent(b) for b in blocks if "def test_" in b]


def test_docstring_examples_run(torch):
    examples = _docstring_tests()
    assert len(examples) == 2
    for code in examples:
        assert len(code.strip().splitlines()) <= 20
        namespace = {}
        exec(compile(code, "npflux.testing.__doc__", "exec"), namespace)
        tests = [f for name, f in namespace.items() if name.startswith("test_")]
        assert len(tests) == 1
        tests[0]()


def test_docstring_example_catches_a_bug(torch):
    """The example's layer with a wrong gradient for ``a`` fails its own test."""
    namespace = {}
    exec(_docstring_tests()[0], namespace)
    right = namespace["scale_shift_backward"]

    def wrong(dy, cache):
        dx, da, db = right(dy, cache)
        return dx, da + db, db  # a term too many

    namespace["scale_shift_backward"] = wrong
    with pytest.raises(AssertionError, match=r"gradient of a differs"):
        namespace["test_scale_shift"]()


# --------------------------------------------------------------------------
# Inputs and seeds
# --------------------------------------------------------------------------
def test_random_inputs_shapes_order_dtype_and_passthrough():
    ids = np.array([[1, 2], [0, 1]])
    inputs = random_inputs({"x": (2, 3), "ids": ids, "b": 4}, seed=3)
    assert list(inputs) == ["x", "ids", "b"]
    assert inputs["x"].shape == (2, 3) and inputs["b"].shape == (4,)
    assert inputs["x"].dtype == np.float64 and inputs["ids"].dtype == ids.dtype
    assert random_inputs({"x": 2}, dtype=np.float32)["x"].dtype == np.float32
    again = random_inputs({"x": (2, 3), "ids": ids, "b": 4}, seed=3)
    np.testing.assert_array_equal(to_numpy(again["x"]), to_numpy(inputs["x"]))
    other = random_inputs({"x": (2, 3)}, seed=4)
    assert not np.array_equal(to_numpy(other["x"]), to_numpy(inputs["x"]))


@given(seed=st.integers(0, 2**40 - 1), shape=shapes)
def test_upstream_gradient_never_equals_a_seeded_input(seed, shape):
    """The stream the checkers draw dout from is not the stream of any input seed below 2**40."""
    x = np.random.default_rng(seed).standard_normal(shape)
    dout = nt._upstream_rng(seed, "test").standard_normal(shape)
    assert not np.allclose(x, dout) and not np.allclose(x, -dout)


def test_layernorm_input_of_seed_0_passes():
    """The README's check_op example (x from seed 0, gain 1, bias 0): the helper's upstream gradient
    is not x itself, so the correct backward passes with its usual ~1e-10."""
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    errs = assert_gradients_match(ops.layernorm_forward, ops.layernorm_backward,
                                  {"x": get_backend().asarray(x), "gamma": get_backend().asarray(np.ones(8)),
                                   "beta": get_backend().asarray(np.zeros(8))})
    assert max(errs.values()) < 1e-8


@pytest.mark.parametrize("seed", [-1, 2**40, 1.5, True, "0"])
def test_bad_seeds_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        random_inputs({"x": 2}, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        assert_gradients_match(ops.gelu_forward, ops.gelu_backward, random_inputs({"x": 2}), seed=seed)


def test_randomize_parameters():
    m = LayerNorm(5, dtype="float64")
    assert randomize_parameters(m, seed=1) is m
    w = to_numpy(m.params["weight"])
    assert w.dtype == np.float64 and not np.allclose(w, 1.0) and np.std(w) > 0
    m2 = randomize_parameters(LayerNorm(5, dtype="float64"), seed=1)
    np.testing.assert_array_equal(to_numpy(m2.params["weight"]), w)


def test_importable_without_pytest_or_torch():
    """npflux.testing imports neither at import time; outside pytest and without torch the torch
    check raises ImportError rather than failing obscurely."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        sys.modules["pytest"] = None
        sys.modules["hypothesis"] = None
        import numpy as np
        import npflux.testing as nt
        from npflux import ops
        nt.assert_gradients_match(ops.gelu_forward, ops.gelu_backward, nt.random_inputs({"x": (2, 3)}))
        try:
            nt.assert_matches_torch(ops.gelu_forward, ops.gelu_backward, nt.random_inputs({"x": 3}),
                                    lambda x: x, dtype=np.float64)
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: npflux.testing: comparing with PyTorch needs torch" in out.stdout


# --------------------------------------------------------------------------
# Numerical gradients: correct ops pass, broken ones fail with a table
# --------------------------------------------------------------------------
@given(shape=shapes, C=st.sampled_from([3, 4, 7]), seed=seeds)
def test_correct_ops_pass(shape, C, seed):
    r = seed % 1000
    inputs = random_inputs({"x": shape + (C,), "gamma": C, "beta": C}, seed=r)
    errs = assert_gradients_match(ops.layernorm_forward, ops.layernorm_backward, inputs, seed=r)
    assert set(errs) == {"x", "gamma", "beta"}
    x = random_inputs({"x": shape}, seed=r)["x"].clip(-3, None)  # below -3 see test_ops.test_gelu_gradcheck
    assert_gradients_match(ops.gelu_forward, ops.gelu_backward, {"x": x}, seed=r)
    assert_gradients_match(ops.softmax_forward, ops.softmax_backward, random_inputs({"x": shape}, seed=r), seed=r)
    lin = random_inputs({"x": shape + (C,), "w": (C, 2)}, seed=r)
    assert set(assert_gradients_match(ops.linear_forward, ops.linear_backward, lin, seed=r)) == {"x", "w"}


def _gelu_backward_times_2(dy, cache):
    return 2 * ops.gelu_backward(dy, cache)


@given(shape=shapes, seed=seeds)
def test_backward_off_by_a_factor_2_fails(shape, seed):
    inputs = random_inputs({"x": shape}, seed=seed % 1000)
    with pytest.raises(AssertionError, match=r"gradient of x differs"):
        assert_gradients_match(ops.gelu_forward, _gelu_backward_times_2, inputs)


def _swish_forward(x):
    s = 1 / (1 + get_array_module(x).exp(-x))
    return x * s, (x, s)


def _swish_backward(dy, cache):
    x, s = cache
    return dy * (s + x * s * (1 - s))


def _swish_backward_missing_a_term(dy, cache):
    x, s = cache
    return dy * s  # forgot the derivative of the sigmoid


def test_missing_term_fails_and_the_right_one_passes():
    inputs = random_inputs({"x": (3, 5)}, seed=2)
    assert_gradients_match(_swish_forward, _swish_backward, inputs)
    with pytest.raises(AssertionError) as info:
        assert_gradients_match(_swish_forward, _swish_backward_missing_a_term, inputs)
    msg = str(info.value)
    assert "_swish_backward_missing_a_term" in msg and "gradient of x differs" in msg
    assert re.search(r"x\s+\d\.\d\de[-+]\d\d\s+FAIL", msg)


def test_table_names_the_wrong_gradient_only():
    """Layer norm with dgamma doubled: gamma FAILs, x and beta are listed as ok."""
    def backward(dy, cache):
        dx, dgamma, dbeta = ops.layernorm_backward(dy, cache)
        return dx, 2 * dgamma, dbeta

    inputs = random_inputs({"x": (2, 3, 4), "gamma": 4, "beta": 4}, seed=5)
    with pytest.raises(AssertionError) as info:
        assert_gradients_match(ops.layernorm_forward, backward, inputs)
    lines = str(info.value).splitlines()
    assert "gradient of gamma differs" in lines[0] and "1e-07" in lines[0]
    assert lines[1].split() == ["gradient", "of", "rel", "error", "result"]
    rows = {ln.split()[0]: ln.split()[-1] for ln in lines[2:]}
    assert rows == {"x": "ok", "gamma": "FAIL", "beta": "ok"}


def test_a_gradient_not_returned_fails():
    def backward(dy, cache):
        dx, dgamma, _ = ops.layernorm_backward(dy, cache)
        return dx, dgamma, None  # dbeta forgotten

    inputs = random_inputs({"x": (2, 4), "gamma": 4, "beta": 4})
    with pytest.raises(AssertionError, match=r"no gradient was checked for \['beta'\]"):
        assert_gradients_match(ops.layernorm_forward, backward, inputs)


def test_nan_gradient_fails():
    with pytest.raises(AssertionError, match="FAIL"):
        assert_gradients_match(ops.gelu_forward, lambda dy, cache: dy * np.nan, random_inputs({"x": 3}))


def test_integer_inputs_and_kwargs_and_grad_names():
    ids = np.array([[1, 1, 3], [0, 2, 1]])
    inputs = random_inputs({"ids": ids, "table": (4, 3)})
    assert set(assert_gradients_match(ops.embedding_forward, ops.embedding_backward, inputs)) == {"table"}
    ce = random_inputs({"logits": (2, 3, 5), "targets": np.array([[0, 4, -1], [2, -1, 1]])})
    assert_gradients_match(ops.cross_entropy_forward, ops.cross_entropy_backward, ce, kwargs={"ignore_index": -1})
    qkv = random_inputs({"q": (1, 2, 3, 2), "k": (1, 2, 4, 2), "v": (1, 2, 4, 2)})
    assert set(assert_gradients_match(ops.attention_forward, ops.attention_backward, qkv,
                                      kwargs={"causal": True}, grad_names=["q", "k", "v"])) == {"q", "k", "v"}


def test_dropout_with_a_reseeded_rng_passes():
    from npflux.backend import backend_of

    fwd = lambda x: ops.dropout_forward(x, 0.4, backend_of(x).rng(3))  # noqa: E731  (the input's device)
    assert_gradients_match(fwd, ops.dropout_backward, random_inputs({"x": (4, 5)}))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_refused_with_a_clear_message(dtype):
    inputs = random_inputs({"x": (2, 3)}, dtype=dtype)
    with pytest.raises(GradcheckError, match=r"'x' is float(32|16); numerical gradients need float64.*astype"):
        assert_gradients_match(ops.gelu_forward, ops.gelu_backward, inputs)
    with pytest.raises(TypeError, match=r"parameter weight' is float(32|16).*dtype='float64'"):
        assert_module_gradients_match(LayerNorm(3, dtype=dtype), random_inputs({"x": (2, 3)}))


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
class ScaleShift(Module):
    """y = a * x + b per feature; ``forget_b`` drops b's gradient, the classic slip."""

    def __init__(self, dim, dtype=None, forget_b=False):
        super().__init__(dtype=dtype)
        self.forget_b = forget_b
        self.add_param("a", np.ones(dim))
        self.add_param("b", np.zeros(dim))

    def forward(self, x):
        self.x = x
        return self.p["a"] * x + self.p["b"]

    def backward(self, dy):
        rows = tuple(range(dy.ndim - 1))
        self.g["a"] += (self.x * dy).sum(rows)
        if not self.forget_b:
            self.g["b"] += dy.sum(rows)
        return self.p["a"] * dy


@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple), C=st.integers(1, 5), seed=seeds)
def test_module_check_passes_and_fails(shape, C, seed):
    r = seed % 1000
    inputs = random_inputs({"x": shape + (C,)}, seed=r)
    good = randomize_parameters(ScaleShift(C, dtype="float64"), seed=r)
    assert set(assert_module_gradients_match(good, inputs, seed=r)) == {"x", "a", "b"}
    bad = randomize_parameters(ScaleShift(C, dtype="float64", forget_b=True), seed=r)
    with pytest.raises(AssertionError, match=r"ScaleShift.backward: gradient of b differs"):
        assert_module_gradients_match(bad, inputs, seed=r)


def test_npflux_modules_pass():
    x = random_inputs({"x": (2, 3, 6)})
    errs = assert_module_gradients_match(randomize_parameters(LayerNorm(6, dtype="float64")), x)
    assert set(errs) == {"x", "weight", "bias"}
    assert_module_gradients_match(randomize_parameters(Linear(6, 4, dtype="float64")), x)


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------
DTYPES = [np.float64, np.float32]


def _torch_layernorm(torch):
    return lambda x, gamma, beta: torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes, C=st.sampled_from([3, 4, 7]), seed=seeds)
def test_torch_correct_ops_pass(torch, dtype, shape, C, seed):
    inputs = random_inputs({"x": shape + (C,), "gamma": C, "beta": C}, seed=seed % 1000)
    out, grads = assert_matches_torch(ops.layernorm_forward, ops.layernorm_backward, inputs,
                                      _torch_layernorm(torch), dtype=dtype, seed=seed % 1000)
    assert out.dtype == dtype and set(grads) == {"x", "gamma", "beta"}
    # (GELU over shape + (C,), never one element: gelu'(x) = 0 at x = -0.7518, where it is the difference of
    # two terms ~0.18, so float32 rounding is amplified ~230x there; a single such element as the whole
    # gradient made the float32 comparison measure that conditioning, not the backward: x = -0.754 gave 1.5e-5)
    assert_matches_torch(ops.gelu_forward, ops.gelu_backward, random_inputs({"x": shape + (C,)}, seed=seed % 1000),
                         lambda x: torch.nn.functional.gelu(x, approximate="tanh"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_different_function_fails(torch, dtype):
    """npflux's gelu is the tanh form: against torch's exact (erf) gelu it must fail, forward first."""
    inputs = random_inputs({"x": (3, 4)})
    with pytest.raises(AssertionError) as info:
        assert_matches_torch(ops.gelu_forward, ops.gelu_backward, inputs, torch.nn.functional.gelu, dtype=dtype)
    msg = str(info.value)
    assert "forward, dx differ from PyTorch" in msg and np.dtype(dtype).name in msg


@pytest.mark.parametrize("dtype,factor", [(np.float64, 1 + 1e-8), (np.float32, 1 + 1e-3)])
def test_torch_slightly_wrong_backward_fails(torch, dtype, factor):
    """A gradient off by 1e-8 relative fails in float64 (tol 1e-10); 1e-3 fails in float32 (tol 1e-5),
    including the float32 fallback against torch's float64 result."""
    def backward(dy, cache):
        dx, dgamma, dbeta = ops.layernorm_backward(dy, cache)
        return dx, dgamma, dbeta * factor

    inputs = random_inputs({"x": (2, 3, 4), "gamma": 4, "beta": 4})
    with pytest.raises(AssertionError, match=r"dbeta differs from PyTorch") as info:
        assert_matches_torch(ops.layernorm_forward, backward, inputs, _torch_layernorm(torch), dtype=dtype)
    rows = {ln.split()[0]: ln.split()[-1] for ln in str(info.value).splitlines()[2:] if ln.startswith("  d")}
    assert rows == {"dx": "ok", "dgamma": "ok", "dbeta": "FAIL"}


def test_torch_float32_ill_conditioned_passes(torch):
    """Huge logits: torch accumulates float32 in float64; npflux passes by matching the float64 result."""
    r = np.random.default_rng(0)
    logits = 1e3 * r.choice([-1.0, 1.0], size=(3, 6)) + r.standard_normal((3, 6))
    assert_matches_torch(ops.softmax_forward, ops.softmax_backward, {"x": get_backend().asarray(logits)},
                         lambda x: torch.softmax(x, -1), dtype=np.float32)


def test_torch_upcast_fails(torch):
    def forward(x):
        return x.astype(np.float64) * 2, None

    with pytest.raises(AssertionError, match=r"forward/<lambda>: forward is float64 for float32 inputs"):
        assert_matches_torch(forward, lambda dy, c: 2 * dy, random_inputs({"x": 3}), lambda x: 2 * x,
                             dtype=np.float32)


def test_torch_positional_inputs_kwargs_and_int_inputs(torch):
    r = np.random.default_rng(1)
    be = get_backend()
    x, w = be.asarray(r.standard_normal((2, 3))), be.asarray(r.standard_normal((3, 4)))
    assert_matches_torch(ops.linear_forward, ops.linear_backward, (x, w), lambda x, w: x @ w, dtype=np.float64)
    ce = {"logits": be.asarray(r.standard_normal((4, 5))), "targets": be.asarray(np.array([1, -1, 4, 0]))}
    out, grads = assert_matches_torch(
        ops.cross_entropy_forward, ops.cross_entropy_backward, ce,
        lambda logits, targets, ignore_index: torch.nn.functional.cross_entropy(logits, targets,
                                                                                ignore_index=ignore_index),
        dtype=np.float32, kwargs={"ignore_index": -1})
    assert out.shape == () and set(grads) == {"logits"}


def test_torch_unknown_dtype_needs_rtol(torch):
    with pytest.raises(ValueError, match="rtol"):
        assert_matches_torch(ops.gelu_forward, ops.gelu_backward, random_inputs({"x": 3}), lambda x: x,
                             dtype=np.float16)


def _torch_ln_module(torch):
    def ref(P, x):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), P["weight"], P["bias"], 1e-5)
    return ref


class BadLayerNorm(LayerNorm):
    """Adds dweight twice."""

    def backward(self, dout):
        before = self.g["weight"].copy()
        dx = super().backward(dout)
        self.g["weight"] += self.g["weight"] - before
        return dx


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_torch(torch, dtype):
    x = random_inputs({"x": (2, 3, 5)})
    m = randomize_parameters(LayerNorm(5, dtype=dtype))
    out, (dx,) = assert_module_matches_torch(m, x, _torch_ln_module(torch))
    assert out.dtype == dx.dtype == dtype
    bad = randomize_parameters(BadLayerNorm(5, dtype=dtype))
    with pytest.raises(AssertionError, match=r"BadLayerNorm: weight differs from PyTorch"):
        assert_module_matches_torch(bad, x, _torch_ln_module(torch))


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npflux_ops_preserve_dtype(dtype):
    inputs = random_inputs({"x": (2, 3, 5), "gamma": 5, "beta": 5})
    out, grads = assert_preserves_dtype(ops.layernorm_forward, ops.layernorm_backward, inputs, dtype)
    assert out.dtype == dtype and len(grads) == 3
    assert_preserves_dtype(ops.gelu_forward, ops.gelu_backward, random_inputs({"x": 4}), dtype)
    assert_preserves_dtype(ops.cross_entropy_forward, ops.cross_entropy_backward,
                           random_inputs({"logits": (3, 4), "targets": np.array([0, 3, 1])}), dtype)


def test_upcast_in_forward_or_backward_fails():
    inputs = random_inputs({"x": (2, 3)})

    def upcasting_forward(x):
        return x.astype(np.float64) * 2, None

    with pytest.raises(AssertionError, match=r"forward not float32"):
        assert_preserves_dtype(upcasting_forward, lambda dy, c: 2 * dy, inputs, np.float32)

    def upcasting_backward(dy, cache):
        return ops.gelu_backward(dy, cache).astype(np.float64)

    with pytest.raises(AssertionError, match=r"gradient 0 not float32") as info:
        assert_preserves_dtype(ops.gelu_forward, upcasting_backward, inputs, np.float32)
    assert re.search(r"gradient 0\s+float64\s+FAIL", str(info.value))


class UpcastingScaleShift(ScaleShift):
    def backward(self, dy):
        super().backward(dy)
        return (self.p["a"] * dy).astype(np.float64)


def test_module_preserves_dtype():
    inputs = random_inputs({"x": (2, 3, 4)})
    out, (dx,) = assert_module_preserves_dtype(randomize_parameters(LayerNorm(4, dtype="float32")), inputs)
    assert out.dtype == dx.dtype == np.float32
    with pytest.raises(AssertionError, match=r"input gradient 0 not float32"):
        assert_module_preserves_dtype(UpcastingScaleShift(4, dtype="float32"), inputs)

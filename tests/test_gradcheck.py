"""The gradient checker itself: it must pass correct backwards and catch wrong ones."""
from __future__ import annotations

import numpy as np
import pytest

from npflux import gradcheck as gc
from npflux.gradcheck import (
    GradcheckError,
    check_module,
    check_op,
    directional_error,
    numerical_gradient,
    rel_error,
)

from conftest import dev


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------
# numerical_gradient
# --------------------------------------------------------------------------
def test_numerical_gradient_of_a_known_function():
    x = _rng().standard_normal((3, 4))
    dout = _rng(1).standard_normal((3, 4))
    before = x.copy()
    num = numerical_gradient(lambda: x ** 3, x, dout)
    np.testing.assert_allclose(num, 3 * before ** 2 * dout, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x, before)  # restored exactly


def test_numerical_gradient_restores_x_when_f_raises():
    x = np.array([1.0, 2.0])
    calls = []

    def f():
        calls.append(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        numerical_gradient(f, x, np.ones(2))
    np.testing.assert_array_equal(x, [1.0, 2.0])


def test_numerical_gradient_scalar_output():
    x = _rng().standard_normal(5)
    num = numerical_gradient(lambda: (x ** 2).sum(), x, np.array(2.0))
    np.testing.assert_allclose(num, 4 * x, rtol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_float32_is_refused(dtype):
    x = np.ones(3, dtype=dtype)
    with pytest.raises(GradcheckError, match="float64"):
        numerical_gradient(lambda: x * 2, x, np.ones(3))
    if x.dtype.kind == "f":
        with pytest.raises(TypeError, match="float64"):  # GradcheckError is a TypeError
            check_op(lambda a: (a * 2, None), lambda d, c: 2 * d, {"x": x})


# --------------------------------------------------------------------------
# rel_error
# --------------------------------------------------------------------------
def test_rel_error_formula():
    a = np.array([3.0, 4.0])
    b = np.array([3.0, 4.0 + 1e-6])
    assert rel_error(a, a) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(a, b) == pytest.approx(1e-6 / np.linalg.norm(b), rel=1e-6)
    assert rel_error(a, b) == rel_error(b, a)
    assert rel_error(1e9 * a, 1e9 * b) == pytest.approx(rel_error(a, b), rel=1e-6)  # scale-free
    assert rel_error(a, -a) == pytest.approx(2.0)
    assert rel_error(np.zeros(2), a) == pytest.approx(1.0)
    assert rel_error(2.0, 2.0) == 0.0


def test_rel_error_is_normwise_not_elementwise():
    """A near-zero element with pure rounding noise must not dominate the error."""
    a = np.array([1.0, 1e-14])
    b = np.array([1.0, 3e-14])
    assert rel_error(a, b) < 1e-13


def test_rel_error_counts_only_the_difference_above_the_noise_floor():
    """The central difference's rounding noise (the floor) is no evidence of a mistake; a mistake above it is."""
    g = np.array([1.9e-5])
    assert rel_error(g, g + 3e-12, floor=4e-11, noise=4e-11) == 0.0   # rounding: forgiven
    assert rel_error(g, g + 3e-12) > 1e-7                            # without the floor it read as a failure
    assert rel_error(g, 2 * g, floor=4e-11, noise=4e-11) == pytest.approx((1.9e-5 - 4e-11) / 3.8e-5)  # still fails
    assert rel_error(np.zeros(1), np.array([1e-20]), floor=4e-11, noise=4e-11) == 0.0
    assert rel_error(g, g + 3e-12, floor=1e-3) > 0  # a floor alone (a scale) forgives nothing


def test_a_small_true_gradient_beside_a_large_loss_passes_a_correct_backward():
    """x = -3.8e-5, y = a x + b with a = -1.9e-5, b = 0.45: dL/dx = a dy is 1.9e-5 while L is ~0.45, so the
    central difference carries ~1e-11 of rounding (5e-7 of the gradient); a correct backward must pass."""
    x = np.array([-3.84214911e-05])
    a, b = -1.92107455e-05, 0.45366268
    errors = check_op(lambda x: (a * x + b, None), lambda d, c: a * d, {"x": x})
    assert errors["x"] < 1e-7
    wrong = check_op(lambda x: (a * x + b, None), lambda d, c: 1.01 * a * d, {"x": x})
    assert wrong["x"] > 1e-3


def test_rel_error_shape_mismatch():
    with pytest.raises(ValueError):
        rel_error(np.zeros(2), np.zeros(3))


# --------------------------------------------------------------------------
# check_op: passes right, catches wrong
# --------------------------------------------------------------------------
def _softmax_forward(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    y = e / e.sum(-1, keepdims=True)
    return y, y


def _softmax_backward(dy, y):
    return y * (dy - (dy * y).sum(-1, keepdims=True))


def _softmax_backward_bug(dy, y):
    # Wrong, but exact for dy = all ones (both give 0): only a random dout exposes it.
    return y * (dy - dy.mean(-1, keepdims=True))


def test_check_op_passes_correct_backward():
    errs = check_op(_softmax_forward, _softmax_backward, {"x": _rng().standard_normal((2, 5))})
    assert set(errs) == {"x"} and errs["x"] < 1e-8


def test_check_op_uses_random_upstream_gradient():
    x = _rng().standard_normal((2, 5))
    ones = np.ones_like(x)
    # With dout = ones the bug is invisible...
    assert np.allclose(_softmax_backward_bug(ones, _softmax_forward(x)[1]), 0)
    # ...but check_op never uses ones.
    assert check_op(_softmax_forward, _softmax_backward_bug, {"x": x})["x"] > 1e-3


def test_check_op_multiple_inputs_and_none_grads():
    def fwd(x, w, b=None):
        y = x @ w + (0 if b is None else b)
        return y, (x, w, b is not None)

    def bwd(dy, cache):
        x, w, has_b = cache
        return dy @ w.T, x.T @ dy, (dy.sum(0) if has_b else None)

    r = _rng()
    x, w, b = r.standard_normal((3, 4)), r.standard_normal((4, 2)), r.standard_normal(2)
    errs = check_op(fwd, bwd, {"x": x, "w": w, "b": b})
    assert set(errs) == {"x", "w", "b"} and max(errs.values()) < 1e-8
    errs = check_op(fwd, bwd, {"x": x, "w": w})  # db None is skipped
    assert set(errs) == {"x", "w"} and max(errs.values()) < 1e-8

    def bwd_transposed(dy, cache):
        dx, dw, db = bwd(dy, cache)
        return dx, dw * 1.001, db

    assert check_op(fwd, bwd_transposed, {"x": x, "w": w, "b": b})["w"] > 1e-4


def test_check_op_integer_inputs_and_kwargs():
    def fwd(table, ids, scale=1.0):
        return scale * table[ids], (ids, table.shape, scale)

    def bwd(dy, cache):
        ids, shape, scale = cache
        d = np.zeros(shape)
        np.add.at(d, ids, scale * dy)
        return d

    def bwd_bug(dy, cache):
        ids, shape, scale = cache
        d = np.zeros(shape)
        d[ids] += scale * dy  # drops repeated ids
        return d

    inputs = {"table": _rng().standard_normal((5, 3)), "ids": np.array([1, 1, 4, 1])}
    assert check_op(fwd, bwd, inputs, kwargs={"scale": 2.5})["table"] < 1e-8
    assert check_op(fwd, bwd_bug, inputs)["table"] > 0.1


def test_check_op_inputs_restored():
    x = _rng().standard_normal((3, 3))
    before = x.copy()
    check_op(_softmax_forward, _softmax_backward, {"x": x})
    check_op(_softmax_forward, _softmax_backward, {"x": x}, directional=True)
    np.testing.assert_array_equal(x, before)


def test_check_op_grad_names_mismatch_is_clear():
    with pytest.raises(ValueError, match="grad_names"):
        check_op(lambda a, b: (a * b, (a, b)), lambda d, c: d * c[1], {"a": np.ones(2), "b": np.ones(2)})


def test_check_op_gradient_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        check_op(lambda a: (a.sum(-1), a), lambda d, c: d, {"a": np.ones((2, 3))})


# --------------------------------------------------------------------------
# Directional check for big inputs
# --------------------------------------------------------------------------
def test_directional_check_used_for_big_inputs(monkeypatch):
    calls = []
    real = gc.directional_error
    monkeypatch.setattr(gc, "directional_error", lambda *a, **k: calls.append(1) or real(*a, **k))
    big = _rng().standard_normal((gc.DIRECTIONAL_SIZE + 1,))
    assert check_op(_softmax_forward, _softmax_backward, {"x": big})["x"] < 1e-7
    assert calls == [1]
    small = _rng().standard_normal((4,))
    check_op(_softmax_forward, _softmax_backward, {"x": small})
    assert calls == [1]
    check_op(_softmax_forward, _softmax_backward, {"x": small}, directional=True)
    assert calls == [1, 1]


def test_directional_check_catches_bugs():
    x = _rng().standard_normal((40, 40))
    assert check_op(_softmax_forward, _softmax_backward, {"x": x}, directional=True)["x"] < 1e-7
    assert check_op(_softmax_forward, _softmax_backward_bug, {"x": x}, directional=True)["x"] > 1e-3

    def scaled(dy, y):
        return 1.0001 * _softmax_backward(dy, y)

    # A gradient 1e-4 too large shows in a random direction u as 1e-4 |<g, u>| / ||g||, about 1e-4 / sqrt(n)
    # for n = 1600 inputs (2.5e-6): well above the 1e-7 threshold. (1e-5 held only while the upstream
    # gradient came from the same random stream as x.)
    assert check_op(_softmax_forward, scaled, {"x": x}, directional=True)["x"] > 1e-6


def test_directional_error_direct():
    x = _rng().standard_normal(50)
    dout = _rng(1).standard_normal(50)
    grad = 2 * x * dout
    assert directional_error(lambda: x ** 2, x, grad, dout) < 1e-8
    assert directional_error(lambda: x ** 2, x, grad + 0.01 * _rng(2).standard_normal(50), dout) > 1e-4


# --------------------------------------------------------------------------
# check_module
# --------------------------------------------------------------------------
class _Scale:
    """y = x * w + c (w, c of shape (C,)), a minimal Module following the npflux contract."""

    def __init__(self, C, seed=0, bug=None):
        r = _rng(seed)
        self.params = {"w": r.standard_normal(C), "c": r.standard_normal(C)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.bug = bug

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def forward(self, x):
        self.x = x
        return x * self.params["w"] + self.params["c"]

    def backward(self, dy):
        dw = (dy * self.x).reshape(-1, dy.shape[-1]).sum(0)
        if self.bug == "dw":
            dw = dw * 1.01
        self.grads["w"] += dw
        self.grads["c"] += dy.reshape(-1, dy.shape[-1]).sum(0)
        return dy * self.params["w"] if self.bug != "dx" else dy


def test_check_module_checks_inputs_and_params():
    x = _rng(3).standard_normal((2, 3, 4))
    errs = check_module(_Scale(4), {"x": x})
    assert set(errs) == {"x", "w", "c"} and max(errs.values()) < 1e-8
    assert check_module(_Scale(4, bug="dw"), {"x": x})["w"] > 1e-3
    assert check_module(_Scale(4, bug="dx"), (x,))["input0"] > 1e-3


def test_check_module_refuses_float32_params():
    m = _Scale(3)
    m.params["w"] = m.params["w"].astype(np.float32)
    with pytest.raises(GradcheckError, match="float64"):
        check_module(m, {"x": np.ones((2, 3))})


def test_check_module_refuses_nondeterministic_forward():
    m = _Scale(3)
    r = _rng(5)
    m.forward = lambda x: x * r.standard_normal(x.shape)
    m.backward = lambda dy: dy
    with pytest.raises(GradcheckError, match="deterministic"):
        check_module(m, {"x": np.ones((2, 3))})


def test_check_module_on_npflux_linear():
    nn = pytest.importorskip("npflux.nn")
    if not hasattr(nn, "Linear"):
        pytest.skip("npflux.nn.Linear not written yet")
    m = nn.Linear(4, 3, dtype="float64")
    for p in m.params.values():
        p[...] = dev(_rng(1).standard_normal(p.shape), like=p)
    errs = check_module(m, {"x": dev(_rng(2).standard_normal((2, 5, 4)), like=m)})
    assert {"x", "weight", "bias"} <= set(errs) and max(errs.values()) < 1e-7


# --------------------------------------------------------------------------
# run_all (the `npflux gradcheck` table)
# --------------------------------------------------------------------------
def test_run_all_ops_pass_and_print_a_table(monkeypatch, capsys):
    """Every op row passes. (Module rows are npflux.nn's business: tests/test_nn.py.)"""
    monkeypatch.setattr(gc, "_module_cases", lambda: [])
    assert gc.run_all(verbose=True) is True
    out = capsys.readouterr().out
    for name in ("linear", "embedding", "layernorm", "gelu", "relu", "softmax", "attention",
                 "cross_entropy", "dropout"):
        assert name in out
    assert "max rel err" in out and "passed" in out
    assert "FAIL" not in out


def test_run_all_lists_every_module(capsys):
    gc.run_all(verbose=True)
    out = capsys.readouterr().out
    for name, _, _ in gc._module_specs():
        assert name in out


def test_run_all_reports_a_failure(monkeypatch, capsys):
    def broken_cases():
        return [("softmax-bug", "x(2,5)",
                 lambda: check_op(_softmax_forward, _softmax_backward_bug, {"x": _rng().standard_normal((2, 5))})),
                ("crash", "-", lambda: 1 / 0)]

    monkeypatch.setattr(gc, "_op_cases", broken_cases)
    monkeypatch.setattr(gc, "_module_cases", lambda: [("Missing", "-", None, "not written")])
    assert gc.run_all(verbose=True) is False
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 and "SKIP" in out and "ZeroDivisionError" in out


def test_the_upstream_gradient_never_coincides_with_a_seed_0_input():
    """docs/gradients.md's example: x drawn with seed 0 once equalled the checker's seed-0 upstream gradient,
    making the true gradient of layer norm about zero and the check print 0.00022 (a correct backward)."""
    from npflux import ops

    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    errs = check_op(ops.layernorm_forward, ops.layernorm_backward, {"x": x, "gamma": np.ones(8), "beta": np.zeros(8)})
    assert max(errs.values()) < 1e-7, errs

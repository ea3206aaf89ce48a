"""Assertions for testing a layer's hand-written backward pass, in pytest or anywhere.

npflux checks every op three ways (``tests/test_ops.py``): against numerical
gradients in float64, against PyTorch's autograd in float64 and float32, and
for dtype preservation. This module is those three checks as assertions, for
anyone writing a layer of their own. Each raises ``AssertionError`` with a
per-input table of relative errors when it fails, so pytest shows which
gradient is wrong and by how much.

A test of your own layer
------------------------
A "scale and shift" op, y = a * x + b with a and b per feature, and its
test::

    import numpy as np
    from npflux.testing import (assert_gradients_match, assert_matches_torch,
                                assert_preserves_dtype, random_inputs)

    def scale_shift_forward(x, a, b):
        return a * x + b, (x, a)

    def scale_shift_backward(dy, cache):
        x, a = cache
        rows = tuple(range(dy.ndim - 1))          # a and b are shared by every row
        return a * dy, (x * dy).sum(rows), dy.sum(rows)

    def test_scale_shift():
        inputs = random_inputs({"x": (2, 3, 4), "a": 4, "b": 4})
        assert_gradients_match(scale_shift_forward, scale_shift_backward, inputs)
        for dtype in (np.float64, np.float32):
            assert_matches_torch(scale_shift_forward, scale_shift_backward, inputs,
                                 lambda x, a, b: a * x + b, dtype=dtype)
        assert_preserves_dtype(scale_shift_forward, scale_shift_backward, inputs, np.float32)

A module is checked the same way, every input and every parameter::

    from npflux.nn import LayerNorm
    from npflux.testing import assert_module_gradients_match, random_inputs, randomize_parameters

    def test_layernorm_module():
        m = randomize_parameters(LayerNorm(8, dtype="float64"))
        assert_module_gradients_match(m, random_inputs({"x": (2, 3, 8)}))

The checks
----------
``assert_gradients_match(forward, backward, inputs)``
    ``backward`` against central differences of ``forward`` (npflux.gradcheck),
    every floating-point input, float64 only (in float32 the rounding error of
    a central difference is ~1e-2, so no agreement would mean anything).
    Passes at a norm-wise relative error of at most ``tol`` = 1e-7.
``assert_module_gradients_match(module, inputs)``
    The same for a ``npflux.nn.Module``: every float input and every parameter.
``assert_matches_torch(forward, backward, inputs, torch_fn, dtype=...)``
    Output and gradients against ``torch_fn`` with autograd, on the same
    inputs cast to ``dtype`` and the same upstream gradient: 1e-10 relative
    in float64, 1e-5 in float32. ``assert_module_matches_torch`` does the
    same for a module against a torch function of its parameters.
``assert_preserves_dtype(forward, backward, inputs, dtype)``
    float32 in, float32 out and float32 gradients: no silent upcast (a
    float64 constant in a float32 layer doubles its memory and halves its
    speed without changing a single printed loss). ``assert_module_preserves_dtype``
    is the module version.
``random_inputs(shapes, seed=0)`` / ``randomize_parameters(module, seed=0)``
    Seeded standard-normal inputs and parameters. Random parameters matter: a
    zero bias or a unit gamma (the usual initialisation) hides a gradient that
    is dropped or never scaled.

Seeds: the upstream gradient is never one of your inputs
--------------------------------------------------------
Every check draws a random upstream gradient ``dout`` and tests
d sum(f(x) * dout) / dx. If ``dout`` were drawn from the same seed as an input
it would EQUAL that input, and for some layers the true gradient then all but
vanishes: layer norm (gain 1) is unchanged by scaling its input, up to eps, so
with dout = x the true dx is ~1e-5 of its usual size, below what central
differences resolve, and a correct backward looks 2e-4 wrong. So the checkers
draw ``dout`` from ``default_rng(UPSTREAM_SEED_BASE + seed)`` with
``UPSTREAM_SEED_BASE = 2**40``. NumPy splits an integer seed into 32-bit
words: a seed below 2**32 is one word, one below 2**40 has a second word under
256, and the checkers' seeds have a second word of 256 or more, so no seed a
test uses for its inputs (below 2**40, ``random_inputs`` included) names the
checkers' random stream. ``seed`` arguments must lie in [0, 2**40).

Tolerances, and why (see npflux.gradcheck for the formulas)
------------------------------------------------------------
Relative errors are norm-wise, ``gradcheck.rel_error`` (an element-wise ratio
fails on elements whose true value is ~0). The numerical check uses
eps = 1e-5, near the float64 optimum machine_eps**(1/3): truncation (~eps**2)
and rounding (~1e-16 / eps) are then both ~1e-11, where npflux.gradcheck's
default 1e-6 is rounding-bound (~1e-10) and fails 1e-7 on tiny inputs whose
true gradient is small.

This module imports neither pytest nor torch until a check needs torch; a
torch check skips the calling test (``pytest.skip``) where torch is not
installed, and raises ImportError outside pytest.
"""
from __future__ import annotations

import numpy as np

from . import gradcheck
from .backend import backend_of, get_backend, to_numpy

#: Largest norm-wise relative error a numerical gradient check passes with.
THRESHOLD = gradcheck.THRESHOLD
#: The central-difference step of the numerical checks (see the module docstring).
EPS = 1e-5
#: Default tolerances against PyTorch, by dtype.
TORCH_RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
#: Gradients are compared with torch against max(their norm, this * ||dout||): an exact 0
#: in npflux against torch's 1e-17 (for example dq when every query sees one key) is not a 100% error.
TORCH_GRAD_FLOOR = 1e-3
#: The checkers draw upstream gradients from ``default_rng(UPSTREAM_SEED_BASE + seed)`` (npflux.gradcheck's).
from .gradcheck import UPSTREAM_SEED_BASE  # noqa: E402

__all__ = [
    "EPS", "THRESHOLD", "TORCH_RTOL", "UPSTREAM_SEED_BASE",
    "assert_gradients_match", "assert_matches_torch", "assert_module_gradients_match",
    "assert_module_matches_torch", "assert_module_preserves_dtype", "assert_preserves_dtype",
    "random_inputs", "randomize_parameters",
]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
def _check_seed(seed, who):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < UPSTREAM_SEED_BASE:
        raise ValueError(f"{who}: seed must be an integer in [0, 2**40), got {seed!r}")
    return int(seed)


def _upstream_rng(seed, who):
    """The upstream gradient's generator: a stream no input seed below 2**40 can name."""
    return np.random.default_rng(UPSTREAM_SEED_BASE + _check_seed(seed, who))


def random_inputs(shapes, seed=0, dtype=np.float64, backend=None):
    """{name: standard-normal array} for {name: shape}, in the given order.

    A shape is an int or a tuple; a value that is already an array (token
    ids, a mask) is passed through on the same backend. The arrays live on
    ``backend`` (default: NPFLUX_BACKEND, as npflux's modules do) in
    ``dtype``, float64 by default because the numerical check needs it.
    """
    rng = np.random.default_rng(_check_seed(seed, "random_inputs"))
    be = get_backend(backend)
    out = {}
    for name, shape in shapes.items():
        if hasattr(shape, "dtype"):
            out[name] = be.asarray(shape)
        else:
            shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
            out[name] = be.asarray(rng.standard_normal(shape), dtype=dtype)
    return out


def randomize_parameters(module, seed=0, scale=0.5):
    """Give every parameter of ``module`` random values N(0, scale^2); returns the module.

    The usual initialisation (zero biases, unit layer-norm gains) hides bugs:
    a bias gradient that is never accumulated, a gain that is never applied.
    """
    rng = np.random.default_rng(_check_seed(seed, "randomize_parameters"))
    for p in module.params.values():
        p[...] = backend_of(p).asarray(scale * rng.standard_normal(p.shape), dtype=p.dtype)
    return module


def _named(inputs):
    """Inputs as an ordered dict; a tuple or list becomes input0, input1, ... (as gradcheck names them)."""
    if isinstance(inputs, dict):
        return dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return {f"input{i}": a for i, a in enumerate(inputs)}
    return {"input0": inputs}


def _is_float(a):
    return getattr(getattr(a, "dtype", None), "kind", None) == "f"


def _tuple(g):
    return tuple(g) if isinstance(g, (tuple, list)) else (g,)


def _where(fn):
    """A function's name for a message: ``Class.method``, without the ``outer.<locals>.`` of a nested one."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return name.rsplit("<locals>.", 1)[-1]


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------
def _table(rows, header):
    """Rows of strings as aligned columns under ``header``, indented for an assertion message."""
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _assert_errors(errors, expected, tol, what, eps):
    """Fail unless every expected name was checked and every error is <= tol (NaN fails)."""
    missing = [n for n in expected if n not in errors]
    if missing:
        raise AssertionError(
            f"{what}: no gradient was checked for {missing} (the backward returned None for them?); "
            f"checked: {sorted(errors)}")
    if all(e <= tol for e in errors.values()):
        return
    bad = [n for n, e in errors.items() if not e <= tol]
    rows = [[n, f"{e:.2e}", "ok" if e <= tol else "FAIL"] for n, e in errors.items()]
    raise AssertionError(
        f"{what}: {'gradient of' if len(bad) == 1 else 'gradients of'} {', '.join(bad)} "
        f"{'differs' if len(bad) == 1 else 'differ'} from central differences "
        f"(relative error > {tol:g}; float64, eps {eps:g})\n"
        + _table(rows, ["gradient of", "rel error", "result"]))


def _refuse_low_precision(inputs, who, fix):
    for n, a in inputs.items():
        if _is_float(a) and a.dtype != np.float64:
            raise gradcheck.GradcheckError(
                f"{who}: {n!r} is {a.dtype}; numerical gradients need float64 (in float32 the rounding "
                f"error of a central difference is ~1e-2, so agreement to {THRESHOLD:g} would mean nothing). "
                f"{fix}; test float32 with assert_matches_torch(..., dtype=np.float32) and assert_preserves_dtype")


# --------------------------------------------------------------------------
# Numerical gradients
# --------------------------------------------------------------------------
def assert_gradients_match(forward, backward, inputs, *, kwargs=None, grad_names=None, tol=THRESHOLD, seed=0,
                           eps=EPS, directional=None):
    """Assert that ``backward`` is the gradient of ``forward``, by central differences in float64.

    forward:    ``forward(*inputs.values(), **kwargs) -> (out, cache)``; deterministic
                (for dropout, a lambda that seeds a fresh rng on every call).
    backward:   ``backward(dout, cache) -> grad`` or a tuple of grads (None for
                integer inputs and absent ones, like a missing bias).
    inputs:     {name: array} in forward's order (or a tuple). Float inputs must
                be float64; integer ones (ids, targets) are passed, not differentiated.
    grad_names: the inputs backward's gradients belong to; default every float input.
                Each of them must get a gradient.
    seed:       seeds the upstream gradient, from a stream no input seed names
                (see "Seeds" in the module docstring).
    Returns {input name: relative error}; raises AssertionError with a table
    when any is above ``tol``. ``directional`` is npflux.gradcheck's (large
    inputs are checked along random directions).
    """
    inputs = _named(inputs)
    _refuse_low_precision(inputs, "assert_gradients_match", "Pass x.astype(np.float64) or random_inputs(...)")
    expected = list(grad_names) if grad_names is not None else [n for n, a in inputs.items() if _is_float(a)]
    errors = gradcheck.check_op(forward, backward, inputs, grad_names=grad_names, eps=eps, directional=directional,
                                seed=_check_seed(seed, "assert_gradients_match"),
                                kwargs=kwargs)
    _assert_errors(errors, expected, tol, _where(backward), eps)
    return errors


def assert_module_gradients_match(module, inputs, *, kwargs=None, grad_names=None, tol=THRESHOLD, seed=0,
                                  eps=EPS, directional=None):
    """Assert that ``module.backward`` gives the gradients of every float input and every parameter.

    module: an npflux.nn.Module (or anything with ``params``, ``grads``,
            ``forward``, ``backward`` and ``zero_grad``) built in float64, in
            eval mode if it has dropout. Give it random parameters first
            (``randomize_parameters``).
    inputs: {name: array} in forward's order (or a tuple); ``kwargs`` go to forward.
    Other arguments as in assert_gradients_match.
    Returns {input or parameter name: relative error}; the module's gradients
    are left holding the analytic gradients of the check.
    """
    inputs = _named(inputs)
    who = "assert_module_gradients_match"
    _refuse_low_precision(inputs, who, "Pass x.astype(np.float64) or random_inputs(...)")
    _refuse_low_precision({f"parameter {n}": p for n, p in module.params.items()}, who,
                          "Build the module with dtype='float64'")
    names = list(grad_names) if grad_names is not None else [n for n, a in inputs.items() if _is_float(a)]
    errors = gradcheck.check_module(module, inputs, kwargs=kwargs, grad_names=grad_names, eps=eps,
                                    directional=directional, seed=_check_seed(seed, who))
    _assert_errors(errors, names + list(module.params), tol, type(module).__name__ + ".backward", eps)
    return errors


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------
def _import_torch():
    """torch, or a skipped test where it is not installed (ImportError outside pytest)."""
    try:
        import torch
    except ImportError:
        try:
            import pytest
        except ImportError:
            raise ImportError("npflux.testing: comparing with PyTorch needs torch installed") from None
        pytest.skip("PyTorch (the test oracle) is not installed")
    return torch


def _host(v):
    return to_numpy(v) if type(v).__module__.startswith("cupy") else v


def _rtol(dtype, rtol):
    dtype = np.dtype(dtype)
    if rtol is not None:
        return dtype, rtol
    if dtype not in TORCH_RTOL:
        raise ValueError(f"no default tolerance against torch for {dtype}; pass rtol=")
    return dtype, TORCH_RTOL[dtype]


def _cast(inputs, dtype):
    return {k: (v.astype(dtype) if _is_float(v) else v) for k, v in inputs.items()}


def _compare_to_torch(ours, run_torch, host_inputs, dout, dtype, tol, what):
    """Compare [out, grad, ...] (``ours``, labelled) with ``run_torch(inputs, dout)``; fail with a table.

    float32: torch's CPU kernels accumulate float32 in float64, so in an
    ill-conditioned case (a near-certain softmax: p - 1 cancels) torch can be
    more accurate than any pure float32 computation. There npflux must be
    within ``tol`` of torch's float64 result instead, or, where even torch's
    float32 result misses float64 by more than ``tol``, as accurate as torch
    within a factor 2.
    """
    labels = list(ours)
    theirs = run_torch(host_inputs, dout)
    floor = TORCH_GRAD_FLOOR * float(np.linalg.norm(dout.astype(np.float64).ravel()))
    truth, rows, failed = None, [], []
    for i, label in enumerate(labels):
        a = ours[label]
        if a.dtype != dtype:
            raise AssertionError(f"{what}: {label} is {a.dtype} for {dtype.name} inputs (a silent up- or downcast)")
        fl = floor if i else 0.0
        err = gradcheck.rel_error(a, theirs[i], floor=fl)
        row = [label, f"{err:.2e}", "", "", "ok"]
        if not err <= tol and dtype == np.float32:
            if truth is None:
                truth = run_torch(_cast(host_inputs, np.float64), dout.astype(np.float64))
            ours_err = gradcheck.rel_error(a, truth[i], floor=fl)
            torch_err = gradcheck.rel_error(theirs[i], truth[i], floor=fl)
            row[2:4] = f"{ours_err:.2e}", f"{torch_err:.2e}"
            if not ours_err <= max(tol, 2 * torch_err):
                row[4] = "FAIL"
        elif not err <= tol:
            row[4] = "FAIL"
        rows.append(row)
        if row[4] == "FAIL":
            failed.append(label)
    if failed:
        note = ("\n  (float32: a value passes within rtol of torch's float64 result, or, where torch's own float32 "
                "result misses that too, within twice torch's error)" if dtype == np.float32 else "")
        raise AssertionError(
            f"{what}: {', '.join(failed)} {'differs' if len(failed) == 1 else 'differ'} from PyTorch "
            f"(relative error > {tol:g}, {dtype.name})\n"
            + _table(rows, ["", "vs torch", "vs torch float64", "torch vs float64", "result"]) + note)


def assert_matches_torch(forward, backward, inputs, torch_fn, *, dtype, rtol=None, kwargs=None, grad_names=None,
                         seed=0):
    """Assert that an op's output and gradients equal a PyTorch function's, in ``dtype``.

    Float inputs are cast to ``dtype`` and given to both; ``torch_fn`` gets
    torch tensors, by keyword for a dict of inputs (so its parameter names
    are the input names) or positionally for a tuple, plus ``kwargs`` (arrays
    in kwargs reach torch_fn as NumPy arrays). Both get the same random
    upstream gradient. Checks: output and every gradient keep ``dtype``, and
    agree to ``rtol`` (norm-wise; default 1e-10 in float64, 1e-5 in float32).
    Returns (out, {input name: gradient}) from npflux.
    """
    torch = _import_torch()
    dtype, tol = _rtol(dtype, rtol)
    positional = not isinstance(inputs, dict)
    inputs = _cast(_named(inputs), dtype)
    kwargs = dict(kwargs or {})
    names = list(grad_names) if grad_names is not None else [k for k, v in inputs.items() if _is_float(v)]
    out, cache = forward(*inputs.values(), **kwargs)
    dout = np.asarray(_upstream_rng(seed, "assert_matches_torch").standard_normal(tuple(out.shape))).astype(dtype)
    grads = [g for g in _tuple(backward(backend_of(out).asarray(dout), cache)) if g is not None]
    if len(grads) != len(names):
        raise AssertionError(f"{_where(backward)} returned {len(grads)} gradient(s) for the inputs {names}; "
                             f"pass grad_names=[...] naming the inputs it returns gradients for")
    host_kwargs = {k: _host(v) for k, v in kwargs.items()}

    def run_torch(arrays, upstream):
        tin = {k: torch.tensor(np.asarray(_host(v)), requires_grad=k in names) for k, v in arrays.items()}
        tout = torch_fn(*tin.values(), **host_kwargs) if positional else torch_fn(**tin, **host_kwargs)
        tout.backward(torch.tensor(upstream))
        return [tout.detach().numpy()] + [tin[n].grad.numpy() for n in names]

    ours = {"forward": out, **{f"d{n}": g for n, g in zip(names, grads)}}
    _compare_to_torch(ours, run_torch, inputs, dout, dtype, tol, f"{_where(forward)}/{_where(backward)}")
    return out, dict(zip(names, grads))


def assert_module_matches_torch(module, inputs, torch_fn, *, rtol=None, kwargs=None, seed=0):
    """Assert that a module's output, input gradients and parameter gradients equal a torch reference.

    ``torch_fn(params, *inputs, **kwargs)`` computes the same function in
    torch from ``params``, a dict of torch tensors named and laid out exactly
    as ``module.params`` (write the reference in npflux's layout, for example
    ``x @ params["weight"]`` for an (in, out) weight). Inputs are cast to the
    module's dtype; the tolerance is that dtype's (see assert_matches_torch).
    Returns (out, input gradients as a tuple).
    """
    torch = _import_torch()
    dtype, tol = _rtol(module.dtype, rtol)
    inputs = _cast(_named(inputs), dtype)
    kwargs = dict(kwargs or {})
    names = [k for k, v in inputs.items() if _is_float(v)]
    module.zero_grad()
    out = module.forward(*inputs.values(), **kwargs)
    dout = np.asarray(_upstream_rng(seed, "assert_module_matches_torch").standard_normal(tuple(out.shape)))
    dout = dout.astype(dtype)
    dx = [g for g in _tuple(module.backward(backend_of(out).asarray(dout))) if g is not None]
    if len(dx) != len(names):
        raise AssertionError(f"{type(module).__name__}.backward returned {len(dx)} input gradient(s) "
                             f"for the float inputs {names}")
    param_names = list(module.params)
    host_kwargs = {k: _host(v) for k, v in kwargs.items()}

    def run_torch(arrays, upstream):
        tin = {k: torch.tensor(np.asarray(_host(v)), requires_grad=k in names) for k, v in arrays.items()}
        P = {k: torch.tensor(np.asarray(_host(p)).astype(upstream.dtype), requires_grad=True)
             for k, p in module.params.items()}
        tout = torch_fn(P, *tin.values(), **host_kwargs)
        tout.backward(torch.tensor(upstream))
        return ([tout.detach().numpy()] + [tin[n].grad.numpy() for n in names]
                + [P[k].grad.numpy() for k in param_names])

    grads = module.grads
    ours = {"forward": out, **{f"d{n}": g for n, g in zip(names, dx)}, **{k: grads[k] for k in param_names}}
    _compare_to_torch(ours, run_torch, inputs, dout, dtype, tol, type(module).__name__)
    return out, tuple(dx)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------
def _assert_dtypes(found, dtype, what):
    wrong = {k: str(v.dtype) for k, v in found.items() if v is not None and v.dtype != dtype}
    if wrong:
        rows = [[k, str(v.dtype), "ok" if v.dtype == dtype else "FAIL"] for k, v in found.items() if v is not None]
        raise AssertionError(f"{what}: {', '.join(wrong)} not {np.dtype(dtype).name} for "
                             f"{np.dtype(dtype).name} inputs (a silent cast)\n" + _table(rows, ["", "dtype", "result"]))


def assert_preserves_dtype(forward, backward, inputs, dtype, *, kwargs=None, seed=0):
    """Assert that float inputs cast to ``dtype`` give an output and gradients of ``dtype``.

    Integer inputs are passed as they are. Returns (out, gradients) as the op gave them.
    """
    dtype = np.dtype(dtype)
    inputs = _cast(_named(inputs), dtype)
    out, cache = forward(*inputs.values(), **dict(kwargs or {}))
    dout = _upstream_rng(seed, "assert_preserves_dtype").standard_normal(tuple(out.shape))
    grads = _tuple(backward(backend_of(out).asarray(dout, dtype=dtype), cache))
    found = {"forward": out, **{f"gradient {i}": g for i, g in enumerate(grads)}}
    _assert_dtypes(found, dtype, _where(forward))
    return out, grads


def assert_module_preserves_dtype(module, inputs, *, kwargs=None, seed=0):
    """Assert that a module keeps its dtype: parameters, output, input gradients and parameter gradients.

    Float inputs are cast to the module's dtype (build it with dtype="float32").
    """
    dtype = np.dtype(module.dtype)
    inputs = _cast(_named(inputs), dtype)
    module.zero_grad()
    out = module.forward(*inputs.values(), **dict(kwargs or {}))
    dout = _upstream_rng(seed, "assert_module_preserves_dtype").standard_normal(tuple(out.shape))
    dx = _tuple(module.backward(backend_of(out).asarray(dout, dtype=dtype)))
    found = {**{f"parameter {k}": p for k, p in module.params.items()}, "forward": out,
             **{f"input gradient {i}": g for i, g in enumerate(dx)},
             **{f"gradient of {k}": g for k, g in module.grads.items()}}
    _assert_dtypes(found, dtype, type(module).__name__)
    return out, dx

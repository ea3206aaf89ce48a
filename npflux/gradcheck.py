"""Numerical gradient checks for ops and modules (cs231n style).

Every backward pass in npflux is written by hand, so every one is checked
against the definition of a derivative. For a function y = f(x) and a random
upstream gradient ``dout`` we form the scalar

    L(x) = sum(f(x) * dout)

whose gradient with respect to x is exactly what ``backward(dout)`` must
return. The numerical estimate is the central difference

    dL/dx[i] ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

whose error is O(eps^2) from truncation plus O(machine_eps * |L| / eps) from
rounding. In float64 with eps = 1e-6 both are around 1e-10 relative, so a
correct backward agrees to better than 1e-7 and a wrong one (a missing
factor, a transposed matrix, a scatter that drops repeated ids) is off by
O(1). In float32 the rounding term alone is ~1e-1, which is why every check
here insists on float64.

Relative error (one formula, used everywhere in npflux):

    rel_error(a, b) = ||a - b||_2 / max(||a||_2, ||b||_2, floor)      (0 when all are 0)

It is norm-wise, not element-wise: an element-wise ratio |a_i - b_i| / |a_i|
fails spuriously on elements whose true gradient is ~0 (where the numerical
estimate is pure rounding noise), while the norm-wise error measures the
mistake against the size of the whole gradient.

``floor`` (0 by default) is set by the checkers to the rounding-noise level
of the central difference itself,

    floor = NOISE_FACTOR * machine_eps * sum(|f(x) * dout|) / eps * sqrt(x.size),

and the part of ||a - b|| below it is not counted:

    rel_error(a, b, floor, noise=floor) = max(||a - b|| - floor, 0) / max(||a||, ||b||, floor)

A difference smaller than the noise of the numerical estimate is no evidence
of a mistake: without this, a gradient that is zero up to rounding (a
saturated softmax gives ~1e-20, the numerical estimate exactly 0) read as a
100% error, and a small true gradient beside a large loss (x = -3.8e-5 times
a = -1.9e-5 plus b = 0.45: a gradient of 1.9e-5 whose central difference
carries ~1e-11 of rounding, 5e-7 of it) failed a correct backward. The
floor is ~1e-9 for O(1) values: any mistake of ordinary size still fails.

For large inputs evaluating L twice per element is too slow, so a
*directional* check is used instead: for a few random unit directions u,

    analytic  = <grad, u>
    numerical = (L(x + eps u) - L(x - eps u)) / (2 eps)
    error     = |analytic - numerical| / max(||grad||_2, |numerical|)

The error is normalised by ||grad|| (the largest value <grad, u> can take
for a unit u), so a direction that happens to be nearly orthogonal to the
gradient does not produce a spurious failure. A wrong gradient is caught with
probability one by a random direction.

Public API::

    numerical_gradient(f, x, dout, eps=1e-6)        -> array like x
    rel_error(a, b)                                 -> float
    check_op(forward, backward, inputs, ...)        -> {input name: error}
    check_module(module, inputs, ...)               -> {input or parameter name: error}
    run_all(verbose=True)                           -> bool   (``npflux gradcheck``)

Example::

    import numpy as np
    from npflux import ops
    from npflux.gradcheck import check_op

    rng = np.random.default_rng(0)
    errs = check_op(ops.linear_forward, ops.linear_backward,
                    {"x": rng.standard_normal((2, 3, 4)),
                     "w": rng.standard_normal((4, 5)),
                     "b": rng.standard_normal(5)})
    assert max(errs.values()) < 1e-7
"""
from __future__ import annotations

import time

import numpy as np

from .backend import get_array_module, to_numpy

#: A check passes when its relative error is at most this.
THRESHOLD = 1e-7
# The upstream gradients come from default_rng(UPSTREAM_SEED_BASE + seed). NumPy seeds with the seed's
# 32-bit words, so no seed below 2**40 that a test draws its inputs from (seed 0 above all) gives the same
# stream: with the same stream, dout equalled a seed-0 input x and the true gradient of some checks was ~0.
UPSTREAM_SEED_BASE = 2**40
#: Inputs with more elements than this get the directional check (unless told otherwise).
DIRECTIONAL_SIZE = 1024
#: Number of random directions per input in a directional check.
NUM_DIRECTIONS = 4
#: Safety factor on the rounding-noise estimate used as the error's floor.
NOISE_FACTOR = 4.0

__all__ = [
    "DIRECTIONAL_SIZE", "GradcheckError", "NOISE_FACTOR", "NUM_DIRECTIONS", "THRESHOLD",
    "check_module", "check_op", "directional_error", "numerical_gradient",
    "rel_error", "run_all",
]


class GradcheckError(TypeError):
    """The check cannot be meaningful as asked (for example float32 inputs)."""


# --------------------------------------------------------------------------
# The two primitives
# --------------------------------------------------------------------------
def _scalar(f, dout):
    """L = sum(f() * dout) as a Python float."""
    out = f()
    return float(to_numpy((out * dout).sum()))


def numerical_gradient(f, x, dout, eps=1e-6):
    """Central-difference gradient of L = sum(f() * dout) with respect to ``x``.

    ``f`` takes no arguments and must read ``x`` (the same array object), which
    is perturbed IN PLACE one element at a time and restored afterwards, even
    if ``f`` raises. ``x`` must be float64. Returns a float64 array shaped as x.
    """
    _require_float64(x, "numerical_gradient: x")
    xp = get_array_module(x)
    grad = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        old = float(x[idx])
        try:
            x[idx] = old + eps
            plus = _scalar(f, dout)
            x[idx] = old - eps
            minus = _scalar(f, dout)
        finally:
            x[idx] = old
        grad[idx] = (plus - minus) / (2.0 * eps)
    return xp.asarray(grad)


def rel_error(a, b, floor=0.0, noise=0.0):
    """Norm-wise relative error max(||a - b|| - noise, 0) / max(||a||, ||b||, floor); 0 when all three are zero.

    Works for arrays (NumPy or CuPy) and scalars. See the module docstring for
    why the norm-wise form is preferred over an element-wise ratio, and for
    the ``floor`` and ``noise`` the checkers use (both the central difference's rounding noise; a
    caller comparing with another library passes a ``floor`` alone, a scale below which norms don't shrink).
    """
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    scale = max(np.linalg.norm(a.ravel()), np.linalg.norm(b.ravel()), floor)
    if scale == 0.0:
        return 0.0
    return float(max(np.linalg.norm((a - b).ravel()) - noise, 0.0) / scale)


def directional_error(f, x, grad, dout, eps=1e-6, num_directions=NUM_DIRECTIONS, seed=0, floor=0.0):
    """Largest error of <grad, u> against (L(x + eps u) - L(x - eps u)) / 2 eps over random unit u.

    Each error is max(|analytic - numerical| - floor, 0) / max(||grad||, |numerical|, floor),
    see the module docstring. ``x`` is perturbed in place and restored.
    """
    _require_float64(x, "directional_error: x")
    xp = get_array_module(x)
    rng = np.random.default_rng(seed)
    g = np.asarray(to_numpy(grad), dtype=np.float64)
    gnorm = float(np.linalg.norm(g.ravel()))
    original = x.copy()
    worst = 0.0
    for _ in range(num_directions):
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u.ravel()) or 1.0
        u_dev = xp.asarray(u)
        try:
            x[...] = original + eps * u_dev
            plus = _scalar(f, dout)
            x[...] = original - eps * u_dev
            minus = _scalar(f, dout)
        finally:
            x[...] = original
        numerical = (plus - minus) / (2.0 * eps)
        analytic = float((g * u).sum())
        scale = max(gnorm, abs(numerical), floor)
        err = 0.0 if scale == 0.0 else max(abs(analytic - numerical) - floor, 0.0) / scale
        worst = max(worst, err)
    return worst


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _is_float_array(a):
    return getattr(getattr(a, "dtype", None), "kind", None) == "f"


def _require_float64(a, name):
    if not _is_float_array(a):
        raise GradcheckError(f"{name}: expected a float64 array, got {getattr(a, 'dtype', type(a).__name__)}")
    if a.dtype != np.float64:
        raise GradcheckError(
            f"{name} is {a.dtype}: numerical gradients need float64 "
            f"(in float32 the rounding error of a central difference is ~1e-2, "
            f"so agreement to {THRESHOLD:g} would be meaningless); pass x.astype('float64')"
        )


def _random_dout(out, rng):
    """A random upstream gradient shaped as ``out`` -- never all ones.

    All ones would hide bugs that sum the gradient where it should weight it
    (for example a softmax backward that drops the dy_j terms). A 0-d output
    (a loss) gets one random scalar of magnitude in [0.5, 1.5) and random sign.
    """
    xp = get_array_module(out)
    shape = tuple(out.shape)
    if shape == ():
        value = rng.uniform(0.5, 1.5) * rng.choice([-1.0, 1.0])
        return xp.asarray(value, dtype=np.float64)
    return xp.asarray(rng.standard_normal(shape))


def _as_tuple(grads):
    if isinstance(grads, (tuple, list)):
        return tuple(grads)
    return (grads,)


def _match_grads(names, grads, what):
    """Pair returned gradients with input names.

    ``grads`` has one entry per name; trailing or interleaved ``None`` entries
    are allowed (an op may return db=None when there is no bias). If the
    counts differ, the non-None gradients are paired with the names in order.
    """
    if len(grads) == len(names):
        return {n: g for n, g in zip(names, grads) if g is not None}
    present = [g for g in grads if g is not None]
    if len(present) == len(names):
        return dict(zip(names, present))
    raise ValueError(
        f"{what} returned {len(grads)} gradient(s) ({len(present)} not None) but the inputs to check "
        f"are {list(names)}; pass grad_names=[...] naming the inputs whose gradients it returns, in order"
    )


def _use_directional(a, directional):
    if directional is None:
        return a.size > DIRECTIONAL_SIZE
    return bool(directional)


def _noise(out, dout, eps):
    """Rounding noise of one central difference of L = sum(out * dout): ~ machine_eps * sum|out * dout| / eps."""
    magnitude = float(to_numpy(abs(out * dout).sum()))
    return NOISE_FACTOR * np.finfo(np.float64).eps * magnitude / eps


def _compare(f, x, analytic, dout, eps, directional, seed, name, noise):
    if tuple(analytic.shape) != tuple(x.shape):
        raise ValueError(f"gradient of {name} has shape {tuple(analytic.shape)}, the input has {tuple(x.shape)}")
    if _use_directional(x, directional):
        return directional_error(f, x, analytic, dout, eps=eps, seed=seed, floor=noise)
    floor = noise * np.sqrt(x.size)
    return rel_error(analytic, numerical_gradient(f, x, dout, eps=eps), floor=floor, noise=floor)


def _named_inputs(inputs):
    if isinstance(inputs, dict):
        return dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return {f"input{i}": a for i, a in enumerate(inputs)}
    return {"input0": inputs}


# --------------------------------------------------------------------------
# Checking ops and modules
# --------------------------------------------------------------------------
def check_op(forward, backward, inputs, grad_names=None, seed=0, eps=1e-6, directional=None, kwargs=None):
    """Check an op's backward against numerical gradients; returns {input name: relative error}.

    forward:    ``forward(*inputs.values(), **kwargs) -> (out, cache)``
    backward:   ``backward(dout, cache) -> grad`` or a tuple of grads
    inputs:     dict name -> array, in the forward's positional order. Float
                inputs must be float64; integer inputs (ids, targets) and
                None are passed through and not differentiated.
    grad_names: the input names the backward's gradients belong to, in order;
                by default every floating-point input, in order.
    seed:       seeds the random upstream gradient (and the directions).
    directional: None = directional check only for inputs larger than
                ``DIRECTIONAL_SIZE`` elements; True/False forces it on/off.
    kwargs:     constant keyword arguments for forward (``causal=True``, ...).

    The forward must be deterministic: for dropout pass a lambda that makes
    a freshly seeded rng on every call.
    """
    inputs = _named_inputs(inputs)
    kwargs = dict(kwargs or {})
    float_names = [n for n, a in inputs.items() if _is_float_array(a)]
    for n in float_names:
        _require_float64(inputs[n], f"check_op: input {n!r}")
    names = list(grad_names) if grad_names is not None else float_names
    for n in names:
        if n not in inputs or not _is_float_array(inputs[n]):
            raise ValueError(f"check_op: {n!r} is not a floating-point input (inputs: {list(inputs)})")

    args = list(inputs.values())
    out, cache = forward(*args, **kwargs)
    _require_float64(out, "check_op: forward output")
    rng = np.random.default_rng(UPSTREAM_SEED_BASE + seed)
    dout = _random_dout(out, rng)
    grads = _match_grads(names, _as_tuple(backward(dout, cache)), "backward")

    def f():
        return forward(*args, **kwargs)[0]

    noise = _noise(out, dout, eps)
    return {
        name: _compare(f, inputs[name], g, dout, eps, directional, seed + i, name, noise)
        for i, (name, g) in enumerate(grads.items())
    }


def check_module(module, inputs, seed=0, eps=1e-6, directional=None, kwargs=None, grad_names=None):
    """Check a Module's backward against numerical gradients of every input and parameter.

    module:  has ``params`` / ``grads`` (dicts with the same keys), ``forward(*inputs,
             **kwargs) -> out``, ``backward(dout)`` returning the input gradient (or a
             tuple of them, None for integer inputs) and ADDING into ``grads``, and
             ``zero_grad()``. All parameters must be float64 (build it with
             ``dtype="float64"``); call ``module.eval()`` first if it has dropout.
    inputs:  dict name -> array (or a tuple of arrays), in forward's order.
    Returns {input name or parameter name: relative error}. The module's
    gradients are left holding the analytic gradients of the check.
    """
    inputs = _named_inputs(inputs)
    kwargs = dict(kwargs or {})
    float_names = [n for n, a in inputs.items() if _is_float_array(a)]
    for n in float_names:
        _require_float64(inputs[n], f"check_module: input {n!r}")
    params = module.params
    for n, p in params.items():
        _require_float64(p, f"check_module: parameter {n!r}")
    args = list(inputs.values())

    def f():
        return module.forward(*args, **kwargs)

    module.zero_grad()
    out = f()
    _require_float64(out, "check_module: forward output")
    again = f()
    if rel_error(out, again) != 0.0:
        raise GradcheckError("check_module: forward is not deterministic (dropout in training mode? call module.eval())")
    rng = np.random.default_rng(UPSTREAM_SEED_BASE + seed)
    dout = _random_dout(out, rng)
    dx = _as_tuple(module.backward(dout))
    names = list(grad_names) if grad_names is not None else float_names
    if all(g is None for g in dx):
        input_grads = {}
    else:
        input_grads = _match_grads(names, dx, "module.backward")
    param_grads = {n: g.copy() for n, g in module.grads.items()}

    errors = {}
    noise = _noise(out, dout, eps)
    for i, (name, g) in enumerate(input_grads.items()):
        errors[name] = _compare(f, inputs[name], g, dout, eps, directional, seed + i, name, noise)
    for i, (name, p) in enumerate(params.items()):
        errors[name] = _compare(f, p, param_grads[name], dout, eps, directional, seed + 100 + i, name, noise)
    return errors


# --------------------------------------------------------------------------
# The CLI's table: every op and module at small representative shapes
# --------------------------------------------------------------------------
def _op_cases():
    """(name, shapes, thunk returning {name: error}) for every op."""
    from . import ops

    r = np.random.default_rng(1234)

    def n(*shape):
        return r.standard_normal(shape)

    def away_from_zero(x):  # ReLU's kink: keep every value at least 0.05 from 0
        return x + 0.05 * np.sign(x)

    def dropout_fwd(x):
        return ops.dropout_forward(x, 0.3, np.random.default_rng(7))

    cases = [
        ("linear", "x(2,3,4) w(4,5) b(5)",
         lambda: check_op(ops.linear_forward, ops.linear_backward, {"x": n(2, 3, 4), "w": n(4, 5), "b": n(5)})),
        ("linear (no bias)", "x(3,4) w(4,2)",
         lambda: check_op(ops.linear_forward, ops.linear_backward, {"x": n(3, 4), "w": n(4, 2)})),
        ("embedding", "ids(2,5) repeated, table(6,3)",
         lambda: check_op(ops.embedding_forward, ops.embedding_backward,
                          {"ids": np.array([[1, 2, 1, 5, 1], [0, 2, 2, 3, 1]]), "table": n(6, 3)})),
        ("layernorm", "x(2,3,5) gamma(5) beta(5)",
         lambda: check_op(ops.layernorm_forward, ops.layernorm_backward,
                          {"x": n(2, 3, 5), "gamma": n(5), "beta": n(5)})),
        ("gelu", "x(2,3,4)", lambda: check_op(ops.gelu_forward, ops.gelu_backward, {"x": 2 * n(2, 3, 4)})),
        ("relu", "x(2,3,4)", lambda: check_op(ops.relu_forward, ops.relu_backward, {"x": away_from_zero(n(2, 3, 4))})),
        ("softmax", "x(2,3,5)", lambda: check_op(ops.softmax_forward, ops.softmax_backward, {"x": n(2, 3, 5)})),
        ("attention", "q,k,v(2,2,3,4)",
         lambda: check_op(ops.attention_forward, ops.attention_backward,
                          {"q": n(2, 2, 3, 4), "k": n(2, 2, 3, 4), "v": n(2, 2, 3, 4)})),
        ("attention causal", "q(1,3,4,2) k,v(1,3,4,2)",
         lambda: check_op(ops.attention_forward, ops.attention_backward,
                          {"q": n(1, 3, 4, 2), "k": n(1, 3, 4, 2), "v": n(1, 3, 4, 2)}, kwargs={"causal": True})),
        ("attention causal Tq<Tk", "q(2,1,2,3) k,v(2,1,5,3)",
         lambda: check_op(ops.attention_forward, ops.attention_backward,
                          {"q": n(2, 1, 2, 3), "k": n(2, 1, 5, 3), "v": n(2, 1, 5, 3)}, kwargs={"causal": True})),
        ("attention mask", "q,k,v(2,2,3,4) mask(2,1,1,3)",
         lambda: check_op(ops.attention_forward, ops.attention_backward,
                          {"q": n(2, 2, 3, 4), "k": n(2, 2, 3, 4), "v": n(2, 2, 3, 4)},
                          kwargs={"mask": np.array([True, True, False, True, False, True]).reshape(2, 1, 1, 3)})),
        ("cross_entropy", "logits(2,4,7) targets(2,4) w/ ignore",
         lambda: check_op(ops.cross_entropy_forward, ops.cross_entropy_backward,
                          {"logits": 3 * n(2, 4, 7),
                           "targets": np.array([[0, 6, -100, 3], [2, 2, 5, -100]])})),
        ("dropout p=0.3", "x(3,5)", lambda: check_op(dropout_fwd, ops.dropout_backward, {"x": n(3, 5)})),
        ("distillation T=2 alpha=0.7", "student,teacher(2,3,6) targets(2,3)",
         lambda: check_op(ops.distillation_forward, ops.distillation_backward,
                          {"student_logits": 2 * n(2, 3, 6), "teacher_logits": 2 * n(2, 3, 6),
                           "targets": np.array([[0, 5, -100], [2, 2, 1]])},
                          kwargs={"temperature": 2.0, "alpha": 0.7, "teacher_grad": True})),
        ("span loss", "start,end(2,6) masked",
         lambda: check_op(ops.span_loss_forward, ops.span_loss_backward,
                          {"start_logits": 2 * n(2, 6), "end_logits": 2 * n(2, 6), "starts": np.array([3, 5]),
                           "ends": np.array([4, 5])},
                          kwargs={"mask": np.array([[False, False, True, True, True, False], [False] + [True] * 5])})),
    ]
    return cases


def _randomize(module, rng):
    """Give every parameter random O(1) values (inits like zero biases or unit gammas hide bugs)."""
    for p in module.params.values():
        p[...] = get_array_module(p).asarray(0.5 * rng.standard_normal(p.shape))
    return module


#: Module name -> (shapes, builder(nn, rng) -> (module, inputs dict, kwargs)).
def _module_specs():
    def x_in(rng, *shape):
        return rng.standard_normal(shape)

    f64 = dict(dtype="float64")
    return [
        ("Linear", "x(2,3,4) -> 5", lambda nn, r: (nn.Linear(4, 5, **f64), {"x": x_in(r, 2, 3, 4)}, {})),
        ("QuantizedLinear", "x(2,3,4) -> 5, int8 groups of 2",
         lambda nn, r: (nn.QuantizedLinear.from_linear(nn.Linear(4, 5, **f64), 2), {"x": x_in(r, 2, 3, 4)}, {})),
        ("LoRALinear float base", "x(2,3,4) -> 5, rank 2",
         lambda nn, r: (nn.LoRALinear(nn.FrozenLinear.from_linear(nn.Linear(4, 5, **f64)), 2, alpha=3),
                        {"x": x_in(r, 2, 3, 4)}, {})),
        ("LoRALinear int8 base", "x(2,3,4) -> 5, rank 2",
         lambda nn, r: (nn.LoRALinear(nn.QuantizedLinear.from_linear(nn.Linear(4, 5, **f64)), 2, alpha=3),
                        {"x": x_in(r, 2, 3, 4)}, {})),
        ("Embedding", "ids(2,4), V=7 C=3",
         lambda nn, r: (nn.Embedding(7, 3, **f64), {"ids": np.array([[1, 1, 6, 0], [3, 1, 6, 6]])}, {})),
        ("PositionalEmbedding", "x(2,3,4) max_len 5",
         lambda nn, r: (nn.PositionalEmbedding(5, 4, **f64), {"x": x_in(r, 2, 3, 4)}, {})),
        ("SinusoidalPositionalEncoding", "x(2,3,4)",
         lambda nn, r: (nn.SinusoidalPositionalEncoding(5, 4, **f64), {"x": x_in(r, 2, 3, 4)}, {})),
        ("LayerNorm", "x(2,3,5)", lambda nn, r: (nn.LayerNorm(5, **f64), {"x": x_in(r, 2, 3, 5)}, {})),
        ("FeedForward gelu", "x(2,3,4) hidden 8",
         lambda nn, r: (nn.FeedForward(4, 8, activation="gelu", **f64), {"x": x_in(r, 2, 3, 4)}, {})),
        ("FeedForward relu", "x(2,3,4) hidden 8",
         lambda nn, r: (nn.FeedForward(4, 8, activation="relu", **f64), {"x": x_in(r, 2, 3, 4)}, {})),
        ("MultiHeadAttention causal", "x(2,4,6) 2 heads",
         lambda nn, r: (nn.MultiHeadAttention(6, 2, causal=True, **f64), {"x": x_in(r, 2, 4, 6)}, {})),
        ("MultiHeadAttention cross", "x(2,3,6) ctx(2,5,6) 3 heads",
         lambda nn, r: (nn.MultiHeadAttention(6, 3, cross=True, **f64),
                        {"x": x_in(r, 2, 3, 6), "context": x_in(r, 2, 5, 6)}, {})),
        ("Block", "x(2,4,6) 2 heads", lambda nn, r: (nn.Block(6, 2, **f64), {"x": x_in(r, 2, 4, 6)}, {})),
        ("TransformerEncoder", "x(2,3,4) 2 heads, padded",
         lambda nn, r: (nn.TransformerEncoder(4, 2, 1, **f64), {"x": x_in(r, 2, 3, 4)},
                        {"mask": np.array([[True, True, False], [True, True, True]])})),
        ("TransformerDecoder", "y(2,3,4) memory(2,2,4), padded",
         lambda nn, r: (nn.TransformerDecoder(4, 2, 1, **f64), {"y": x_in(r, 2, 3, 4), "memory": x_in(r, 2, 2, 4)},
                        {"memory_mask": np.array([[True, False], [True, True]])})),
    ]


def _module_cases():
    """Like _op_cases for npflux.nn; a missing module is listed as skipped (thunk None)."""
    try:
        from . import nn
    except Exception as exc:  # npflux.nn not written yet, or broken
        return [(name, shapes, None, f"npflux.nn unavailable: {exc}") for name, shapes, _ in _module_specs()]
    cases = []
    for name, shapes, build in _module_specs():
        cls_name = name.split()[0]
        if not hasattr(nn, cls_name):
            cases.append((name, shapes, None, f"npflux.nn.{cls_name} not found"))
            continue

        def thunk(build=build):
            rng = np.random.default_rng(99)
            module, inputs, kwargs = build(nn, rng)
            module.eval()
            _randomize(module, rng)
            return check_module(module, inputs, kwargs=kwargs)

        cases.append((name, shapes, thunk, None))
    return cases


def run_all(verbose=True, threshold=THRESHOLD):
    """Check every op and every module at small shapes; print a table; True when all pass.

    This is what ``npflux gradcheck`` runs. Modules of npflux.nn that do not
    exist (yet) are listed as SKIP, not counted as failures; a module that
    exists but raises is a FAIL.
    """
    rows = []
    cases = [(n, s, t, None) for n, s, t in _op_cases()] + _module_cases()
    all_ok = True
    for name, shapes, thunk, skip in cases:
        if thunk is None:
            rows.append((name, shapes, "-", "SKIP", skip))
            continue
        t0 = time.perf_counter()
        try:
            errors = thunk()
        except Exception as exc:  # a crash is a failure, reported, not raised
            rows.append((name, shapes, "-", "FAIL", f"{type(exc).__name__}: {exc}"))
            all_ok = False
            continue
        worst_name, worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
        ok = worst <= threshold
        all_ok &= ok
        rows.append((name, shapes, f"{worst:.2e}", "ok" if ok else "FAIL",
                     f"worst: {worst_name} ({time.perf_counter() - t0:.2f}s)"))
    if verbose:
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        print(f"{'name':<{w0}}  {'shapes':<{w1}}  {'max rel err':>11}  result")
        print("-" * (w0 + w1 + 30))
        for name, shapes, err, status, note in rows:
            print(f"{name:<{w0}}  {shapes:<{w1}}  {err:>11}  {status:<4}  {note or ''}")
        n_ok = sum(r[3] == "ok" for r in rows)
        n_skip = sum(r[3] == "SKIP" for r in rows)
        print(f"{n_ok} passed, {len(rows) - n_ok - n_skip} failed, {n_skip} skipped (threshold {threshold:g})")
    return all_ok

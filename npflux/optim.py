"""Optimizers, gradient clipping and learning-rate schedules.

Parameters and gradients are plain dicts ``name -> array`` (NumPy or CuPy),
the same dicts a ``Module`` exposes as ``params`` and ``grads``. An optimizer
keeps a reference to the parameter arrays and updates them IN PLACE, so the
model sees the new values without any copying back.

The updates are exactly those of ``torch.optim.AdamW`` and ``torch.optim.SGD``
(tests/test_optim.py compares them step by step in float64), written with
in-place operations and one shared scratch buffer so that a step allocates no
parameter-sized temporaries. Moment buffers take the dtype of their parameter:
a float32 model keeps float32 state.

Schedules are plain functions ``step -> lr``; the training loop assigns the
result to ``optimizer.lr`` before each step, as nanoGPT does.

State dicts are flat: ``{"type": ..., "step": int, <hyperparameters>...,
"m.<name>": array, ...}``. Array values can go to a safetensors file and the
rest (JSON-able scalars and lists) to JSON; ``split_state_dict`` does that.
"""
from __future__ import annotations

import math

from . import kernels
from .backend import flat_base, get_array_module
from .parallel import parallel_map, row_chunks


# ---------------------------------------------------------------------------
# helpers shared by the optimizers
# ---------------------------------------------------------------------------


def nanogpt_decay(name, array) -> bool:
    """nanoGPT's weight-decay grouping: decay matrices, not biases or norm gains.

    Every parameter with two or more dimensions (linear weights, embeddings)
    is decayed; vectors (biases, LayerNorm weight and bias) are not.
    """
    return array.ndim >= 2


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def split_state_dict(state: dict):
    """Split a flat optimizer state dict into ``(arrays, scalars)``.

    ``arrays`` holds every array value (for a safetensors file), ``scalars``
    everything else (for JSON). ``{**arrays, **scalars}`` is the original.
    """
    arrays = {k: v for k, v in state.items() if _is_array(v)}
    scalars = {k: v for k, v in state.items() if not _is_array(v)}
    return arrays, scalars


class _Scratch:
    """Flat work buffers reused by every parameter of one dtype and device.

    An update such as ``v = b2*v + (1-b2)*g*g`` needs somewhere to put ``g*g``.
    Allocating it per step and per parameter would double the memory traffic;
    instead each parameter borrows a view of a buffer as large as the largest
    parameter.
    """

    def __init__(self, params: dict, count: int = 1):
        self.count = count
        self.buffers = {}
        for p in params.values():
            key = self._key(p)
            size = max(p.size, self.buffers.get(key, 0))
            self.buffers[key] = size
        for key, size in list(self.buffers.items()):
            xp, dtype = key[0], key[1]
            self.buffers[key] = [xp.empty(size, dtype=dtype) for _ in range(count)]

    @staticmethod
    def _key(p):
        xp = get_array_module(p)
        device = getattr(getattr(p, "device", None), "id", None) if xp.__name__ == "cupy" else None
        return (xp, p.dtype, device)

    def views(self, p):
        """``count`` uninitialised arrays shaped like ``p`` (valid until the next call)."""
        return [buf[: p.size].reshape(p.shape) for buf in self.buffers[self._key(p)]]


class _Optimizer:
    """What AdamW and SGD share: parameter bookkeeping and state-dict plumbing."""

    kind = "optimizer"
    hyperparameters: tuple = ()

    def __init__(self, params: dict, lr: float, weight_decay: float, decay_filter):
        if not isinstance(params, dict) or not params:
            raise ValueError("params must be a non-empty dict name -> array")
        for name, p in params.items():
            if not _is_array(p) or p.dtype.kind != "f":
                raise TypeError(f"parameter {name!r} must be a floating-point array, got {getattr(p, 'dtype', type(p))}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.decay_filter = decay_filter
        # Which parameters get weight decay is decided once, like torch's param groups.
        self.decayed = {name: decay_filter is None or bool(decay_filter(name, p)) for name, p in params.items()}
        self.step_count = 0
        # Parameters living in one buffer (Module.flatten_parameters) are updated in one go.
        self.flat_params = flat_base(params.values())
        self._flat_grads_seen = (None, None)

    def _state_buffer(self):
        """name -> zeroed state array per parameter; views of one flat buffer when the parameters are flat."""
        if self.flat_params is None:
            return None, {n: get_array_module(p).zeros_like(p) for n, p in self.params.items()}
        flat = get_array_module(self.flat_params).zeros_like(self.flat_params)
        views, offset = {}, 0
        for name, p in self.params.items():
            views[name] = flat[offset : offset + p.size].reshape(p.shape)
            offset += p.size
        return flat, views

    def _flat_grads(self, grads: dict):
        """The gradients' flat buffer when both they and the parameters are flat, else None."""
        if self.flat_params is None:
            return None
        arrays = [grads[n] for n in self.params]
        seen, base = self._flat_grads_seen
        # The same array objects as last step (held, so their ids cannot be reused): same answer.
        if seen is None or len(seen) != len(arrays) or any(a is not b for a, b in zip(seen, arrays)):
            base = flat_base(arrays)
            self._flat_grads_seen = (arrays, base)
        return base

    def _decay_runs(self):
        """(start, stop) ranges of the flat buffer that get weight decay, neighbours merged."""
        runs, offset = [], 0
        for name, p in self.params.items():
            if self.decayed[name]:
                if runs and runs[-1][1] == offset:
                    runs[-1] = (runs[-1][0], offset + p.size)
                else:
                    runs.append((offset, offset + p.size))
            offset += p.size
        return runs

    def _check_grads(self, grads: dict):
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise KeyError(f"grads is missing {len(missing)} parameter(s): {', '.join(missing[:5])}")
        for name, p in self.params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, parameter has {p.shape}")

    def _buffers(self) -> dict:
        """Prefix -> dict name -> array of per-parameter state (overridden)."""
        return {}

    def state_dict(self) -> dict:
        """A snapshot: copies of the state arrays plus JSON-able scalars."""
        state = {"type": self.kind, "step": int(self.step_count), "lr": float(self.lr)}
        for h in self.hyperparameters:
            value = getattr(self, h)
            state[h] = list(value) if isinstance(value, tuple) else value
        for prefix, bufs in self._buffers().items():
            for name, arr in bufs.items():
                state[f"{prefix}.{name}"] = arr.copy()
        return state

    def load_state_dict(self, state: dict):
        """Restore a ``state_dict()``: step, hyperparameters and state arrays.

        The arrays are copied into this optimizer's own buffers, so they land
        on the parameters' device and in their dtype wherever they came from.
        """
        if state.get("type") != self.kind:
            raise ValueError(f"state dict is for optimizer {state.get('type')!r}, not {self.kind!r}")
        self._load_buffers(state)
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])
        for h in self.hyperparameters:
            value = state[h]
            setattr(self, h, tuple(value) if isinstance(value, list) else value)

    def _load_buffers(self, state: dict):
        for prefix, bufs in self._buffers().items():
            for name, p in self.params.items():
                key = f"{prefix}.{name}"
                if key not in state:
                    raise KeyError(f"optimizer state has no {key!r} (was it saved for another model?)")
                if tuple(state[key].shape) != p.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {tuple(state[key].shape)}, parameter has {p.shape}")
            for name, p in self.params.items():
                xp = get_array_module(p)
                bufs[name][...] = xp.asarray(state[f"{prefix}.{name}"], dtype=p.dtype)


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    One step, for each parameter p with gradient g, at step t = 1, 2, ...::

        p  <- p - lr * wd * p                     (decoupled decay, only if p is decayed)
        m  <- b1 * m + (1 - b1) * g               (first moment)
        v  <- b2 * v + (1 - b2) * g * g           (second moment)
        p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Note where ``eps`` goes: after the square root of the bias-corrected
    second moment, exactly as PyTorch does (the Adam paper's form).

    ``decay_filter(name, array) -> bool`` picks the parameters that get weight
    decay (the rest behave like torch's param group with weight_decay=0);
    ``None`` decays all of them. ``nanogpt_decay`` is nanoGPT's choice.
    ``lr`` is a plain attribute: a schedule may change it between steps.
    """

    kind = "AdamW"
    hyperparameters = ("betas", "eps", "weight_decay")

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay_filter=None):
        super().__init__(params, lr, weight_decay, decay_filter)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.flat_m, self.m = self._state_buffer()
        self.flat_v, self.v = self._state_buffer()
        self._scratch = _Scratch(params if self.flat_params is None else {"": self.flat_params}, count=1)
        self._runs = self._decay_runs()

    def _buffers(self):
        return {"m": self.m, "v": self.v}

    def step(self, grads: dict):
        """Apply one update to every parameter, in place, from ``grads``."""
        self._check_grads(grads)
        self.step_count += 1
        t = self.step_count
        lr, wd = float(self.lr), float(self.weight_decay)
        b1, b2 = self.betas
        # Bias corrections undo the zero initialisation of m and v.
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        flat_g = self._flat_grads(grads)
        if flat_g is not None and kernels.use_for(self.flat_params, flat_g, self.flat_m, self.flat_v):
            return self._fused_flat_step(flat_g, 1.0 - lr * wd, step_size, bc2_sqrt)
        if flat_g is not None:
            p = self.flat_params
            if wd != 0.0:
                for start, stop in self._runs:
                    p[start:stop] *= 1.0 - lr * wd
            (tmp,) = self._scratch.views(p)
            m, v = self.flat_m, self.flat_v
            # element-wise, so any split of the buffer over the worker threads gives the same result
            parallel_map(lambda r: self._update(p[r], flat_g[r], m[r], v[r], tmp[r], step_size, bc2_sqrt),
                         row_chunks(get_array_module(p), p.size))
            return
        for name, p in self.params.items():
            if wd != 0.0 and self.decayed[name]:
                p *= 1.0 - lr * wd
            (tmp,) = self._scratch.views(p)
            self._update(p, grads[name], self.m[name], self.v[name], tmp, step_size, bc2_sqrt)

    def _fused_flat_step(self, flat_g, decay, step_size, bc2_sqrt):
        """The flat buffer's step through ``kernels.adamw_update``, the decay folded in: each worker
        thread's share of the buffer, a kernel call per stretch that is decayed or not."""
        p, m, v = self.flat_params, self.flat_m, self.flat_v
        bounds = sorted({0, p.size, *(i for run in self._runs for i in run)})
        decayed = {start for start, _ in self._runs}

        def share(r):
            for start, stop in zip(bounds, bounds[1:]):
                lo, hi = max(start, r.start), min(stop, r.stop)
                if lo < hi:
                    kernels.adamw_update(p[lo:hi], flat_g[lo:hi], m[lo:hi], v[lo:hi], *self.betas, step_size,
                                         bc2_sqrt, self.eps, decay=decay if start in decayed else 1.0)

        parallel_map(share, row_chunks(get_array_module(p), p.size))

    def _update(self, p, g, m, v, tmp, step_size, bc2_sqrt):
        """The Adam part of the step, in place, for one array (or a piece of the flat buffer of all);
        ``tmp`` is scratch space of p's shape. With numba installed, one compiled pass over
        the array (``kernels.adamw_update``) instead of the twelve NumPy passes below; the flat
        buffer goes through ``_fused_flat_step`` instead."""
        xp = get_array_module(p)
        b1, b2 = self.betas
        if kernels.use_for(p, g, m, v) and all(a.flags.c_contiguous for a in (p, g, m, v)):
            flat = [a.reshape(-1) for a in (p, g, m, v)]  # views: the kernel writes p, m, v in place
            return kernels.adamw_update(*flat, b1, b2, step_size, bc2_sqrt, self.eps)
        m *= b1
        xp.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        # denominator sqrt(v_hat) + eps, then the step -step_size * m / denom
        xp.sqrt(v, out=tmp)
        tmp /= bc2_sqrt
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= -step_size
        p += tmp


# ---------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum, as torch.optim.SGD.

    With d = g + wd * p (L2 weight decay, coupled, as in torch's SGD)::

        buf <- d                                   on the first step
        buf <- momentum * buf + (1 - dampening) * d afterwards
        d   <- d + momentum * buf  (nesterov)   or   d <- buf  (plain momentum)
        p   <- p - lr * d

    ``decay_filter`` works as for AdamW. The gradients are not modified.
    """

    kind = "SGD"
    hyperparameters = ("momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params: dict, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, dampening: float = 0.0, decay_filter=None):
        super().__init__(params, lr, weight_decay, decay_filter)
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.buf = {n: get_array_module(p).zeros_like(p) for n, p in params.items()} if momentum else {}
        self._scratch = _Scratch(params, count=2 if nesterov else 1)

    def _buffers(self):
        return {"momentum": self.buf} if self.momentum else {}

    def step(self, grads: dict):
        """Apply one update to every parameter, in place, from ``grads``."""
        self._check_grads(grads)
        first = self.step_count == 0
        self.step_count += 1
        lr, wd, mu = float(self.lr), float(self.weight_decay), self.momentum
        for name, p in self.params.items():
            g = grads[name]
            xp = get_array_module(p)
            views = self._scratch.views(p)
            d = views[0]
            if wd != 0.0 and self.decayed[name]:
                xp.multiply(p, wd, out=d)
                d += g
            else:
                d[...] = g
            if mu != 0.0:
                buf = self.buf[name]
                if first:
                    buf[...] = d
                else:
                    buf *= mu
                    if self.dampening:
                        # nesterov is off here, so d may be scaled in place
                        d *= 1.0 - self.dampening
                    buf += d
                if self.nesterov:
                    xp.multiply(buf, mu, out=views[1])
                    d += views[1]
                else:
                    d[...] = buf
            d *= -lr
            p += d


# ---------------------------------------------------------------------------
# gradient clipping
# ---------------------------------------------------------------------------


def _grad_arrays(grads: dict) -> list:
    arrays = list(grads.values())
    flat = flat_base(arrays) if arrays else None
    return [flat] if flat is not None else arrays  # all gradients in one buffer: one product, one scaling


def global_norm(grads: dict, across=None) -> float:
    """The L2 norm of all gradients together, as a Python float (nan or inf when a gradient is not finite).

    ``across(x)``: the sum of ``x`` over the processes that each hold a slice of
    the gradients (ZeRO, ``npflux.distributed``); the squares are added there
    before the root, so the norm is that of all the slices together.
    """
    total_sq = None
    for g in _grad_arrays(grads):  # sum the squares on the device and synchronise once, not once per tensor
        xp = get_array_module(g)
        flat = g.reshape(-1)
        sq = xp.dot(flat, flat)
        total_sq = sq if total_sq is None else total_sq + sq
    total_sq = 0.0 if total_sq is None else float(total_sq)
    return float(math.sqrt(across(total_sq) if across is not None else total_sq))


def clip_grad_norm(grads: dict, max_norm: float, across=None) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the norm is taken over all
    gradients together, and when it exceeds ``max_norm`` every gradient is
    multiplied, in place, by ``max_norm / (norm + 1e-6)`` (the epsilon keeps
    the division safe and leaves the clipped norm just under max_norm).
    Returns the norm BEFORE clipping as a Python float (for logging). A
    non-finite norm is returned as it is and, as in torch, turns the
    gradients into NaN/0; callers that care should check it. ``across``: as
    for ``global_norm`` (each process clips its slice by the global norm).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    arrays = _grad_arrays(grads)
    total = global_norm(grads, across)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in arrays:
            g *= coef
    return total


# ---------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------


def constant(step: int, lr: float) -> float:
    """The same learning rate at every step."""
    return float(lr)


def cosine_with_warmup(step: int, max_lr: float, warmup_steps: int, decay_steps: int, min_lr: float) -> float:
    """nanoGPT's ``get_lr``: linear warmup, cosine decay, then a floor.

    - ``step < warmup_steps``: ``max_lr * (step + 1) / (warmup_steps + 1)``,
      so the very first step already has a small non-zero rate and the last
      warmup step is just below ``max_lr``;
    - ``warmup_steps <= step <= decay_steps``: cosine from ``max_lr`` (at
      ``warmup_steps``) down to ``min_lr`` (at ``decay_steps``);
    - ``step > decay_steps``: ``min_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or decay_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= decay_steps, got {warmup_steps}, {decay_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return float(min_lr)
    decay_ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)

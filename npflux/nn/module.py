"""The Module base class: parameters, gradients, children, state dicts.

A module owns arrays in ``self.p`` (its own parameters, by short name) and the
gradients of the same shapes in ``self.g``. Children are modules assigned as
attributes (``self.ln_1 = LayerNorm(...)``), as in PyTorch. ``params`` and
``grads`` give every array of the module and its children under dotted names
("h.0.ln_1.weight"), the SAME array objects, so an optimizer holding
``params`` updates the model in place and ``backward`` adding into ``self.g``
is seen through ``grads``.

Convention: ``forward`` keeps what ``backward`` needs on ``self``;
``backward(dout)`` returns the gradient of the input and ADDS into the
gradients, so calling forward/backward on several micro-batches accumulates.
"""
import contextlib

from ..backend import get_array_module, get_backend, resolve_dtype


class Module:
    # Bumped whenever any module gains a parameter or a child, so a cached
    # ``params``/``grads`` dict is known to be current (see _collect_cached).
    _structure_version = 0

    def __init__(self, backend=None, dtype=None):
        object.__setattr__(self, "_children", {})
        self.backend = get_backend(backend)
        self.dtype = resolve_dtype(dtype)
        self.xp = self.backend.xp
        self.p = {}
        self.g = {}
        self.training = True

    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._children[name] = value
            Module._structure_version += 1
        object.__setattr__(self, name, value)

    # -- parameters -------------------------------------------------------
    def add_param(self, name, host_array):
        """Register a parameter from a host (NumPy) array; it lives on this module's backend and dtype."""
        value = self.backend.asarray(host_array, dtype=self.dtype)
        self.p[name] = value
        self.g[name] = self.xp.zeros_like(value)
        Module._structure_version += 1
        return value

    def named_children(self):
        return self._children.items()

    def named_modules(self, prefix=""):
        """(dotted path, module) for this module (path "") and every descendant, parents first."""
        yield prefix.rstrip("."), self
        for name, child in list(self._children.items()):
            yield from child.named_modules(f"{prefix}{name}.")

    def _collect(self, attr, prefix=""):
        out = {prefix + k: v for k, v in getattr(self, attr).items()}
        for name, child in self._children.items():
            out.update(child._collect(attr, f"{prefix}{name}."))
        return out

    def _collect_cached(self, attr):
        # A training loop asks for model.grads every step; walking the tree each
        # time costs more than the update of a small model's biases.
        cache = self.__dict__.setdefault("_collected", {})
        version, found = cache.get(attr, (None, None))
        if version != Module._structure_version:
            found = self._collect(attr)
            cache[attr] = (Module._structure_version, found)
        return dict(found)

    @property
    def params(self):
        """Every parameter array by dotted name (a new dict of the live arrays)."""
        return self._collect_cached("p")

    @property
    def grads(self):
        """The gradient arrays, keyed exactly as ``params``."""
        return self._collect_cached("g")

    def num_parameters(self):
        return sum(int(v.size) for v in self.params.values())

    def zero_grad(self):
        flat = getattr(self, "_flat_grads", None)
        if flat is not None:
            flat.fill(0)
            return
        for g in self.grads.values():
            g[...] = 0

    def _owners(self, prefix=""):
        """(module, short name, dotted name) for every parameter, in ``params`` order."""
        for k in self.p:
            yield self, k, prefix + k
        for name, child in self._children.items():
            yield from child._owners(f"{prefix}{name}.")

    def flatten_parameters(self):
        """Move all parameters into one contiguous buffer, and all gradients into another.

        Values are kept; every ``p[name]`` and ``g[name]`` becomes a view of
        its buffer, in ``params`` order. An optimizer then updates the whole
        model with a dozen array operations instead of a dozen per parameter,
        which is most of an AdamW step's time for a small model.
        ``zero_grad`` clears the gradient buffer in one call. Call it before
        creating the optimizer. Returns (flat_params, flat_grads).

        The contract, stated here once, beside the only code that makes it:

        - every parameter and every gradient is a view of one of the two
          buffers, back to back in ``params`` order (``backend.flat_base``
          recognises this, and ``optim`` and ``clip_grad_norm`` then work on
          the buffer in one go; anything else takes their per-array path);
        - code writes parameters and gradients in place (``p[...] = v``,
          ``g += dw``) and never rebinds ``module.p[name]`` to a new array:
          only this method does, and ``nn.convert.refresh_flat_parameters``,
          which calls it again after layers were swapped.
        """
        owners = list(self._owners())
        total = sum(int(m.p[k].size) for m, k, _ in owners)
        flat_p = self.xp.empty(total, dtype=self.dtype)
        flat_g = self.xp.zeros(total, dtype=self.dtype)
        offset = 0
        for module, k, _ in owners:
            old = module.p[k]
            n = int(old.size)
            view = flat_p[offset : offset + n].reshape(old.shape)
            view[...] = old
            module.p[k] = view
            module.g[k] = flat_g[offset : offset + n].reshape(old.shape)
            offset += n
        Module._structure_version += 1
        object.__setattr__(self, "_flat_grads", flat_g)
        return flat_p, flat_g

    def share_parameters_of(self, source: "Module"):
        """Make every parameter of this module the SAME array as ``source``'s; gradients stay its own.

        The two must have the same parameter names, shapes, dtypes and array
        types (else ValueError, nothing changed). Afterwards an optimizer step on ``source`` is seen
        here at once, and a backward here adds into this module's gradients
        only: a replica that computes gradients for another share of a batch
        (``npflux.training.threads``). The one other place, with
        ``flatten_parameters``, that rebinds ``p[name]``.
        """
        mine, theirs = list(self._owners()), list(source._owners())

        def layout(owners):
            return [(n, tuple(m.p[k].shape), m.p[k].dtype, type(m.p[k])) for m, k, n in owners]
        if layout(mine) != layout(theirs):
            raise ValueError("share_parameters_of: the modules differ in their parameters' names, shapes or dtypes")
        for (module, k, _), (src, src_k, _) in zip(mine, theirs):
            module.p[k] = src.p[src_k]
        Module._structure_version += 1

    # -- modes --------------------------------------------------------------
    def train(self, mode=True):
        self.training = mode
        for child in self._children.values():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self):
        """``with model.evaluating():`` runs the block in eval mode (no dropout) and puts the previous
        mode back after it, also when the block raises."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    # -- state dicts ----------------------------------------------------------
    def state_dict(self):
        """name -> parameter array (the live arrays, not copies, as in PyTorch)."""
        return dict(self.params)

    def load_state_dict(self, state, strict=True):
        """Copy arrays from ``state`` into the parameters, in place, checking names, shapes and finiteness.

        Values may be NumPy or CuPy arrays of any float dtype (an integer array is
        refused); they are cast to this module's dtype and moved to its device. With ``strict``, missing
        or unexpected names are an error.
        """
        params = self.params
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing[:8]}, unexpected {unexpected[:8]}")
        # Check every array before copying any, so a rejected state dict leaves the module untouched.
        loaded = {}
        for name, value in state.items():
            if name not in params:
                continue
            target = params[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
            if getattr(getattr(value, "dtype", None), "kind", "f") != "f":
                # weights are floating point: integer or bool bits cast to float would be garbage, silently
                raise ValueError(f"load_state_dict: {name} is {value.dtype}, not a floating-point array")
            value = self.backend.asarray(value, dtype=target.dtype)
            if not bool(self.xp.isfinite(value).all()):
                raise ValueError(f"load_state_dict: {name} holds values that are not finite (NaN or inf)")
            loaded[name] = value
        for name, value in loaded.items():
            params[name][...] = value
        return missing, unexpected


class ModuleList(Module):
    """A list of modules whose children are named "0", "1", ...

    So a GPT's blocks are ``transformer.h.{i}`` and an encoder's layers
    ``layers.{i}``, the parameter names of GPT-2 and torch; ``items`` keeps
    them in order for the forward and the backward (reversed) loops.
    """

    def __init__(self, modules, backend=None, dtype=None):
        super().__init__(backend, dtype)
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self.items = list(modules)


def sum_to_shape(dy, shape):
    """Sum ``dy`` over the leading axes it has beyond ``shape`` (the backward of a broadcast)."""
    xp = get_array_module(dy)
    lead = dy.ndim - len(shape)
    return xp.sum(dy, axis=tuple(range(lead))) if lead > 0 else dy

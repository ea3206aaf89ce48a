"""LoRA: a trainable low-rank update on a frozen linear layer (Hu et al., 2021).

    y = base(x) + s * (x @ A) @ B,      s = alpha / r
    A (in, r) ~ U(-1/sqrt(in), 1/sqrt(in)),   B (r, out) = 0

so a fresh adapter leaves the model unchanged, and training moves only the
r * (in + out) numbers of A and B. The base is a ``FrozenLinear`` (float
weight) or a ``QuantizedLinear`` (int8 weight: QLoRA): it has no parameters
and no gradient arrays, so its weight's gradient is never computed.

Backward, with h = x @ A (kept from the forward):

    dB = s * h^T dy                  (leading axes summed)
    dh = s * dy @ B^T
    dA = x^T dh
    dx = base.backward(dy) + dh @ A^T

``merge()`` folds s * A @ B into a float base weight (inference then costs
what the plain layer costs); ``unmerge()`` takes it out again.
"""
import math

from ..backend import get_backend
from .layers import Linear
from .module import Module
from .quant import (
    FrozenLinear, QuantizedLinear, input_grad, named_modules, path_matches, refresh_flat_parameters, set_submodule,
)


class LoRALinear(Module):
    def __init__(self, base, rank, alpha=None, rng=None, backend=None, dtype=None):
        super().__init__(backend or base.backend, dtype or base.dtype)
        if not isinstance(base, (FrozenLinear, QuantizedLinear)):
            raise TypeError(f"LoRALinear: base must be a FrozenLinear or QuantizedLinear, got {type(base).__name__}")
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        n_in, n_out = base.shape
        if rank > min(n_in, n_out):
            raise ValueError(f"LoRA rank {rank} exceeds the layer's smaller side {min(n_in, n_out)} ({n_in} x {n_out})")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.base = base
        rng = rng if rng is not None else get_backend("numpy").rng(0)
        bound = 1.0 / math.sqrt(n_in)  # PyTorch's kaiming_uniform(a=sqrt(5)) on A, as peft does
        self.add_param("lora_A", rng.uniform(-bound, bound, (n_in, self.rank)))
        self.add_param("lora_B", self.xp.zeros((self.rank, n_out)))
        self.merged = False

    @property
    def shape(self):
        return self.base.shape

    def forward(self, x):
        y = self.base.forward(x)
        if self.merged:  # the update is inside the base weight
            return y
        A, B = self.p["lora_A"], self.p["lora_B"]
        x2 = x.reshape(-1, A.shape[0])
        h = x2 @ A
        y += ((h @ B) * self.scaling).reshape(y.shape)
        self.cache = (x2, h, x.shape)
        return y

    def backward(self, dy):
        if self.merged:
            raise RuntimeError("LoRALinear: backward on a merged layer; unmerge() before training")
        x2, h, x_shape = self.cache
        A, B = self.p["lora_A"], self.p["lora_B"]
        dy2 = dy.reshape(-1, B.shape[1])
        self.g["lora_B"] += self.scaling * (h.T @ dy2)
        dh = self.scaling * (dy2 @ B.T)
        self.g["lora_A"] += x2.T @ dh
        return self.base.backward(dy) + (dh @ A.T).reshape(x_shape)

    # -- merging -----------------------------------------------------------------
    def delta(self):
        """The update s * A @ B (in, out) this adapter adds to the base weight."""
        return self.scaling * (self.p["lora_A"] @ self.p["lora_B"])

    def merge(self):
        """W <- W + s A B: forward then runs the base layer alone."""
        self._check_mergeable()
        if not self.merged:
            self.base.buffers["weight"] += self.delta()
            self.merged = True

    def unmerge(self):
        """W <- W - s A B: back to base + adapter (equal up to rounding)."""
        self._check_mergeable()
        if self.merged:
            self.base.buffers["weight"] -= self.delta()
            self.merged = False

    def _check_mergeable(self):
        if not isinstance(self.base, FrozenLinear):
            raise TypeError("LoRALinear: cannot merge into an int8 base (the sum is not int8); "
                            "merge into a float model, then quantize")


# ---------------------------------------------------------------------------
# applying adapters to a model by module path
# ---------------------------------------------------------------------------


def apply_lora(model, targets, rank=8, alpha=None, seed=0):
    """Put LoRA adapters on the linear layers whose dotted paths match ``targets`` (fnmatch patterns).

    Every OTHER linear layer is frozen too (a FrozenLinear), so no linear
    weight of the model has a gradient array any more; the adapters' A and
    B are the model's only linear-layer parameters. Embeddings, layer norms
    and a GPT's lm_head keep theirs: pass ``lora_parameters(model)`` to the
    optimizer so that only the adapters train. A pattern that matches no
    linear layer is an error (a typo would otherwise train nothing).
    Returns the adapted paths.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("apply_lora: give at least one target pattern (e.g. 'attn.c_attn')")
    rng = get_backend("numpy").rng(seed)
    linears = [(path, m) for path, m in named_modules(model)
               if isinstance(m, (Linear, FrozenLinear, QuantizedLinear, LoRALinear))]
    if any(isinstance(m, LoRALinear) for _, m in linears):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    unmatched = [t for t in targets if not any(path_matches(path, t) for path, _ in linears)]
    if unmatched:
        raise ValueError(f"apply_lora: no linear layer matches {unmatched}; linear layers are "
                         f"{', '.join(path for path, _ in linears[:8])}{' ...' if len(linears) > 8 else ''}")
    adapted = []
    for path, m in linears:
        base = FrozenLinear.from_linear(m) if isinstance(m, Linear) else m
        if any(path_matches(path, t) for t in targets):
            base = LoRALinear(base, rank, alpha, rng=rng)
            adapted.append(path)
        if base is not m:
            set_submodule(model, path, base)
    refresh_flat_parameters(model)
    return adapted


def lora_modules(model):
    """(path, LoRALinear) for every adapter of the model."""
    return [(path, m) for path, m in named_modules(model) if isinstance(m, LoRALinear)]


def lora_parameters(model):
    """The adapters' parameters by dotted name (the live arrays): what the optimizer should get."""
    return {k: v for k, v in model.params.items() if k.endswith((".lora_A", ".lora_B"))}


def lora_gradients(model):
    return {k: v for k, v in model.grads.items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(model):
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model):
    for _, m in lora_modules(model):
        m.unmerge()

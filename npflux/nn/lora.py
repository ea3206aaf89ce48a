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

With column ``blocks`` (e.g. only the q and v thirds of the fused c_attn),
each block has its own A and B, and the same formulas hold on its columns
of y and dy; the blocks' dx terms add up.

``merge()`` folds s * A @ B into a float base weight (inference then costs
what the plain layer costs); ``unmerge()`` takes it out again.
"""
import math

from ..backend import get_backend
from .module import Module
from .quant import FrozenLinear, QuantizedLinear


class LoRALinear(Module):
    """LoRA on a frozen linear layer; ``blocks`` puts one adapter on each of some output column ranges.

    ``blocks`` maps a name to (start, stop) of the output columns, e.g. the q
    and v thirds of the fused q/k/v matrix c_attn, each with its own A and B
    (``lora_A_q``, ``lora_B_q``, ...), as separate q and v adapters would be.
    Without ``blocks`` one adapter spans all columns (``lora_A``, ``lora_B``).
    """

    def __init__(self, base, rank, alpha=None, rng=None, blocks=None, backend=None, dtype=None):
        super().__init__(backend or base.backend, dtype or base.dtype)
        if not isinstance(base, (FrozenLinear, QuantizedLinear)):
            raise TypeError(f"LoRALinear: base must be a FrozenLinear or QuantizedLinear, got {type(base).__name__}")
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        n_in, n_out = base.shape
        self.blocks = {"": (0, n_out)} if blocks is None else dict(blocks)
        for name, (start, stop) in self.blocks.items():
            if not 0 <= start < stop <= n_out:
                raise ValueError(f"LoRA block {name!r} columns {start}:{stop} are outside 0:{n_out}")
            if rank > min(n_in, stop - start):
                raise ValueError(f"LoRA rank {rank} exceeds the layer's smaller side {min(n_in, stop - start)} "
                                 f"({n_in} x {stop - start})")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        if not self.alpha > 0:  # 0 would make the adapter (and its gradients) vanish: training would do nothing
            raise ValueError(f"LoRA alpha must be positive, got {alpha}")
        self.scaling = self.alpha / self.rank
        self.base = base
        rng = rng if rng is not None else get_backend("numpy").rng(0)
        bound = 1.0 / math.sqrt(n_in)  # PyTorch's kaiming_uniform(a=sqrt(5)) on A, as peft does
        for name, (start, stop) in self.blocks.items():
            self.add_param(self._names(name)[0], rng.uniform(-bound, bound, (n_in, self.rank)))
            self.add_param(self._names(name)[1], self.xp.zeros((self.rank, stop - start)))
        self.merged = False

    @staticmethod
    def _names(block):
        suffix = f"_{block}" if block else ""
        return "lora_A" + suffix, "lora_B" + suffix

    @property
    def shape(self):
        return self.base.shape

    def forward(self, x):
        y = self.base.forward(x)
        if self.merged:  # the update is inside the base weight
            return y
        n_in, n_out = self.shape
        x2, y2 = x.reshape(-1, n_in), y.reshape(-1, n_out)  # y2 is a view: the adds land in y
        hs = {}
        for name, (start, stop) in self.blocks.items():
            a, b = self._names(name)
            hs[name] = x2 @ self.p[a]
            y2[:, start:stop] += (hs[name] @ self.p[b]) * self.scaling
        self.cache = (x2, hs, x.shape)
        return y

    def backward(self, dy):
        if self.merged:
            raise RuntimeError("LoRALinear: backward on a merged layer; unmerge() before training")
        x2, hs, x_shape = self.cache
        dy2 = dy.reshape(-1, self.shape[1])
        dx2 = self.base.backward(dy).reshape(x2.shape)  # a fresh array: the adapters' dx is added into it
        for name, (start, stop) in self.blocks.items():
            a, b = self._names(name)
            dy_block = dy2[:, start:stop]
            self.g[b] += self.scaling * (hs[name].T @ dy_block)
            dh = self.scaling * (dy_block @ self.p[b].T)
            self.g[a] += x2.T @ dh
            dx2 += dh @ self.p[a].T
        return dx2.reshape(x_shape)

    # -- merging -----------------------------------------------------------------
    def delta(self):
        """The update (in, out) the adapters add to the base weight: s * A @ B in each block's columns."""
        d = self.xp.zeros(self.shape, dtype=self.dtype)
        for name, (start, stop) in self.blocks.items():
            a, b = self._names(name)
            d[:, start:stop] = self.scaling * (self.p[a] @ self.p[b])
        return d

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


# The column blocks of the fused projections, in order (GPT-2's c_attn is [q | k | v]).
FUSED_BLOCKS = {"c_attn": ("q", "k", "v"), "kv_proj": ("k", "v")}


def lora_modules(model):
    """(path, LoRALinear) for every adapter of the model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    """The adapters' parameters by dotted name (the live arrays): what the optimizer should get."""
    return {k: v for k, v in model.params.items() if k.rpartition(".")[2].startswith(("lora_A", "lora_B"))}


def lora_gradients(model):
    """The adapters' gradient arrays by the same names (the live arrays): what the optimizer steps with."""
    return {k: v for k, v in model.grads.items() if k.rpartition(".")[2].startswith(("lora_A", "lora_B"))}


def _mergeable_layers(model):
    """The model's adapters, once every one is known to be mergeable (so an int8 base changes none of them)."""
    layers = [m for _, m in lora_modules(model)]
    for m in layers:
        m._check_mergeable()
    return layers


def merge_lora(model):
    """Fold every adapter into its base weight: all or none."""
    for m in _mergeable_layers(model):
        m.merge()


def unmerge_lora(model):
    """Take every adapter out of its base weight again: all or none."""
    for m in _mergeable_layers(model):
        m.unmerge()


def __getattr__(name):
    # Moved to npflux.nn.convert; importable from here for one release.
    if name in ("apply_lora", "parse_target"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Symmetric int8 weight quantization and the frozen linear layers that run on it.

Per output channel (one scale per column of the (in, out) weight)::

    s_j = max_i |W_ij| / 127          q_ij = round(W_ij / s_j)  in [-127, 127]
    W_ij ~ q_ij * s_j                 |W_ij - q_ij s_j| <= s_j / 2

Per group (``group_size=G``): each column is cut into runs of G input rows,
and every run has its own scale, s (in/G, out), so one large weight in a
column spoils the precision of only its own group. -128 is never used, so
the grid is symmetric and zero is exact.

``FrozenLinear`` and ``QuantizedLinear`` compute y = x @ W + b with a weight
that is not trained: they have NO parameters and no gradient arrays (the
weight and bias live in ``buffers``), and their backward returns only the
input gradient dx = dy @ W^T. They are the base of a LoRA adapter
(``npflux.nn.lora``) and the layers of a quantized model.
"""

from .. import ops
from ..backend import get_array_module
from .module import Module

INT8_MAX = 127


def _grouped(w, group_size):
    """(in, out) -> (in / G, G, out), checking G divides the input width."""
    n_in, n_out = w.shape
    if group_size <= 0 or n_in % group_size != 0:
        raise ValueError(f"group_size {group_size} must be positive and divide the input width {n_in}")
    return w.reshape(n_in // group_size, group_size, n_out)


def quantize_int8(w, group_size=None):
    """(q, scale): q int8 of w's shape (in, out); scale float32, (out,) or (in / group_size, out).

    An all-zero column (or group) gets scale 1 so nothing divides by zero; its q is 0. So does one whose
    largest magnitude is so small (< 127 * 1.4e-45) that amax / 127 underflows to 0 in float32.
    """
    xp = get_array_module(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8: expected a 2-d (in, out) weight, got shape {w.shape}")
    if not bool(xp.isfinite(w).all()):
        raise ValueError("quantize_int8: the weight holds values that are not finite (NaN or inf)")
    w = w.astype(xp.float32)
    blocks = w[None] if group_size is None else _grouped(w, group_size)  # (groups, rows, out)
    scale = xp.abs(blocks).max(axis=1) / INT8_MAX                       # (groups, out)
    scale = xp.where(scale > 0, scale, 1.0).astype(xp.float32)
    q = xp.clip(xp.rint(blocks / scale[:, None, :]), -INT8_MAX, INT8_MAX).astype(xp.int8)
    return q.reshape(w.shape), (scale[0] if group_size is None else scale)


def dequantize_int8(q, scale, dtype=None):
    """W = q * s in ``dtype`` (float32 by default); the group size is read from the shapes."""
    xp = get_array_module(q)
    dtype = dtype or xp.float32
    n_in, n_out = q.shape
    if scale.ndim == 1:
        return q.astype(dtype) * scale.astype(dtype)
    groups = scale.shape[0]
    if scale.shape[1] != n_out or n_in % groups != 0:
        raise ValueError(f"dequantize_int8: scales {scale.shape} do not fit a weight of shape {q.shape}")
    w = q.astype(dtype).reshape(groups, n_in // groups, n_out) * scale.astype(dtype)[:, None, :]
    return w.reshape(n_in, n_out)


def input_grad(dy, w):
    """dx = dy @ w^T for y = x @ w, leading axes flattened into one 2-d matmul (as ops.linear_backward)."""
    return (dy.reshape(-1, w.shape[1]) @ w.T).reshape(*dy.shape[:-1], w.shape[0])


class FrozenLinear(Module):
    """y = x @ W + b with W, b fixed: backward gives dx = dy @ W^T and no weight gradient."""

    def __init__(self, weight, bias=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        # Own copies: a weight that was a view into a model's flat parameter buffer must not keep it alive.
        self.buffers = {"weight": self.backend.asarray(weight, dtype=self.dtype).copy()}
        if bias is not None:
            self.buffers["bias"] = self.backend.asarray(bias, dtype=self.dtype).copy()

    @classmethod
    def from_linear(cls, linear):
        return cls(linear.p["weight"], linear.p.get("bias"), backend=linear.backend, dtype=linear.dtype)

    @property
    def shape(self):
        return self.buffers["weight"].shape

    def weight(self):
        return self.buffers["weight"]

    def forward(self, x):
        y, _ = ops.linear_forward(x, self.buffers["weight"], self.buffers.get("bias"))
        return y

    def backward(self, dy):
        return input_grad(dy, self.buffers["weight"])


class QuantizedLinear(Module):
    """y = x @ (q * s) + b: an int8 weight dequantized on the fly, forward and backward alike.

    Only the int8 weight, its float32 scales and the bias are kept; the float
    weight exists only during one forward or backward call. Backward gives the
    input gradient dx = dy @ (q * s)^T; the weight is frozen (no gradient).
    """

    def __init__(self, weight_int8, weight_scale, bias=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        xp = self.xp
        if weight_int8.dtype != xp.int8 or weight_int8.ndim != 2:
            raise ValueError(f"QuantizedLinear: weight must be a 2-d int8 array, got {weight_int8.dtype} {weight_int8.shape}")
        self.buffers = {"weight_int8": self.backend.asarray(weight_int8).astype(xp.int8),
                        "weight_scale": self.backend.asarray(weight_scale, dtype=xp.float32)}
        n_in, n_out = weight_int8.shape
        scale_shape = tuple(self.buffers["weight_scale"].shape)
        if not (scale_shape == (n_out,) or (len(scale_shape) == 2 and scale_shape[1] == n_out
                                            and scale_shape[0] > 0 and n_in % scale_shape[0] == 0)):
            raise ValueError(f"QuantizedLinear: scales of shape {scale_shape} do not fit a weight of shape {(n_in, n_out)} "
                             f"(expected ({n_out},) or (groups, {n_out}) with groups dividing {n_in})")
        if bias is not None:
            self.buffers["bias"] = self.backend.asarray(bias, dtype=self.dtype).copy()

    @classmethod
    def from_linear(cls, linear, group_size=None):
        """Quantize a Linear (or FrozenLinear) layer's weight; the bias stays in the model's dtype."""
        weight = linear.p["weight"] if "weight" in linear.p else linear.buffers["weight"]
        bias = linear.p.get("bias") if "weight" in linear.p else linear.buffers.get("bias")
        q, scale = quantize_int8(weight, group_size)
        return cls(q, scale, bias, backend=linear.backend, dtype=linear.dtype)

    @property
    def shape(self):
        return self.buffers["weight_int8"].shape

    @property
    def group_size(self):
        scale = self.buffers["weight_scale"]
        return None if scale.ndim == 1 else self.shape[0] // scale.shape[0]

    def weight(self):
        """The dequantized weight q * s, in the layer's dtype."""
        return dequantize_int8(self.buffers["weight_int8"], self.buffers["weight_scale"], self.dtype)

    def forward(self, x):
        y, _ = ops.linear_forward(x, self.weight(), self.buffers.get("bias"))
        return y

    def backward(self, dy):
        return input_grad(dy, self.weight())


def named_buffers(module, prefix=""):
    """Every buffer of ``module`` and its children by dotted name (the frozen layers' arrays)."""
    out = {prefix + k: v for k, v in getattr(module, "buffers", {}).items()}
    for name, child in module.named_children():
        out.update(named_buffers(child, f"{prefix}{name}."))
    return out


def __getattr__(name):
    # Moved to npflux.nn.convert (model surgery, which needs both this module and lora);
    # these names stay importable from here for one release.
    if name in ("quantize_linears", "set_submodule", "path_matches", "refresh_flat_parameters"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

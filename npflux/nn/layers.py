"""Layers that wrap one op each, plus the feed-forward network."""
from .. import ops
from ..backend import get_backend, scatter_add_rows
from .module import Module, sum_to_shape

INIT_STD = 0.02  # GPT-2's (and the char-level gpt.py's) normal init


def _host_rng(rng, seed=0):
    """Initial weights are drawn on the host, so a seed gives the same model on every backend."""
    return rng if rng is not None else get_backend("numpy").rng(seed)


class Linear(Module):
    """y = x @ weight + bias,  weight (in, out) as GPT-2 stores it."""

    def __init__(self, in_features, out_features, bias=True, std=INIT_STD, rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        rng = _host_rng(rng)
        self.add_param("weight", rng.normal(0.0, std, (in_features, out_features)))
        if bias:
            self.add_param("bias", self.xp.zeros(out_features))

    def forward(self, x):
        y, self.cache = ops.linear_forward(x, self.p["weight"], self.p.get("bias"))
        return y

    def backward(self, dy):
        dx, dw, db = ops.linear_backward(dy, self.cache)
        self.g["weight"] += dw
        if db is not None:
            self.g["bias"] += db
        return dx


class Embedding(Module):
    """out = weight[ids],  weight (num_embeddings, dim)."""

    def __init__(self, num_embeddings, dim, std=INIT_STD, rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.add_param("weight", _host_rng(rng).normal(0.0, std, (num_embeddings, dim)))

    def forward(self, ids):
        out, self.cache = ops.embedding_forward(ids, self.p["weight"])
        return out

    def backward(self, dout):
        self.g["weight"] += ops.embedding_backward(dout, self.cache)
        return None  # token ids have no gradient


class PositionalEmbedding(Module):
    """Learned positions: y = x + weight[offset : offset + T] for x (..., T, C).

    ``positions`` (B, T) integers instead: y[b, t] = x[b, t] + weight[positions[b, t]],
    for a batch whose rows count their positions from different starts.
    """

    def __init__(self, max_len, dim, std=INIT_STD, rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.add_param("weight", _host_rng(rng).normal(0.0, std, (max_len, dim)))

    def forward(self, x, offset=0, positions=None):
        T, max_len = x.shape[-2], self.p["weight"].shape[0]
        if positions is not None:
            if tuple(positions.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"positions of shape {tuple(positions.shape)} do not match x {tuple(x.shape)}")
            if positions.size and int(positions.max()) >= max_len:
                raise ValueError(f"position {int(positions.max())} exceeds the {max_len} learned positions")
            self.span = positions
            return x + self.p["weight"][positions]
        if offset + T > max_len:
            raise ValueError(f"sequence of length {offset + T} exceeds the {max_len} learned positions")
        self.span = (offset, T)
        return x + self.p["weight"][offset : offset + T]

    def backward(self, dy):
        if not isinstance(self.span, tuple):  # per-row positions: a scatter-add, as an embedding's
            C = dy.shape[-1]
            scatter_add_rows(self.g["weight"], self.span.reshape(-1), dy.reshape(-1, C))
            return dy
        offset, T = self.span
        self.g["weight"][offset : offset + T] += sum_to_shape(dy, (T, dy.shape[-1]))
        return dy


class SinusoidalPositionalEncoding(Module):
    """Fixed positions: y = x + PE[offset : offset + T] (no parameters; the gradient passes through)."""

    def __init__(self, max_len, dim, base=10000.0, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.table = ops.sinusoidal_encoding(max_len, dim, base=base, dtype=self.dtype, xp=self.xp)

    def forward(self, x, offset=0):
        T = x.shape[-2]
        if offset + T > self.table.shape[0]:
            raise ValueError(f"sequence of length {offset + T} exceeds max_len {self.table.shape[0]}")
        return x + self.table[offset : offset + T]

    def backward(self, dy):
        return dy


class LayerNorm(Module):
    """Layer norm over the last axis with a learned scale (weight) and shift (bias)."""

    def __init__(self, dim, eps=1e-5, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.eps = eps
        self.add_param("weight", self.xp.ones(dim))
        self.add_param("bias", self.xp.zeros(dim))

    def forward(self, x):
        y, self.cache = ops.layernorm_forward(x, self.p["weight"], self.p["bias"], self.eps)
        return y

    def backward(self, dy):
        dx, dgamma, dbeta = ops.layernorm_backward(dy, self.cache)
        self.g["weight"] += dgamma
        self.g["bias"] += dbeta
        return dx


class Dropout(Module):
    """Inverted dropout in training mode, the identity in eval mode."""

    def __init__(self, p=0.0, rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.rate = p
        self.rng = rng if rng is not None else self.backend.rng(0)

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            self.cache = None
            return x
        y, self.cache = ops.dropout_forward(x, self.rate, self.rng)
        return y

    def backward(self, dy):
        return ops.dropout_backward(dy, self.cache)


def reseed_dropout(model, seed: int):
    """Give every Dropout in ``model`` one fresh generator seeded with ``seed`` (on the model's device).

    A training loop that calls this at the start of each step with a seed made from
    (run seed, step) draws the same masks at a step whether the run went straight
    through or was resumed there, on every backend, without saving the generator's
    state (CuPy's lives on the device and has no portable form).
    """
    rng = model.backend.rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, Dropout):
            m.rng = rng
    if hasattr(model, "dropout_rng"):
        model.dropout_rng = rng
    return rng


_ACTIVATIONS = {
    "gelu": (ops.gelu_forward, ops.gelu_backward),
    "relu": (ops.relu_forward, ops.relu_backward),
}


class FeedForward(Module):
    """c_proj(act(c_fc(x))), then dropout: the position-wise MLP of a transformer block."""

    def __init__(self, dim, hidden=None, activation="gelu", bias=True, dropout=0.0,
                 proj_std=INIT_STD, rng=None, dropout_rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        hidden = hidden or 4 * dim
        rng = _host_rng(rng)
        self.activation = activation
        self.act_forward, self.act_backward = _ACTIVATIONS[activation]
        self.c_fc = Linear(dim, hidden, bias=bias, rng=rng, backend=backend, dtype=dtype)
        self.c_proj = Linear(hidden, dim, bias=bias, std=proj_std, rng=rng, backend=backend, dtype=dtype)
        self.dropout = Dropout(dropout, rng=dropout_rng, backend=backend, dtype=dtype)

    def forward(self, x):
        h = self.c_fc.forward(x)
        # ReLU may overwrite c_fc's fresh output (nothing else holds it): one (N, 4C) array less.
        kw = {"out": h} if self.activation == "relu" else {}
        h, self.act_cache = self.act_forward(h, **kw)
        return self.dropout.forward(self.c_proj.forward(h))

    def backward(self, dy):
        dh = self.c_proj.backward(self.dropout.backward(dy))
        kw = {"out": dh}  # dh is ours: the activation's gradient may overwrite it
        return self.c_fc.backward(self.act_backward(dh, self.act_cache, **kw))

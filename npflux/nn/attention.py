"""Multi-head attention: self-attention (causal or not) and cross-attention."""
from .. import ops
from .layers import INIT_STD, Dropout, Linear, _host_rng
from .module import Module


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Preallocated to ``max_len`` so each decoding step writes one slot instead
    of copying the whole history.
    """

    def __init__(self, xp, batch, n_head, max_len, head_dim, dtype):
        self.k = xp.empty((batch, n_head, max_len, head_dim), dtype=dtype)
        self.v = xp.empty((batch, n_head, max_len, head_dim), dtype=dtype)
        self.length = 0

    def append(self, k, v):
        T = k.shape[2]
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"KV cache is full ({self.k.shape[2]} positions)")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, C/H)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D), the inverse of split_heads."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


class MultiHeadAttention(Module):
    """Multi-head scaled dot-product attention with an output projection.

    Self-attention (``cross=False``) projects q, k, v from x with ONE fused
    matrix ``c_attn`` (C, 3C), GPT-2's layout. Cross-attention (``cross=True``)
    projects q from x with ``q_proj`` (C, C) and k, v from a separate source
    ``context`` with ``kv_proj`` (C, 2C). ``c_proj`` mixes the heads.
    All heads go through one batched matmul: q, k, v are (B, H, T, D).
    """

    def __init__(self, dim, n_head, causal=False, cross=False, bias=True, qkv_bias=True, dropout=0.0,
                 proj_std=INIT_STD, rng=None, dropout_rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        if n_head <= 0 or dim % n_head != 0:
            raise ValueError(f"model width {dim} is not divisible by the number of heads {n_head}")
        if causal and cross:
            raise ValueError("cross-attention is not causal (every output may see the whole source)")
        rng = _host_rng(rng)
        self.n_head, self.causal, self.cross = n_head, causal, cross
        kw = dict(rng=rng, backend=backend, dtype=dtype)
        if cross:
            self.q_proj = Linear(dim, dim, bias=qkv_bias, **kw)
            self.kv_proj = Linear(dim, 2 * dim, bias=qkv_bias, **kw)
        else:
            self.c_attn = Linear(dim, 3 * dim, bias=qkv_bias, **kw)
        self.c_proj = Linear(dim, dim, bias=bias, std=proj_std, **kw)
        self.dropout = Dropout(dropout, rng=dropout_rng, backend=backend, dtype=dtype)
        self.weights = None

    def forward(self, x, context=None, mask=None, kv_cache=None):
        """x (B, T, C); context (B, S, C) for cross-attention; mask broadcastable to (B, H, T, S).

        ``kv_cache``: in self-attention it gathers the keys and values of every
        position fed so far; in cross-attention it holds the context's, projected
        at the first call and read back at the later ones (a decoder then
        projects its memory once per source, not once per step).
        """
        if x.ndim != 3:
            raise ValueError(f"attention input must be (B, T, C), got shape {x.shape}")
        H = self.n_head
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context (the encoder output)")
            q = split_heads(self.q_proj.forward(x), H)
            if kv_cache is not None and kv_cache.length:
                cached = (kv_cache.k.shape[0], kv_cache.length)
                if tuple(context.shape[:2]) != cached:
                    raise ValueError(f"the cross-attention cache holds a context of (B, S) = {cached}, "
                                     f"got one of {tuple(context.shape[:2])}")
                k, v = kv_cache.k[:, :, : kv_cache.length], kv_cache.v[:, :, : kv_cache.length]
            else:
                k, v = (split_heads(a, H) for a in self._split(self.kv_proj.forward(context), 2))
                if kv_cache is not None:
                    k, v = kv_cache.append(k, v)
        else:
            q, k, v = (split_heads(a, H) for a in self._split(self.c_attn.forward(x), 3))
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)
        y, self.attn_cache = ops.attention_forward(q, k, v, causal=self.causal, mask=mask)
        self.weights = self.attn_cache[3]  # (B, H, T, S), kept for heat maps and activation capture
        return self.dropout.forward(self.c_proj.forward(merge_heads(y)))

    @staticmethod
    def _split(a, n):
        C = a.shape[-1] // n
        return [a[..., i * C : (i + 1) * C] for i in range(n)]

    def backward(self, dy):
        """Returns dx for self-attention, (dx, dcontext) for cross-attention."""
        xp, H = self.xp, self.n_head
        dy_heads = split_heads(self.c_proj.backward(self.dropout.backward(dy)), H)
        if self.cross:
            dq, dk, dv = ops.attention_backward(dy_heads, self.attn_cache)
            dx = self.q_proj.backward(merge_heads(dq))
            dcontext = self.kv_proj.backward(xp.concatenate([merge_heads(dk), merge_heads(dv)], axis=-1))
            return dx, dcontext
        # dq, dk, dv land straight in the three column blocks of dqkv (B, T, 3C), the
        # layout c_attn's backward wants, instead of being merged and concatenated after.
        q = self.attn_cache[0]
        dqkv = xp.empty(q.shape[:1] + q.shape[2:3] + (3 * q.shape[1] * q.shape[3],), dtype=q.dtype)
        ops.attention_backward(dy_heads, self.attn_cache, out=[split_heads(a, H) for a in self._split(dqkv, 3)])
        return self.c_attn.backward(dqkv)

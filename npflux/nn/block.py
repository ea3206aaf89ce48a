"""The pre-LayerNorm transformer block (GPT-2's), optionally with cross-attention."""
from .attention import MultiHeadAttention
from .layers import INIT_STD, FeedForward, LayerNorm, _host_rng
from .module import Module


class Block(Module):
    """x = x + attn(ln_1(x));  [x = x + cross_attn(ln_cross(x), context)];  x = x + mlp(ln_2(x)).

    The residual adds mean the backward adds the branch's input gradient to
    the gradient flowing straight through: dx = dy + d(branch)/dx.
    """

    def __init__(self, dim, n_head, causal=True, cross_attention=False, activation="gelu", bias=True,
                 qkv_bias=True, dropout=0.0, eps=1e-5, hidden=None, proj_std=INIT_STD,
                 rng=None, dropout_rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        rng = _host_rng(rng)
        if dropout_rng is None:  # one generator for all sub-layers, or each would draw the same masks
            dropout_rng = self.backend.rng(0)
        kw = dict(backend=backend, dtype=dtype)
        drop = dict(dropout=dropout, dropout_rng=dropout_rng, proj_std=proj_std, rng=rng, **kw)
        self.ln_1 = LayerNorm(dim, eps, **kw)
        self.attn = MultiHeadAttention(dim, n_head, causal=causal, bias=bias, qkv_bias=qkv_bias, **drop)
        self.has_cross = cross_attention
        if cross_attention:
            self.ln_cross = LayerNorm(dim, eps, **kw)
            self.cross_attn = MultiHeadAttention(dim, n_head, cross=True, bias=bias, qkv_bias=qkv_bias, **drop)
        self.ln_2 = LayerNorm(dim, eps, **kw)
        self.mlp = FeedForward(dim, hidden, activation=activation, bias=bias, **drop)

    def forward(self, x, context=None, mask=None, context_mask=None, kv_cache=None, context_kv_cache=None,
                rows=None):
        """``rows``: a RowLayout when the rows of x are sequences of different lengths (see MultiHeadAttention)."""
        x = x + self.attn.forward(self.ln_1.forward(x), mask=mask, kv_cache=kv_cache, rows=rows)
        if self.has_cross:
            x = x + self.cross_attn.forward(self.ln_cross.forward(x), context=context, mask=context_mask,
                                            kv_cache=context_kv_cache)
        return x + self.mlp.forward(self.ln_2.forward(x))

    def backward(self, dy):
        """Returns dx, or (dx, dcontext) for a block with cross-attention."""
        dx = dy + self.ln_2.backward(self.mlp.backward(dy))
        dcontext = None
        if self.has_cross:
            dq, dcontext = self.cross_attn.backward(dx)
            dx = dx + self.ln_cross.backward(dq)
        dx = dx + self.ln_1.backward(self.attn.backward(dx))
        return dx if dcontext is None else (dx, dcontext)

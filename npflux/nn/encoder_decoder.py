"""The encoder and decoder stacks of the original transformer, pre-LayerNorm.

    encoder: x = Block(x, self-attention over the source, padding mask) x N;  memory = ln_f(x)
    decoder: y = Block(y, causal self-attention,
                       cross-attention to memory (source padding mask)) x M;  out = ln_f(y)

This is ``torch.nn.Transformer(norm_first=True)``: its layers are the Block
(x + sa(norm1 x); [x + mha(norm2 x, memory)]; x + ff(norm x)) and it ends
each stack with a final LayerNorm. Padding masks are (B, T) booleans, True
for a real token, and mask the keys: a padded query still computes an output
(it is ignored by the loss), as in PyTorch.
"""
from .block import Block
from .layers import INIT_STD, LayerNorm, _host_rng
from .module import Module, ModuleList


def key_padding_mask(mask):
    """(B, S) True = real token  ->  (B, 1, 1, S), broadcastable over heads and queries."""
    return None if mask is None else mask[:, None, None, :]


class _Stack(Module):
    """n_layer Blocks (``layers``) and a final LayerNorm (``ln_f``): the parts both stacks share."""

    causal = cross_attention = False

    def __init__(self, dim, n_head, n_layer, activation="relu", bias=True, qkv_bias=True, dropout=0.0, eps=1e-5,
                 hidden=None, proj_std=INIT_STD, rng=None, dropout_rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        rng = _host_rng(rng)
        dropout_rng = dropout_rng if dropout_rng is not None else self.backend.rng(0)
        kw = dict(backend=backend, dtype=dtype)
        self.layers = ModuleList([
            Block(dim, n_head, causal=self.causal, cross_attention=self.cross_attention, activation=activation,
                  bias=bias, qkv_bias=qkv_bias, dropout=dropout, eps=eps, hidden=hidden, proj_std=proj_std, rng=rng,
                  dropout_rng=dropout_rng, **kw)
            for _ in range(n_layer)], **kw)
        self.ln_f = LayerNorm(dim, eps, **kw)


class TransformerEncoder(_Stack):
    """memory = ln_f(Block_N(... Block_1(x))), every Block non-causal self-attention."""

    def forward(self, x, mask=None):
        """x (B, S, C), mask (B, S) True = real token -> memory (B, S, C)."""
        attn_mask = key_padding_mask(mask)
        for layer in self.layers.items:
            x = layer.forward(x, mask=attn_mask)
        return self.ln_f.forward(x)

    def backward(self, dmemory):
        dx = self.ln_f.backward(dmemory)
        for layer in reversed(self.layers.items):
            dx = layer.backward(dx)
        return dx


class TransformerDecoder(_Stack):
    """out = ln_f(Block_M(... Block_1(y, memory))), causal self-attention plus cross-attention."""

    causal = cross_attention = True

    def forward(self, y, memory, mask=None, memory_mask=None, kv_caches=None, memory_kv_caches=None):
        """y (B, T, C), memory (B, S, C); mask (B, T) and memory_mask (B, S), True = real token.

        With ``kv_caches`` (one KVCache per layer) y holds only the new
        positions and the self-attention sees the cached ones too (decoding).
        With ``memory_kv_caches`` (one KVCache of S positions per layer) each
        cross-attention projects the memory's keys and values at the first
        step and reuses them at the next ones: the memory is the same at every step.
        """
        self_mask, cross_mask = key_padding_mask(mask), key_padding_mask(memory_mask)
        for i, layer in enumerate(self.layers.items):
            y = layer.forward(y, context=memory, mask=self_mask, context_mask=cross_mask,
                              kv_cache=None if kv_caches is None else kv_caches[i],
                              context_kv_cache=None if memory_kv_caches is None else memory_kv_caches[i])
        return self.ln_f.forward(y)

    def backward(self, dout):
        """Returns (dy, dmemory); every layer reads the memory, so their gradients add."""
        dy = self.ln_f.backward(dout)
        dmemory = None
        for layer in reversed(self.layers.items):
            dy, dm = layer.backward(dy)
            if dmemory is None:
                dmemory = dm
            else:
                dmemory += dm  # dm is fresh from the layer's backward: add in place, no new array per layer
        return dy, dmemory

    @property
    def cross_attention_weights(self):
        """Per layer, the (B, H, T, S) cross-attention weights of the last forward."""
        return [layer.cross_attn.weights for layer in self.layers.items]


class EncoderDecoder(Module):
    """out = decoder(tgt, encoder(src, src_mask), tgt_mask, src_mask): ``torch.nn.Transformer``'s contract.

    Inputs are already embedded: src (B, S, C), tgt (B, T, C). The backward
    returns (dsrc, dtgt); the source's gradient is everything the decoder's
    cross-attentions sent back through the memory, pushed through the encoder.
    """

    def __init__(self, dim, n_head, n_encoder_layer, n_decoder_layer, activation="relu", bias=True, qkv_bias=True,
                 dropout=0.0, eps=1e-5, hidden=None, proj_std=INIT_STD, rng=None, dropout_rng=None, backend=None,
                 dtype=None):
        super().__init__(backend, dtype)
        rng = _host_rng(rng)
        dropout_rng = dropout_rng if dropout_rng is not None else self.backend.rng(0)
        kw = dict(activation=activation, bias=bias, qkv_bias=qkv_bias, dropout=dropout, eps=eps, hidden=hidden,
                  proj_std=proj_std, rng=rng, dropout_rng=dropout_rng, backend=backend, dtype=dtype)
        self.encoder = TransformerEncoder(dim, n_head, n_encoder_layer, **kw)
        self.decoder = TransformerDecoder(dim, n_head, n_decoder_layer, **kw)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None):
        memory = self.encoder.forward(src, src_mask)
        return self.decoder.forward(tgt, memory, mask=tgt_mask, memory_mask=src_mask)

    def backward(self, dout):
        dtgt, dmemory = self.decoder.backward(dout)
        return self.encoder.backward(dmemory), dtgt

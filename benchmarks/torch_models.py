"""PyTorch reference GPTs, built from an npflux ``GPTConfig``, with npflux's weights copied in.

Two styles of the same network (pre-LN blocks, token + position embeddings,
ln_f, lm_head), so a benchmark can show both what the published code costs and
what idiomatic modern PyTorch costs:

- ``PublishedGPT``: exactly the structure of the char-level ``gpt.py`` of
  Karpathy's "Let's build GPT" lecture (ng-video-lecture): one ``Head`` module
  per head with its own key/query/value ``nn.Linear(bias=False)``, scores
  scaled by ``head_size**-0.5``, ``masked_fill`` with a ``tril`` buffer,
  softmax, dropout on the weights; ``MultiHeadAttention`` concatenates the
  heads and projects; ``FeedForward`` is Linear-act-Linear-Dropout.
- ``ModernGPT``: one fused q/k/v ``nn.Linear`` and
  ``F.scaled_dot_product_attention(is_causal=True)`` (nanoGPT's layout).

Both follow the config's switches: ``activation`` relu or gelu (GELU in its
tanh form, as npflux and GPT-2), ``bias`` (c_proj and c_fc biases),
``qkv_bias``, ``tie_weights``, ``lm_head_bias``, ``dropout``,
``layer_norm_eps``. ``forward(idx, targets=None) -> (logits, loss)`` as the
published model.

Where the dropout sits differs slightly: the published model also drops
attention weights, npflux only the projections' outputs. With dropout 0
(shakespeare-s1, s2 and every benchmark here except shakespeare-n's training
step) the three compute the same function; ``copy_npflux_weights`` followed by
a forward gives npflux's logits to float32 rounding (see ``check_same_logits``).

Weight layouts: an npflux ``Linear`` stores ``w`` as (in, out) and computes
``x @ w``; ``nn.Linear`` stores (out, in), so torch's weight is npflux's
transpose. ``lm_head.weight`` is (V, C) in both. npflux's ``c_attn`` (C, 3C)
holds the columns [q | k | v], each split into heads of ``C / n_head``
consecutive columns; the published model's head h takes its query weight from
columns ``h*D:(h+1)*D`` of the q block, and so on.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


def _act(name):
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def _ln(cfg):
    # npflux's LayerNorm always has its shift (``bias`` only drops the Linear biases), so torch's does too
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class FeedForward(nn.Module):
    """Linear(C, 4C) - act - Linear(4C, C) - Dropout, as the published gpt.py."""

    def __init__(self, cfg):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            _act(cfg.activation),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        return self.net(x)


# ---------------------------------------------------------------------------
# the published style (ng-video-lecture gpt.py)
# ---------------------------------------------------------------------------


class Head(nn.Module):
    """one head of self-attention"""

    def __init__(self, cfg, head_size):
        super().__init__()
        self.key = nn.Linear(cfg.n_embd, head_size, bias=cfg.qkv_bias)
        self.query = nn.Linear(cfg.n_embd, head_size, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.n_embd, head_size, bias=cfg.qkv_bias)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size)))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)    # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        # compute attention scores ("affinities")
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
        wei = F.softmax(wei, dim=-1)  # (B, T, T)
        wei = self.dropout(wei)
        # perform the weighted aggregation of the values
        v = self.value(x)  # (B,T,hs)
        out = wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)
        return out


class MultiHeadAttention(nn.Module):
    """multiple heads of self-attention in parallel"""

    def __init__(self, cfg):
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.heads = nn.ModuleList([Head(cfg, head_size) for _ in range(cfg.n_head)])
        self.proj = nn.Linear(head_size * cfg.n_head, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        out = self.dropout(self.proj(out))
        return out


class PublishedBlock(nn.Module):
    """Transformer block: communication followed by computation"""

    def __init__(self, cfg):
        super().__init__()
        self.sa = MultiHeadAttention(cfg)
        self.ffwd = FeedForward(cfg)
        self.ln1 = _ln(cfg)
        self.ln2 = _ln(cfg)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


# ---------------------------------------------------------------------------
# the modern style (fused qkv + scaled_dot_product_attention)
# ---------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout_p = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (a.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ModernBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = _ln(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = _ln(cfg)
        self.mlp = FeedForward(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------
# the model around the blocks (shared)
# ---------------------------------------------------------------------------


class TorchGPT(nn.Module):
    """Embeddings, blocks of one style, ln_f, lm_head; ``forward(idx, targets)`` -> (logits, loss)."""

    def __init__(self, cfg, style="published"):
        super().__init__()
        if style not in ("published", "modern"):
            raise ValueError(f"style must be 'published' or 'modern', got {style!r}")
        self.config, self.style = cfg, style
        block = PublishedBlock if style == "published" else ModernBlock
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*[block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = _ln(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_weights:
            self.lm_head.weight = self.token_embedding_table.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B,T,C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T,C)
        x = self.drop(tok_emb + pos_emb)  # (B,T,C)
        x = self.blocks(x)  # (B,T,C)
        x = self.ln_f(x)  # (B,T,C)
        logits = self.lm_head(x)  # (B,T,vocab_size)
        if targets is None:
            return logits, None
        Bv, Tv, V = logits.shape
        loss = F.cross_entropy(logits.view(Bv * Tv, V), targets.view(Bv * Tv))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, generator=None):
        """The published sampling loop: crop to block_size, recompute everything, sample (no cache)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def build(cfg, style="published", npflux_model=None, dtype=torch.float32):
    """A TorchGPT of ``style`` for npflux config ``cfg``; with ``npflux_model``, its weights copied in."""
    model = TorchGPT(cfg, style).to(dtype)
    if npflux_model is not None:
        copy_npflux_weights(model, npflux_model)
    return model


def _t(a, like):
    return torch.as_tensor(np.ascontiguousarray(np.asarray(a)), dtype=like.dtype)


@torch.no_grad()
def copy_npflux_weights(model: TorchGPT, npflux_model):
    """Copy an npflux GPT's parameters into ``model`` (either style), transposing Linear weights."""
    from npflux.backend import to_numpy

    cfg = model.config
    P = {k: to_numpy(v) for k, v in npflux_model.params.items()}
    C, H = cfg.n_embd, cfg.n_head
    D = C // H

    def put(param, value):
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch: torch {tuple(param.shape)} vs npflux {value.shape}")
        param.copy_(_t(value, param))

    def linear(mod, prefix):
        put(mod.weight, P[prefix + ".weight"].T)
        if mod.bias is not None:
            put(mod.bias, P[prefix + ".bias"])

    def layernorm(mod, prefix):
        put(mod.weight, P[prefix + ".weight"])
        if mod.bias is not None:
            put(mod.bias, P[prefix + ".bias"])

    put(model.token_embedding_table.weight, P["transformer.wte.weight"])
    put(model.position_embedding_table.weight, P["transformer.wpe.weight"])
    for i, blk in enumerate(model.blocks):
        pre = f"transformer.h.{i}"
        w_attn = P[f"{pre}.attn.c_attn.weight"]  # (C, 3C): [q | k | v]
        b_attn = P.get(f"{pre}.attn.c_attn.bias")
        if model.style == "published":
            layernorm(blk.ln1, f"{pre}.ln_1")
            layernorm(blk.ln2, f"{pre}.ln_2")
            for h, head in enumerate(blk.sa.heads):
                for j, lin in enumerate((head.query, head.key, head.value)):
                    cols = slice(j * C + h * D, j * C + (h + 1) * D)
                    put(lin.weight, w_attn[:, cols].T)
                    if lin.bias is not None:
                        put(lin.bias, b_attn[cols])
            linear(blk.sa.proj, f"{pre}.attn.c_proj")
        else:
            layernorm(blk.ln_1, f"{pre}.ln_1")
            layernorm(blk.ln_2, f"{pre}.ln_2")
            put(blk.attn.c_attn.weight, w_attn.T)
            if blk.attn.c_attn.bias is not None:
                put(blk.attn.c_attn.bias, b_attn)
            linear(blk.attn.c_proj, f"{pre}.attn.c_proj")
        linear(blk.mlp.net[0] if model.style == "modern" else blk.ffwd.net[0], f"{pre}.mlp.c_fc")
        linear(blk.mlp.net[2] if model.style == "modern" else blk.ffwd.net[2], f"{pre}.mlp.c_proj")
    layernorm(model.ln_f, "transformer.ln_f")
    if not cfg.tie_weights:
        put(model.lm_head.weight, P["lm_head.weight"])
    if model.lm_head.bias is not None:
        put(model.lm_head.bias, P["lm_head.bias"])
    return model


_NPFLUX_NAMES = [  # torch name (modern style) -> npflux name
    (r"^token_embedding_table\.", "transformer.wte."),
    (r"^position_embedding_table\.", "transformer.wpe."),
    (r"^blocks\.(\d+)\.mlp\.net\.0\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.net\.2\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^blocks\.(\d+)\.", r"transformer.h.\1."),
    (r"^ln_f\.", "transformer.ln_f."),
]


def npflux_named_parameters(model: TorchGPT):
    """npflux parameter name -> torch Parameter, for a modern-style model (the tied lm_head appears once, as wte).

    Linear weights are each other's transpose (``is_linear_weight``). This is what the tests compare
    npflux's gradients with, parameter by parameter.
    """
    import re

    if model.style != "modern":
        raise ValueError("npflux_named_parameters: the published style splits c_attn into per-head layers")
    out = {}
    for name, param in model.named_parameters():
        for pattern, repl in _NPFLUX_NAMES:
            new = re.sub(pattern, repl, name)
            if new != name:
                name = new
                break
        out[name] = param
    return out


def is_linear_weight(npflux_name):
    """True for the weights stored (in, out) by npflux and (out, in) by torch."""
    return npflux_name.endswith(".weight") and (".attn." in npflux_name or ".mlp." in npflux_name)


def check_same_logits(cfg, seed=0, B=2, T=None, atol=1e-4):
    """Build npflux and both torch styles with the same weights; max |logit difference| per style."""
    import npflux

    T = T or min(cfg.block_size, 16)
    m = npflux.GPT(cfg, seed=seed)
    m.eval()
    idx = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))
    ref, _ = m.forward(idx)
    out = {}
    for style in ("published", "modern"):
        tm = build(cfg, style, m).eval()
        with torch.no_grad():
            logits, _ = tm(torch.as_tensor(idx))
        out[style] = float(np.abs(logits.numpy() - ref).max())
    if max(out.values()) > atol:
        raise AssertionError(f"torch reference disagrees with npflux: {out}")
    return out


if __name__ == "__main__":
    import npflux

    for preset in ("shakespeare-s1", "shakespeare-s2"):
        for over in ({}, {"activation": "gelu", "tie_weights": True, "lm_head_bias": False, "qkv_bias": True}):
            cfg = npflux.GPTConfig.from_preset(preset, **over)
            print(preset, over or "(preset)", check_same_logits(cfg))

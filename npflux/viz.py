"""Attention weights as heat maps (matplotlib), with the tokens as axis labels.

One panel per (layer, head) asked for: rows are the queries (the tokens
doing the looking), columns the keys (the tokens looked at); a cell is the
softmax weight, so every row sums to 1 over the keys the query may see.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .backend import to_numpy


def token_label(text: str) -> str:
    """A token as an axis label: whitespace and control characters made visible."""
    visible = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = "".join(visible.get(ch, ch if ch.isprintable() else ascii(ch)[1:-1]) for ch in text)
    return out or "\u2205"


def plot_attention(weights, query_tokens, key_tokens, path, titles=None, title=None, xlabel="key (attended to)",
                   ylabel="query", cols=4, cell=0.28, max_width=16.0):
    """Draw attention weights and save them as an image; returns the path.

    weights: (T, S) for one head, or (P, T, S) for P panels (heads, layers).
    query_tokens / key_tokens: T and S strings, the row and column labels.
    titles: one per panel; title: above all panels. Panels go ``cols`` to a
    row; the cells shrink when a row would be wider than ``max_width`` inches (``cell``
    inches per token at most). Each panel has its own
    color scale from 0 to its largest weight, so a diffuse head stays readable.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    w = np.asarray(to_numpy(weights), dtype=np.float64)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"attention weights must be (T, S) or (panels, T, S), got shape {w.shape}")
    P, T, S = w.shape
    if len(query_tokens) != T or len(key_tokens) != S:
        raise ValueError(f"{len(query_tokens)} query and {len(key_tokens)} key labels for weights of shape {(T, S)}")
    if titles is not None and len(titles) != P:
        raise ValueError(f"{len(titles)} titles for {P} panels")
    ncols = min(P, cols)
    nrows = math.ceil(P / ncols)
    # shrink the cells (and the labels with them) until a row of panels fits in max_width inches
    cell = max(0.05, min(cell, (max_width / ncols - 1.2) / S))
    font = max(3.5, min(7.0, 0.85 * 72 * cell))
    width, height = 1.2 + cell * S, 0.9 + cell * T
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * width, nrows * height + (0.4 if title else 0.0)),
                             squeeze=False, layout="constrained")
    qlabels = [token_label(t) for t in query_tokens]
    klabels = [token_label(t) for t in key_tokens]
    for i, ax in enumerate(axes.flat):
        if i >= P:
            ax.axis("off")
            continue
        im = ax.imshow(w[i], cmap="viridis", vmin=0.0, vmax=max(float(w[i].max()), 1e-12), aspect="auto",
                       interpolation="nearest")
        ax.set_xticks(range(S))
        ax.set_xticklabels(klabels, fontsize=font, rotation=90 if max(map(len, klabels), default=1) > 2 else 0)
        ax.set_yticks(range(T))
        ax.set_yticklabels(qlabels, fontsize=font)
        ax.tick_params(length=0)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i // ncols == nrows - 1:
            ax.set_xlabel(xlabel, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# the weights of a model on one input
# ---------------------------------------------------------------------------
def _pieces(tokenizer, ids):
    return [tokenizer.decode([int(i)]) for i in ids]


def gpt_attention(model, tokenizer, prompt: str) -> dict:
    """Self-attention of a GPT on ``prompt``: weights (layers, heads, T, T) and the T tokens (rows = columns)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) > model.config.block_size:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model sees at most {model.config.block_size}")
    with model.evaluating():
        model.forward(model.backend.asarray(np.array([ids], dtype=np.int64)))
        weights = np.stack([to_numpy(block.attn.weights[0]) for block in model.transformer.h.items])
    tokens = _pieces(tokenizer, ids)
    return {"weights": weights, "queries": tokens, "keys": tokens, "kind": "self"}


SEQ2SEQ_KINDS = ("cross", "encoder", "decoder")


def seq2seq_attention(model, tokenizer, source: str, target: str | None = None, kind: str = "cross") -> dict:
    """Attention of an encoder-decoder on ``source`` (and its greedy output, or ``target`` when given).

    kind "cross": decoder queries x source keys, "which source tokens each
    output token looked at"; "encoder": source x source; "decoder": the
    decoder's causal self-attention. Decoder rows are labelled with the token
    each position PREDICTS (the output, then <eos>); the decoder's inputs
    (the columns of "decoder") are <bos> then the output.
    Returns weights (layers, heads, T, S), queries, keys and the output text.
    """
    if kind not in SEQ2SEQ_KINDS:
        raise ValueError(f"kind must be one of {SEQ2SEQ_KINDS}, got {kind!r}")
    c = model.config
    src = tokenizer.encode(source)
    if not 1 <= len(src) <= c.src_block_size:
        raise ValueError(f"the source has {len(src)} tokens; the model reads 1..{c.src_block_size}")
    if c.pad_id in src:  # it would be masked as padding: its column would be all zeros
        raise ValueError(f"the source holds the padding token (id {c.pad_id})")
    src_ids = np.array([src], dtype=np.int64)
    out = model.greedy_decode(src_ids)[0] if target is None else tokenizer.encode(target)
    if len(out) > c.tgt_block_size:
        raise ValueError(f"the output has {len(out)} tokens; the decoder has {c.tgt_block_size} positions")
    # BOS + output, and each position predicts the next token; an output that fills every
    # position ended without EOS (decoding stopped at the limit), so its last token is not fed back
    inputs = [c.bos_id, *out][: c.tgt_block_size]
    predicted = _pieces(tokenizer, out) + (["<eos>"] if len(out) < c.tgt_block_size else [])
    with model.evaluating():
        model.forward(src_ids, np.array([inputs], dtype=np.int64))
        if kind == "cross":
            layers = [layer.cross_attn for layer in model.transformer.decoder.layers.items]
        elif kind == "decoder":
            layers = [layer.attn for layer in model.transformer.decoder.layers.items]
        else:
            layers = [layer.attn for layer in model.transformer.encoder.layers.items]
        weights = np.stack([to_numpy(attn.weights[0]) for attn in layers])
    source_tokens = _pieces(tokenizer, src)
    decoder_inputs = ["<bos>"] + _pieces(tokenizer, inputs[1:])
    queries, keys = {"cross": (predicted, source_tokens), "encoder": (source_tokens, source_tokens),
                     "decoder": (predicted, decoder_inputs)}[kind]
    return {"weights": weights, "queries": queries, "keys": keys, "kind": kind, "output": tokenizer.decode(out)}


def select_panels(weights, layer=None, head=None):
    """(panels (P, T, S), titles) from weights (layers, heads, T, S).

    layer None: every layer; head None: every head; head "mean": the mean
    over the heads (one panel per layer). Negative indices count from the
    end, as in Python.
    """
    L, H = weights.shape[:2]
    for name, value, n in (("layer", layer, L), ("head", head, H)):
        if isinstance(value, str):
            if name == "head" and value == "mean":
                continue
            allowed = "an index or 'mean'" if name == "head" else "an index"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if value is not None and not -n <= value < n:
            raise ValueError(f"{name} {value} does not exist: the model has {n} {name}s (0..{n - 1})")
    layers = range(L) if layer is None else [layer % L]
    if head == "mean":
        return np.stack([weights[l].mean(axis=0) for l in layers]), [f"layer {l}, mean of {H} heads" for l in layers]
    heads = range(H) if head is None else [head % H]
    panels = [(l, h) for l in layers for h in heads]
    return np.stack([weights[l, h] for l, h in panels]), [f"layer {l}, head {h}" for l, h in panels]

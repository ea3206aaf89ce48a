"""``npflux attention``: attention weights of a checkpoint as a heat map (PNG), tokens on the axes.

    npflux attention --checkpoint out/ckpt --prompt "ROMEO:" [--layer L] [--head H] --out attn.png
    npflux attention --checkpoint dates/ckpt --source "3rd of March 1998" [--kind cross|encoder|decoder]
                     [--target "1998-03-03"] [--layer L|all] [--head H|mean] --out cross.png

A GPT checkpoint needs ``--prompt`` (its causal self-attention); an
encoder-decoder checkpoint needs ``--source`` and shows by default the
cross-attention of the greedy output (or of ``--target``): which source
token each output token looked at. Without ``--head`` every head of the
layer is drawn, ``--head mean`` their mean; ``--layer all`` draws every
layer. The default layer is the last one.
"""
from __future__ import annotations

from .common import add_backend_flag, load_for_text


def _layer(value):
    return None if value == "all" else int(value)


def _head(value):
    return value if value == "mean" else int(value)


def _attention(args):
    import math

    import numpy as np

    from ..checkpoint import load_checkpoint
    from ..viz import gpt_attention, plot_attention, select_panels, seq2seq_attention

    meta = load_checkpoint(args.checkpoint, optimizer=False)
    if (meta.config or {}).get("model_type") == "seq2seq":
        from ..train_seq2seq import load_seq2seq

        if args.source is None:
            raise ValueError(f"{args.checkpoint} is an encoder-decoder: give --source TEXT (and optionally --target)")
        model, tokenizer, _ = load_seq2seq(args.checkpoint, backend=args.backend)
        result = seq2seq_attention(model, tokenizer, args.source, target=args.target, kind=args.kind)
        what = {"cross": "cross-attention", "encoder": "encoder self-attention",
                "decoder": "decoder self-attention"}[args.kind]
        title = f"{what}: {args.source!r} -> {result['output']!r}"
        labels = {"cross": ("output token (predicted)", "source token"),
                  "encoder": ("source token", "source token"),
                  "decoder": ("output token (predicted)", "decoder input")}[args.kind]
    else:

        if args.prompt is None:
            raise ValueError(f"{args.checkpoint} is a GPT: give --prompt TEXT")
        model, tokenizer = load_for_text(args)
        result = gpt_attention(model, tokenizer, args.prompt)
        title = f"causal self-attention: {args.prompt!r}"
        labels = ("query token", "key token")
    panels, titles = select_panels(result["weights"], layer=args.layer, head=args.head)
    # a row per layer when drawing every layer's heads; otherwise a near-square grid
    cols = result["weights"].shape[1] if args.layer is None and args.head is None else math.ceil(math.sqrt(len(titles)))
    path = plot_attention(panels, result["queries"], result["keys"], args.out, titles=titles, title=title,
                          ylabel=labels[0], xlabel=labels[1], cols=cols)
    if "output" in result:
        print(f"output: {result['output']}")
    # the text version of the picture: where each query looks most, averaged over the drawn panels
    mean = panels.mean(axis=0)
    looks = ", ".join(f"{q!r}->{result['keys'][int(np.argmax(row))]!r}" for q, row in zip(result["queries"], mean))
    print(f"strongest key per query (mean of {len(titles)} panel(s)): {looks}")
    print(f"wrote {path}")


def add_parsers(subparsers):
    a = subparsers.add_parser("attention", help="draw attention weights as a heat map (GPT or encoder-decoder)")
    a.add_argument("--checkpoint", required=True, help="a GPT or seq2seq checkpoint directory")
    a.add_argument("--prompt", help="text for a GPT checkpoint")
    a.add_argument("--source", help="source text for an encoder-decoder checkpoint")
    a.add_argument("--target", help="encoder-decoder: draw for this output instead of the greedy one")
    a.add_argument("--kind", choices=["cross", "encoder", "decoder"], default="cross",
                   help="encoder-decoder: which attention (default cross)")
    a.add_argument("--layer", type=_layer, default=-1, help="layer index (negative from the end, default -1) or 'all'")
    a.add_argument("--head", type=_head, help="one head, or 'mean' for the mean over heads (default: every head)")
    a.add_argument("--out", default="attention.png", help="image path (PNG)")
    add_backend_flag(a)
    a.set_defaults(func=_attention)

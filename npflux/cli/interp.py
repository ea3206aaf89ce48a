"""npflux activations | sae train | sae features: look inside a trained model.

    npflux activations --checkpoint out/ckpt --text FILE --names "transformer.h.*" --out acts.safetensors
    npflux activations --checkpoint out/ckpt --list
    npflux sae train --checkpoint out/ckpt [--text FILE] --point transformer.h.3 --out-dir sae
    npflux sae features --sae sae --text FILE --out report.html
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import add_backend_flag, add_overwrite_flag, finite_float, load_for_text, positive_float


def _load_model(checkpoint, backend):
    from argparse import Namespace

    return load_for_text(Namespace(checkpoint=checkpoint, backend=backend))


def _read_ids(tokenizer, path, skip_unknown):
    from ..data import load_text
    from ..interp import encode_text

    try:
        ids, dropped = encode_text(tokenizer, load_text(path), skip_unknown=skip_unknown)
    except ValueError as exc:
        if skip_unknown:
            raise
        raise ValueError(f"{path}: {exc} (--skip-unknown drops them)") from exc
    if dropped:
        print(f"{path}: dropped {dropped} character(s) the tokenizer does not know", file=sys.stderr)
    return ids


def _default_text(path):
    from ..data import find_corpus

    return path or str(find_corpus())


# -- npflux activations -----------------------------------------------------------------
def _activations(args):
    from ..capture import _summarise, capture_points
    from ..interp import collect_activations

    model, tokenizer = _load_model(args.checkpoint, args.backend)
    if args.list:
        print("\n".join(_summarise(capture_points(model))))
        return
    if not args.text or not args.out or not args.names:
        raise ValueError("activations needs --text, --names and --out (or --list)")
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"--out must end in .safetensors or .npz, got {out.name}")
    ids = _read_ids(tokenizer, args.text, args.skip_unknown)
    data = collect_activations(model, ids, args.names, context=args.context, batch_size=args.batch_size,
                               progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        import numpy as np

        np.savez(out, **data)
    else:
        from safetensors.numpy import save_file

        meta = {"checkpoint": str(args.checkpoint), "text": str(args.text), "context": str(data["tokens"].shape[1])}
        save_file({k: v.astype("uint8") if v.dtype == bool else v for k, v in data.items()}, str(out), metadata=meta)
    for k, v in data.items():
        print(f"{k:40s} {str(tuple(v.shape)):24s} {v.dtype}")
    print(f"wrote {out} ({len(ids):,} tokens in {len(data['tokens'])} windows of {data['tokens'].shape[1]})")


# -- npflux sae train ------------------------------------------------------------------------
def _sae_train(args):
    from ..capture import capture_points, match_points
    from ..checkpoint.outdir import claim_output
    from ..interp import evaluate_sae, input_scale, residual_vectors, save_sae, spliced_loss, train_sae
    from ..models.sae import SAEConfig, SparseAutoencoder

    claim = claim_output(args.out_dir, kind="sae", overwrite=args.overwrite, inputs=[args.checkpoint],
                         can_resume=False)  # before the model is read: an error after training would lose the SAE
    model, tokenizer = _load_model(args.checkpoint, args.backend)
    text = _default_text(args.text)
    ids = _read_ids(tokenizer, text, args.skip_unknown)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if not 0.0 < args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    n_train = int(len(ids) * (1 - args.val_fraction))
    context = args.context or model.config.block_size
    if len(ids) - n_train <= context:  # checked now, not after the training: spliced_loss needs a whole window
        raise ValueError(f"the held-out part has {len(ids) - n_train} tokens; the loss metrics need more than one "
                         f"window of {context}: raise --val-fraction or give a longer text")
    print(f"{text}: {len(ids):,} tokens, {n_train:,} for training, {len(ids) - n_train:,} held out")
    # the spliced loss replaces a module's output; .resid_mid and .mlp.hidden are read inside a module
    # (decided now: an error after training would lose the SAE)
    splice = capture_points(model)[match_points(model, [args.point])[0]][1] == "output"
    x_train, _ = residual_vectors(model, ids[:n_train], args.point, context=args.context, progress=not args.quiet)
    x_val, _ = residual_vectors(model, ids[n_train:], args.point, context=args.context, progress=not args.quiet)
    scale = input_scale(x_train)
    d = x_train.shape[1]
    m = args.features or args.expansion * d
    sae = SparseAutoencoder(SAEConfig(d, m, l1=args.l1, tied=args.tied), seed=args.seed, backend=args.backend)
    print(f"SAE {d} -> {m} features -> {d} ({'tied' if args.tied else 'untied'}), l1 {args.l1}; "
          f"activations at {args.point}, scaled by {scale:.4f}")
    train_sae(sae, x_train * scale, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              progress=not args.quiet)
    metrics = {}
    for split, x in (("train", x_train), ("val", x_val)):
        r = evaluate_sae(sae, x * scale)
        metrics[split] = {k: v for k, v in r.items() if k != "frequency"}
    if splice:
        metrics["val_loss"] = spliced_loss(model, ids[n_train:], args.point, sae, scale=scale, context=args.context)
    else:
        print(f"{args.point} is not a module's output (it is read inside one): no spliced loss", file=sys.stderr)
    source = {"checkpoint": str(args.checkpoint), "point": args.point, "input_scale": scale,
              "context": args.context or model.config.block_size, "text": str(text), "tokens": int(len(ids)),
              "train_tokens": n_train}
    claim.begin()
    save_sae(args.out_dir, sae, source, metrics)
    claim.complete()
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.out_dir}")


# -- npflux sae features ------------------------------------------------------------------------
def _sae_features(args):
    from ..interp import evaluate_sae, feature_report, load_sae, residual_vectors, write_report

    sae, source, _ = load_sae(args.sae, backend=args.backend)
    checkpoint = args.checkpoint or source.get("checkpoint")
    if not checkpoint:
        raise ValueError("the SAE does not record its model checkpoint: pass --checkpoint")
    model, tokenizer = _load_model(checkpoint, args.backend)
    text = _default_text(args.text or source.get("text"))
    ids = _read_ids(tokenizer, text, args.skip_unknown)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    context = source.get("context") or model.config.block_size
    x, index = residual_vectors(model, ids, source["point"], context=context, progress=not args.quiet)
    x *= source.get("input_scale", 1.0)
    stats = evaluate_sae(sae, x)
    report = feature_report(sae, x, index, ids, tokenizer, context, k=args.top_k, features=args.features,
                            frequency=stats["frequency"], num_features=args.num_features, sort=args.sort,
                            before=args.before, after=args.after)
    title = (f"SAE {args.sae}: {sae.config.n_features} features at {source['point']} of {checkpoint}, "
             f"on {text} ({len(ids):,} tokens): FVE {stats['fve']:.3f}, L0 {stats['l0']:.1f}, "
             f"dead {stats['dead']} ({100 * stats['dead_fraction']:.1f}%)")
    path = write_report(report, args.out, title)
    print(title)
    print(f"wrote {path} ({len(report)} features, top {args.top_k} contexts each)")


def _count(minimum):
    """An argparse type: an int >= minimum (a negative count would silently slice from the end)."""
    from argparse import ArgumentTypeError

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def add_parsers(sub):
    a = sub.add_parser("activations", help="record intermediate activations of a model over a text (safetensors/npz)")
    a.add_argument("--checkpoint", required=True, help="the model whose activations are captured")
    a.add_argument("--text", help="text file to run the model on")
    a.add_argument("--names", nargs="+", help="capture points, fnmatch per dotted segment: 'transformer.h.*' "
                   "(residual stream after each block), 'transformer.h.*.attn.weights', 'transformer.h.1.mlp.hidden'")
    a.add_argument("--out", help="output file, .safetensors or .npz")
    a.add_argument("--list", action="store_true", help="print the model's capture points and exit")
    a.add_argument("--context", type=int, help="window length in tokens (default: the model's block_size)")
    a.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    a.add_argument("--skip-unknown", action="store_true", help="drop characters the tokenizer does not know")
    add_backend_flag(a)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_activations)

    s = sub.add_parser("sae", help="sparse autoencoders on a model's activations: train, feature reports")
    ssub = s.add_subparsers(dest="sae_command", required=True)
    t = ssub.add_parser("train", help="train an SAE on one capture point's activations over a text")
    t.add_argument("--checkpoint", required=True, help="the model whose activations are read")
    t.add_argument("--text", help="text file (default: Tiny Shakespeare, as npflux train finds it)")
    t.add_argument("--point", default="transformer.h.2", help="a per-token capture point (default transformer.h.2: "
                   "the residual stream after the third block)")
    t.add_argument("--out-dir", required=True, help="the SAE's checkpoint directory (new, or empty)")
    add_overwrite_flag(t, "an SAE checkpoint already in --out-dir")
    t.add_argument("--expansion", type=int, default=8, help="features per input dimension (default 8)")
    t.add_argument("--features", type=int, help="number of features (overrides --expansion)")
    t.add_argument("--l1", type=finite_float, default=1.5, help="L1 coefficient, for inputs scaled to mean squared norm d "
                   "(measured: 2 gives L0 10 on s1's transformer.h.1, 1.5 gives L0 22 on s2's transformer.h.2)")
    t.add_argument("--tied", action="store_true", help="decoder = encoder transposed")
    t.add_argument("--steps", type=_count(1), default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="the end of the (--max-tokens) text, held out from the SAE for the metrics")
    t.add_argument("--max-tokens", type=_count(0), default=350_000,
                   help="use only the first N tokens of the text (default 350,000; 0: all of it)")
    t.add_argument("--context", type=int, help="window length in tokens (default: the model's block_size)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches (default 0)")
    t.add_argument("--skip-unknown", action="store_true", help="drop characters the tokenizer does not know")
    add_backend_flag(t)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_sae_train)

    f = ssub.add_parser("features", help="top-activating contexts of an SAE's features, as text or HTML")
    f.add_argument("--sae", required=True, help="directory written by npflux sae train")
    f.add_argument("--text", help="text file (default: the one the SAE was trained on)")
    f.add_argument("--checkpoint", help="the model (default: the one recorded in the SAE)")
    f.add_argument("--out", required=True, help="report file: .html for HTML, anything else for text")
    f.add_argument("--top-k", type=_count(1), default=8, help="contexts per feature")
    f.add_argument("--features", type=int, nargs="+", help="feature indices to report (default: every live one)")
    f.add_argument("--num-features", type=_count(1), help="report only the first N features in --sort order")
    f.add_argument("--sort", choices=["index", "frequency", "max"], default="index", help="feature order: index, frequency (most active first) or max (largest activation first)")
    f.add_argument("--before", type=_count(0), default=24, help="tokens of context shown before the max token")
    f.add_argument("--after", type=_count(0), default=8, help="tokens shown after it")
    f.add_argument("--max-tokens", type=_count(1), help="use only the first N tokens of the text")
    f.add_argument("--skip-unknown", action="store_true", help="drop characters the tokenizer does not know")
    add_backend_flag(f)
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=_sae_features)

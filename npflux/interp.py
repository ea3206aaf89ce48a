"""Looking inside a trained model: activations over a text, SAE training, metrics, feature reports.

    ids, _ = encode_text(tokenizer, text)
    data = collect_activations(model, ids, ["transformer.h.2"])        # windows of block_size tokens
    x = data["transformer.h.2"][data["valid"]]                          # (N, C) residual-stream vectors
    scale = input_scale(x)                                              # mean squared norm -> C
    sae = SparseAutoencoder(SAEConfig(C, 8 * C, l1=...))
    train_sae(sae, x * scale, steps=..., batch_size=...)
    evaluate_sae(sae, x_val * scale)     # fraction of variance explained, L0, dead features
    feature_report(...)                  # top-activating contexts of each feature, text or HTML

A text longer than the model's context is cut into consecutive windows of
``context`` tokens (block_size by default), each run on its own: a position
sees only the earlier tokens of its own window. The last window is padded at
its end; with causal attention the padding cannot change the real positions,
and ``valid`` marks them.
"""
from __future__ import annotations

import html
import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .capture import capture, capture_points, match_points
from .checkpoint import load_sae, save_sae  # noqa: F401  (their home is npflux.checkpoint; old names kept)
from .models.sae import SAEConfig, SparseAutoencoder  # noqa: F401  (npflux.interp.SAEConfig, as before)
from .training.loop import progress as progress_bar
from .training.sae import train_sae  # noqa: F401  (npflux.interp.train_sae, as before)


# ---------------------------------------------------------------------------
# text -> token windows -> activations
# ---------------------------------------------------------------------------
def encode_text(tokenizer, text, skip_unknown=False):
    """(ids as an int64 array, number of characters dropped).

    A character tokenizer raises a ValueError naming the characters it does
    not know; with ``skip_unknown`` they are dropped instead, and counted.
    """
    dropped = 0
    if skip_unknown and hasattr(tokenizer, "stoi"):
        kept = "".join(c for c in text if c in tokenizer.stoi)
        dropped = len(text) - len(kept)
        text = kept
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the text holds no tokens" + (f" ({dropped} unknown characters dropped)" if dropped else ""))
    return ids, dropped


def token_windows(ids, context):
    """(tokens (n, T), valid (n, T) bool, start (n,)): consecutive windows of ``context`` tokens.

    T is ``context``, or the text's length when shorter; the last window is
    padded with the first token id and its padding marked invalid.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    if len(ids) == 0:
        raise ValueError("token_windows: no tokens to cut into windows")
    T = min(context, len(ids))
    n = math.ceil(len(ids) / T)
    tokens = np.full((n, T), ids[0], dtype=np.int64)
    valid = np.zeros((n, T), dtype=bool)
    flat_t, flat_v = tokens.reshape(-1), valid.reshape(-1)
    flat_t[: len(ids)] = ids
    flat_v[: len(ids)] = True
    return tokens, valid, np.arange(n) * T


def collect_activations(model, ids, names, context=None, batch_size=64, progress=False):
    """Run ``model`` over ``ids`` in windows and return the captured arrays as host NumPy.

    Returns a dict: every captured name -> (n_windows, ...) stacked over the
    windows, plus ``tokens`` (n, T), ``valid`` (n, T) and ``start`` (n,)
    (the index of each window's first token in ``ids``).
    """
    T = context or model.config.block_size
    if T > model.config.block_size:
        raise ValueError(f"context {T} exceeds the model's block_size {model.config.block_size}")
    names = match_points(model, names)
    tokens, valid, start = token_windows(ids, T)
    out = {n: [] for n in names}
    bar = progress_bar(len(tokens), unit="windows", enabled=progress)
    try:
        with model.evaluating(), capture(model, names) as acts:
            for b in range(0, len(tokens), batch_size):
                model.forward(model.backend.asarray(tokens[b : b + batch_size]))
                for n in names:
                    out[n].extend(to_numpy(a) for a in acts.pop(n))
                if bar:
                    bar.update(min(batch_size, len(tokens) - b))
    finally:
        if bar:
            bar.close()
    result = {n: np.concatenate(v, axis=0) for n, v in out.items()}
    result.update(tokens=tokens, valid=valid, start=start)
    return result


def residual_vectors(model, ids, name, context=None, batch_size=64, max_tokens=None, progress=False):
    """(x (N, C) float32, index (N,)): the activations at ``name`` for every token, and each token's index in ids.

    ``name`` must be a point with one vector per token (B, T, C): a block
    output, ``resid_mid``, an MLP's ``hidden``. ``max_tokens`` keeps the
    first that many tokens of ``ids``.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    data = collect_activations(model, ids, [name], context=context, batch_size=batch_size, progress=progress)
    acts = data[match_points(model, [name])[0]]
    if acts.ndim != 3:
        raise ValueError(f"{name} has shape {acts.shape[1:]} per window, not (T, C): pick a per-token point "
                         f"(a block output transformer.h.{{i}}, .resid_mid, .mlp.hidden)")
    valid = data["valid"]
    index = (data["start"][:, None] + np.arange(valid.shape[1])[None, :])[valid]
    return np.ascontiguousarray(acts[valid], dtype=np.float32), index


# ---------------------------------------------------------------------------
# training and evaluating a sparse autoencoder
# ---------------------------------------------------------------------------
def input_scale(x):
    """The scalar that makes the mean squared norm of the rows of x equal to their width d.

    SAE hyperparameters (l1, lr) then carry over between layers and models
    whose residual streams differ in size; every metric here is scale-free.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"input_scale: x must be (N, d) with N >= 1, got shape {x.shape}")
    return float(math.sqrt(x.shape[1] / max(float((x * x).sum(axis=1).mean()), 1e-30)))


def evaluate_sae(sae, x, batch_size=4096):
    """Metrics of ``sae`` on the rows of x (N, d), in float64 sums.

    fve: fraction of variance explained, 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    l0: mean number of active (f > 0) features per row
    dead_fraction: features never active on any row of x (and their count)
    frequency: per feature, the fraction of rows where it is active
    (fve is NaN when the rows do not vary: there is no variance to explain)
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"evaluate_sae: x must be (N, d) with N >= 1, got shape {x.shape}")
    m = sae.config.n_features
    sse = 0.0
    active_count = np.zeros(m, dtype=np.int64)
    l0_total = 0
    l1_total = 0.0
    mean = x.astype(np.float64).mean(axis=0)
    sst = float(((x.astype(np.float64) - mean) ** 2).sum())
    for b in range(0, len(x), batch_size):
        xb = sae.backend.asarray(x[b : b + batch_size], dtype=sae.dtype)
        f = sae.encode(xb)
        err = sae.decode(f) - xb
        sse += float((err.astype(np.float64) ** 2).sum())
        active = to_numpy(f > 0)
        active_count += active.sum(axis=0)
        l0_total += int(active.sum())
        l1_total += float(f.astype(np.float64).sum())
    dead = int((active_count == 0).sum())
    return {
        "tokens": int(len(x)),
        "fve": 1.0 - sse / sst if sst > 0 else float("nan"),
        "mse_per_token": sse / len(x),
        "l0": l0_total / len(x),
        "l1_per_token": l1_total / len(x),
        "dead": dead,
        "dead_fraction": dead / m,
        "frequency": active_count / len(x),
    }


@contextmanager
def replace_output(model, name, fn):
    """Inside the block, the output of module ``name`` is replaced by ``fn(output)`` (an intervention)."""
    module, what = capture_points(model)[match_points(model, [name])[0]]
    if what != "output":
        raise ValueError(f"replace_output: {name} is not a module's output")
    if "forward" in module.__dict__:
        raise RuntimeError(f"replace_output: {name} is already captured or replaced")
    original = type(module).forward

    def forward(*args, **kwargs):
        return fn(original(module, *args, **kwargs))

    object.__setattr__(module, "forward", forward)
    try:
        yield
    finally:
        del module.__dict__["forward"]


def spliced_loss(model, ids, name, sae, scale=1.0, context=None, batch_size=64, max_windows=None):
    """Next-token loss (nats) of ``model`` on ``ids``: as it is; with the output of ``name`` replaced by the
    SAE's reconstruction; and replaced by its mean over these tokens (the ablation baseline).

    ``scale`` is the input scale the SAE was trained with (it reads scale * activation).
    ``loss_recovered = (mean_ablated - spliced) / (mean_ablated - clean)``: 1 when the reconstruction
    serves the model's predictions as well as the real activation, 0 when no better than the mean.
    """
    T = context or model.config.block_size
    ids = np.asarray(ids, dtype=np.int64)
    n = (len(ids) - 1) // T
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"spliced_loss: need more than {T} tokens")
    x = np.stack([ids[i * T : i * T + T] for i in range(n)])
    y = np.stack([ids[i * T + 1 : i * T + T + 1] for i in range(n)])

    def run():
        total = 0.0
        for b in range(0, n, batch_size):
            xb, yb = (model.backend.asarray(a[b : b + batch_size]) for a in (x, y))
            _, loss = model.forward(xb, yb)
            total += float(loss) * len(xb)
        model.loss_cache = None
        return total / n

    def reconstruct(out):
        return sae.decode(sae.encode(out * scale)) / scale

    acts, _ = residual_vectors(model, x.reshape(-1), name, context=T, batch_size=batch_size)
    mean = model.backend.asarray(acts.mean(axis=0), dtype=model.dtype)
    with model.evaluating():
        clean = run()
        with replace_output(model, name, reconstruct):
            spliced = run()
        with replace_output(model, name, lambda out: model.xp.broadcast_to(mean, out.shape).copy()):
            ablated = run()
    return {"clean": clean, "spliced": spliced, "mean_ablated": ablated,
            "loss_recovered": (ablated - spliced) / (ablated - clean)}


# ---------------------------------------------------------------------------
# feature reports: top-activating contexts
# ---------------------------------------------------------------------------
def top_activations(sae, x, k=10, batch_size=4096):
    """(values (k, m), rows (k, m)): for every feature its k largest activations over the rows of x,
    largest first, and the rows they occur at (values 0 where a feature fires on fewer than k rows)."""
    m = sae.config.n_features
    best_v = np.full((k, m), -np.inf, dtype=np.float64)
    best_r = np.zeros((k, m), dtype=np.int64)
    cols = np.arange(m)[None, :]
    for b in range(0, len(x), batch_size):
        f = to_numpy(sae.encode(sae.backend.asarray(x[b : b + batch_size], dtype=sae.dtype))).astype(np.float64)
        vals = np.concatenate([best_v, f], axis=0)
        rows = np.concatenate([best_r, np.broadcast_to(np.arange(b, b + len(f))[:, None], f.shape)], axis=0)
        keep = np.argpartition(-vals, k - 1, axis=0)[:k] if len(vals) > k else np.arange(len(vals))[:, None]
        best_v, best_r = vals[keep, cols], rows[keep, cols]
    order = np.argsort(-best_v, axis=0, kind="stable")
    best_v, best_r = best_v[order, cols], best_r[order, cols]
    return np.maximum(best_v, 0.0), best_r


def _visible(s):
    return s.replace("\n", "\u21b5").replace("\t", "\u21e5")


def context_of(pieces, index, window_start, before=24, after=8):
    """(left, token, right) text around token ``index``: ``left`` is what the model saw (its own window,
    at most ``before`` tokens), ``right`` the next ``after`` tokens of the text (for the reader)."""
    lo = max(window_start, index - before)
    return "".join(pieces[lo:index]), pieces[index], "".join(pieces[index + 1 : index + 1 + after])


def feature_report(sae, x, index, ids, tokenizer, context, k=8, features=None, frequency=None,
                   before=24, after=8, num_features=None, sort="index"):
    """The top-k contexts of each feature as a list of dicts (JSON-able), live features only.

    x (N, d) are the SAE's inputs (already scaled), ``index`` each row's token
    index in ``ids``; ``context`` the window length the activations were
    taken with (a context never reaches back past its window's start).
    ``features``: indices to report (default all live ones), in the order
    ``sort`` gives: "index", "frequency" (most often active first) or "max".
    """
    values, rows = top_activations(sae, x, k=k)
    if frequency is None:
        frequency = evaluate_sae(sae, x)["frequency"]
    pieces = [tokenizer.decode([int(t)]) for t in range(tokenizer.vocab_size)]
    pieces = [pieces[int(t)] for t in ids]
    live = [j for j in range(sae.config.n_features) if values[0, j] > 0]
    if features is None:
        features = live
        if sort == "frequency":
            features = sorted(features, key=lambda j: -frequency[j])
        elif sort == "max":
            features = sorted(features, key=lambda j: -values[0, j])
        elif sort != "index":
            raise ValueError(f"sort must be 'index', 'frequency' or 'max', got {sort!r}")
        if num_features:
            features = features[:num_features]
    report = []
    for j in features:
        if not 0 <= j < sae.config.n_features:
            raise ValueError(f"feature {j} out of range (the SAE has {sae.config.n_features})")
        contexts = []
        for v, r in zip(values[:, j], rows[:, j]):
            if v <= 0:
                break
            i = int(index[r])
            left, tok, right = context_of(pieces, i, i - i % context, before, after)
            contexts.append({"activation": float(v), "left": left, "token": tok, "right": right})
        top = Counter(c["token"] for c in contexts).most_common(3)
        report.append({"feature": int(j), "frequency": float(frequency[j]), "max": float(values[0, j]),
                       "top_tokens": top, "contexts": contexts})
    return report


def report_text(report, title=""):
    """The report as plain text: the max-activating token in [brackets], newlines shown as \u21b5."""
    lines = [title, ""] if title else []
    for f in report:
        tops = ", ".join(f"{_visible(t)!r} x{n}" for t, n in f["top_tokens"])
        lines.append(f"feature {f['feature']}  (active on {100 * f['frequency']:.2f}% of tokens, "
                     f"max {f['max']:.3f}; top tokens {tops})")
        for c in f["contexts"]:
            lines.append(f"  {c['activation']:7.3f}  {_visible(c['left']):>24}[{_visible(c['token'])}]{_visible(c['right'])}")
        lines.append("")
    return "\n".join(lines)


def report_html(report, title=""):
    """The report as one HTML page: the max token in bold on a background whose strength is the activation."""
    esc = lambda s: html.escape(_visible(s))  # noqa: E731
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif} pre{font-family:monospace;margin:0} "
             "b{background:#fa0;padding:0 1px} .f{margin:1em 0}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for f in report:
        tops = ", ".join(f"{esc(t)} &times;{n}" for t, n in f["top_tokens"])
        parts.append(f"<div class=f><h3>feature {f['feature']}</h3><p>active on {100 * f['frequency']:.2f}% of "
                     f"tokens, max {f['max']:.3f}; top tokens: {tops}</p>")
        width = max((len(c["left"]) for c in f["contexts"]), default=0)  # line the max tokens up
        for c in f["contexts"]:
            alpha = c["activation"] / f["max"] if f["max"] > 0 else 0
            parts.append(f"<pre>{c['activation']:7.3f}  {esc(c['left'].rjust(width))}<b style='background:rgba(255,140,0,"
                         f"{0.25 + 0.75 * alpha:.2f})'>{esc(c['token'])}</b>{esc(c['right'])}</pre>")
        parts.append("</div>")
    return "\n".join(parts)


def write_report(report, path, title=""):
    """Write the report as HTML (.html / .htm) or text (anything else); returns the path."""
    path = Path(path)
    text = report_html(report, title) if path.suffix.lower() in (".html", ".htm") else report_text(report, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

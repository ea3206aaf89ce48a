"""Train a sparse autoencoder on a char model's residual stream; measure it; write feature reports.

    NPFLUX_DATA_DIR=../shared/data python benchmarks/train_sae.py --checkpoint out/ckpt \
        [--point transformer.h.2] [--expansion 8] [--l1 0.5] [--steps 3000] [--batch-size 1024] [--lr 1e-3]
        [--train-tokens 300000] [--val-tokens 50000] [--report-dir out/sae] [--threads 1]

Data: Tiny Shakespeare, split as training split it (the first 90% train,
the last 10% val). The SAE trains on the activations of the first
``--train-tokens`` tokens of the train split; every metric is on the first
``--val-tokens`` tokens of the val split (text neither the model nor the
SAE saw) and, as a second corpus, on the whole of interp_corpus.txt (AI
research prose: out of distribution for a Shakespeare model). A second SAE,
of the same shape, is trained on interp_corpus alone (its first 90%) and
measured on its last 10%.

Metrics (npflux.interp): fraction of variance explained (FVE), mean active
features per token (L0), dead features (never active on the evaluation
tokens), and the model's next-token loss with the activation replaced by
the SAE's reconstruction, against the clean loss and the loss with the
activation replaced by its mean ("loss recovered").

Interpretability proxies, each also measured for the SAE at its
initialisation (random unit directions, b_dec the data mean) as a baseline:
- top-token purity: per live feature, the share of its top-k activating
  tokens that are the same character. In a char model the current
  character dominates the residual stream, so random directions score high
  here too: this one does not separate a trained dictionary from a random one.
- activation mass share: per live feature, the share of ALL its activation
  (summed over the val tokens) on its single top character, and on its top
  (previous, current) character pair: high when the feature is about one
  thing, low when it fires a little everywhere.

Writes benchmarks/results/train_sae-<name>.json, the full reports (text
and HTML) into --report-dir, and the text report of the first
--committed-features live features (in index order, which is random) to
benchmarks/results/sae_features-<name>.txt.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse
import time
from pathlib import Path

import numpy as np

import benchlib as bench
from npflux.data import find_corpus, load_text
from npflux.interp import (
    encode_text, evaluate_sae, feature_report, input_scale, report_text, residual_vectors, save_sae, spliced_loss,
    train_sae, write_report,
)
from npflux.models import SAEConfig, SparseAutoencoder
from npflux.train import model_from_checkpoint


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--name", help="results name (default: the checkpoint's parent directory name)")
    p.add_argument("--point", default="transformer.h.2")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--l1", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-tokens", type=int, default=300_000)
    p.add_argument("--val-tokens", type=int, default=50_000)
    p.add_argument("--interp-steps", type=int, default=1500, help="steps of the SAE trained on interp_corpus")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--committed-features", type=int, default=40)
    p.add_argument("--report-dir", default="out/sae")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=_env.THREADS)
    p.add_argument("--out", help="JSON path (default benchmarks/results/train_sae-<name>.json)")
    return p.parse_args()


def purity(report):
    """Per live feature: the share of its top contexts whose max token is its most common one."""
    return np.array([f["top_tokens"][0][1] / len(f["contexts"]) for f in report if f["contexts"]])


def mass_share(sae, x, ids, index, vocab_size, batch_size=4096):
    """Per live feature: the share of its total activation that falls on its top character, and on its top
    (previous character, character) pair -- how specific a feature is over ALL its activations, not only its top k."""
    m = sae.config.n_features
    by_char = np.zeros((vocab_size, m))
    by_pair = np.zeros((vocab_size * vocab_size, m))
    cur = ids[index]
    prev = ids[np.maximum(index - 1, 0)]
    for b in range(0, len(x), batch_size):
        f = np.asarray(sae.encode(x[b : b + batch_size].astype(sae.dtype)), dtype=np.float64)
        np.add.at(by_char, cur[b : b + batch_size], f)
        np.add.at(by_pair, prev[b : b + batch_size] * vocab_size + cur[b : b + batch_size], f)
    total = by_char.sum(axis=0)
    live = total > 0
    return by_char.max(axis=0)[live] / total[live], by_pair.max(axis=0)[live] / total[live]


def summary(values):
    return {"median": float(np.median(values)), "mean": float(np.mean(values)),
            "share_at_least_0.75": float((values >= 0.75).mean()), "features": int(len(values))}


def metrics_on(sae, x, scale, model, ids, point, context):
    r = evaluate_sae(sae, x * scale)
    freq = r.pop("frequency")
    # alive but rare: active on fewer than 1 in 1000 tokens (such features have weak, mixed top contexts)
    r["rare_fraction"] = float(((freq > 0) & (freq < 1e-3)).mean())
    r["loss"] = spliced_loss(model, ids, point, sae, scale=scale, context=context)
    return r


def main():
    args = parse_args()
    info = bench.machine_info(args.threads)
    name = args.name or Path(args.checkpoint).resolve().parent.name
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    print(f"train_sae {name}: {info['cpu']}, {args.threads} threads; load average {info['load_average']}")

    model, tok, ckpt = model_from_checkpoint(args.checkpoint)
    T = model.config.block_size
    shakespeare = find_corpus()
    ids, _ = encode_text(tok, load_text(shakespeare))
    n_train = int(len(ids) * 0.9)
    train_ids = ids[: args.train_tokens]
    val_ids = ids[n_train : n_train + args.val_tokens]
    interp_path = Path(shakespeare).parent / "interp_corpus.txt"
    interp_ids, interp_dropped = encode_text(tok, load_text(interp_path), skip_unknown=True)

    t0 = time.perf_counter()
    x_train, idx_train = residual_vectors(model, train_ids, args.point, progress=True)
    x_val, idx_val = residual_vectors(model, val_ids, args.point, progress=True)
    x_interp, idx_interp = residual_vectors(model, interp_ids, args.point)
    collect_s = time.perf_counter() - t0
    scale = input_scale(x_train)
    d = x_train.shape[1]
    m = args.expansion * d
    print(f"activations at {args.point}: {len(x_train):,} train, {len(x_val):,} val, {len(x_interp):,} interp "
          f"tokens of width {d} ({collect_s:.0f} s); input scale {scale:.4f}")

    cfg = SAEConfig(d, m, l1=args.l1)
    sae = SparseAutoencoder(cfg, seed=args.seed)
    init = SparseAutoencoder(cfg, seed=args.seed)   # the baseline: random unit directions, b_dec = data mean
    init.p["b_dec"][...] = (x_train * scale).mean(axis=0)
    t0 = time.perf_counter()
    history = train_sae(sae, x_train * scale, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, progress=True)
    train_s = time.perf_counter() - t0

    results = {
        "shakespeare_train_subset": evaluate_sae(sae, x_train[:args.val_tokens] * scale),
        "shakespeare_val": metrics_on(sae, x_val, scale, model, val_ids, args.point, T),
        "interp_corpus": metrics_on(sae, x_interp, scale, model, interp_ids, args.point, T),
    }
    results["shakespeare_train_subset"].pop("frequency")
    freq_val = evaluate_sae(sae, x_val * scale)["frequency"]
    source = {"checkpoint": str(args.checkpoint), "point": args.point, "input_scale": scale, "context": T,
              "text": str(shakespeare), "tokens": int(len(train_ids)), "train_tokens": int(len(train_ids))}
    save_sae(report_dir / "sae", sae, source, {k: v for k, v in results.items()})

    # Feature reports on the held-out Shakespeare tokens, and on interp_corpus.
    report = feature_report(sae, x_val * scale, idx_val, val_ids, tok, T, k=args.top_k, frequency=freq_val)
    title = (f"SAE {d} -> {m} at {args.point} of {args.checkpoint}; Tiny Shakespeare val tokens "
             f"(FVE {results['shakespeare_val']['fve']:.3f}, L0 {results['shakespeare_val']['l0']:.1f}, "
             f"dead {results['shakespeare_val']['dead']})")
    write_report(report, report_dir / "features_val.txt", title)
    write_report(report, report_dir / "features_val.html", title)
    committed = Path("benchmarks/results") / f"sae_features-{name}.txt"
    committed.write_text(report_text(report[: args.committed_features], title + f"; first {args.committed_features} "
                                     "live features in index order") + "\n", encoding="utf-8")
    interp_report = feature_report(sae, x_interp * scale, idx_interp, interp_ids, tok, T, k=args.top_k)
    write_report(interp_report, report_dir / "features_interp.html", title + " -- on interp_corpus.txt")
    baseline = feature_report(init, x_val * scale, idx_val, val_ids, tok, T, k=args.top_k)
    results["top_token_purity"] = {"trained": summary(purity(report)), "init_baseline": summary(purity(baseline))}
    spec = {}
    for label, model_ in (("trained", sae), ("init_baseline", init)):
        char_share, pair_share = mass_share(model_, x_val * scale, val_ids, idx_val, tok.vocab_size)
        spec[label] = {"top_char": summary(char_share), "top_pair": summary(pair_share)}
    results["activation_mass_share"] = spec

    # A second SAE trained on interp_corpus alone.
    n_i = int(len(interp_ids) * 0.9)
    xi_train, _ = residual_vectors(model, interp_ids[:n_i], args.point)
    xi_val, _ = residual_vectors(model, interp_ids[n_i:], args.point)
    scale_i = input_scale(xi_train)
    sae_i = SparseAutoencoder(cfg, seed=args.seed)
    train_sae(sae_i, xi_train * scale_i, steps=args.interp_steps, batch_size=min(args.batch_size, 512),
              lr=args.lr, seed=args.seed)
    results["interp_sae"] = {"train_tokens": int(n_i), "val_tokens": int(len(interp_ids) - n_i),
                             "train": evaluate_sae(sae_i, xi_train * scale_i),
                             "val": metrics_on(sae_i, xi_val, scale_i, model, interp_ids[n_i:], args.point, T)}
    results["interp_sae"]["train"].pop("frequency")

    payload = {
        "benchmark": "train_sae", "machine": info, "settings": vars(args), "name": name,
        "model": {"checkpoint": str(args.checkpoint), "step": ckpt.step, "config": model.config.to_dict()},
        "sae": {**cfg.to_dict(), "input_scale": scale, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "train_tokens": int(len(x_train))},
        "interp_corpus_unknown_chars_dropped": interp_dropped,
        "time_s": {"collect_activations": collect_s, "train": train_s},
        "loss_curve": [history[i] for i in range(0, len(history), max(1, len(history) // 30))] + [history[-1]],
        "results": results,
    }
    out = Path(args.out or f"benchmarks/results/train_sae-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(__import__("json").dumps(payload, indent=2, default=bench._jsonable) + "\n")
    for k, r in results.items():
        if "fve" in r:
            loss = r.get("loss", {})
            print(f"{k:26s} FVE {r['fve']:.4f}  L0 {r['l0']:6.2f}  dead {r['dead']} ({100 * r['dead_fraction']:.1f}%)"
                  + (f"  rare {100 * r['rare_fraction']:.1f}%" if "rare_fraction" in r else "")
                  + (f"  loss clean {loss['clean']:.4f} spliced {loss['spliced']:.4f} mean-ablated "
                     f"{loss['mean_ablated']:.4f} recovered {loss['loss_recovered']:.3f}" if loss else ""))
    print("interp_sae val:", {k: results["interp_sae"]["val"][k] for k in ("fve", "l0", "dead_fraction")})
    print("top-token purity:", results["top_token_purity"])
    print("activation mass share:", results["activation_mass_share"])
    print(f"wrote {out}, {committed}, reports in {report_dir}")


if __name__ == "__main__":
    main()

"""On paper: how data-parallel npflux would scale over 2-64 nodes, from a ring all-reduce cost model.

    python benchmarks/distributed_model.py      # writes docs/distributed_scaling.png and results/distributed_model.json

Weak scaling: every node keeps its batch, so its compute per step T_c stays
what one node measures, and a step on N nodes costs T_c plus the part of the
all-reduce the backward does not hide. Ring all-reduce of S bytes in k
buckets over N nodes (Patarasuk and Yuan; Thakur, Rabenseifner and Gropp)::

    T_ar = 2 (N-1)/N * S / B           bandwidth: each byte leaves each node twice (reduce-scatter, all-gather)
         + 2 (N-1) * k * alpha         latency: 2 (N-1) ring steps per bucket
         + (N-1)/N * S / gamma         the additions, at memory speed

Blocking: efficiency = T_c / (T_c + T_ar). Overlapped: the buckets go out
while the backward (2/3 of the compute: it does twice the forward's FLOPs)
still runs, but the last bucket (holding the token embedding, which the
backward finishes last) cannot start before the backward ends::

    exposed = max(T_ar(last bucket), T_ar - 2/3 T_c)         efficiency = T_c / (T_c + exposed)

T_c is measured: shakespeare-n's step on this machine (2 cores; the quiet
measurement of benchmarks/results/train_step_sn.json: 64 x 256 tokens in
8.48 s, 1.16 TFLOP, so 137 GFLOP/s). GPT-2 small (124M) is not trained here;
its T_c is its FLOPs for 8 x 1024 tokens (6 N + 12 L T C per token) at that
measured rate. The lower row of the plot puts the same models on a node 100x
faster (a GPU's order of magnitude), where communication starts to matter.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"

MEASURED = json.loads((HERE / "results" / "train_step_sn.json").read_text())
SN_ROW = MEASURED["raw"]["shakespeare-n"]["npflux"]
SN_STEP_S = SN_ROW["median_s"]                      # 64 x 256 tokens, 2 threads, this machine
FLOP_RATE = SN_ROW["flops_per_call"] / SN_STEP_S     # what npflux sustains on this machine's 2 cores

NETWORKS = {"10 Gb/s Ethernet (TCP)": dict(bandwidth=10e9 / 8, alpha=25e-6),
            "100 Gb/s InfiniBand": dict(bandwidth=100e9 / 8, alpha=2e-6)}
GAMMA = 10e9          # bytes/s of additions (memory bound: read two, write one)
BUCKET = 2**20        # npflux's default bucket: 1 MB


def gpt2_small_step_s(tokens=8 * 1024, n_params=124_439_808, n_layer=12, block=1024, n_embd=768):
    flops = tokens * (6 * n_params + 12 * n_layer * block * n_embd)
    return flops / FLOP_RATE


MODELS = {
    # name: (gradient bytes (float32), bytes of the last bucket (the token embedding), T_c on one node)
    "shakespeare-n (10.8M)": (10_788_929 * 4, max(65 * 384 * 4 + 256 * 384 * 4, BUCKET), SN_STEP_S),
    "GPT-2 small (124M)": (124_439_808 * 4, 50257 * 768 * 4 + 1024 * 768 * 4, gpt2_small_step_s()),
}


def allreduce_s(nbytes, n, bandwidth, alpha, buckets):
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * buckets * alpha + (n - 1) / n * nbytes / GAMMA


def efficiency(model, n, network, speedup=1.0, overlap=False):
    nbytes, last, t_c = MODELS[model]
    t_c /= speedup
    net = NETWORKS[network]
    t_ar = allreduce_s(nbytes, n, net["bandwidth"], net["alpha"], max(1, round(nbytes / BUCKET)))
    exposed = max(allreduce_s(last, n, net["bandwidth"], net["alpha"], 1), t_ar - 2 / 3 * t_c) if overlap else t_ar
    return t_c / (t_c + exposed), t_c, t_ar


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [2, 4, 8, 16, 32, 64]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey=True)
    table = []
    for row, speedup in enumerate((1.0, 100.0)):
        for col, model in enumerate(MODELS):
            ax = axes[row][col]
            for network, color in zip(NETWORKS, ("tab:red", "tab:blue")):
                for overlap, style in ((False, "-"), (True, "--")):
                    effs = [efficiency(model, n, network, speedup, overlap)[0] for n in nodes]
                    ax.plot(nodes, effs, style, color=color, marker="o", ms=3,
                            label=f"{network}, {'overlapped' if overlap else 'blocking'}")
                    for n, e in zip(nodes, effs):
                        _, t_c, t_ar = efficiency(model, n, network, speedup, overlap)
                        table.append({"model": model, "node": "this machine" if speedup == 1 else "100x faster",
                                      "network": network, "overlap": overlap, "nodes": n, "efficiency": e,
                                      "compute_s": t_c, "allreduce_s": t_ar})
            node = "this 2-core node" if speedup == 1 else "a node 100x faster"
            ax.set_title(f"{model} on {node}\n(compute {MODELS[model][2] / speedup:.3g} s per step)", fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("scaling efficiency")
            if row == 1:
                ax.set_xlabel("nodes")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Data-parallel npflux, predicted: ring all-reduce model fed with the measured step time", fontsize=11)
    fig.tight_layout()
    fig.savefig(DOCS / "distributed_scaling.png", dpi=100)
    out = {"flop_rate": FLOP_RATE, "sn_step_s": SN_STEP_S, "networks": NETWORKS, "gamma": GAMMA, "bucket": BUCKET,
           "models": {k: {"grad_bytes": v[0], "last_bucket_bytes": v[1], "compute_s": v[2]} for k, v in MODELS.items()},
           "rows": table}
    (HERE / "results" / "distributed_model.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"measured: shakespeare-n step {SN_STEP_S:.2f} s, {FLOP_RATE / 1e9:.0f} GFLOP/s; "
          f"GPT-2 small step (8 x 1024 tokens) {MODELS['GPT-2 small (124M)'][2]:.1f} s")
    for r in table:
        if r["nodes"] in (2, 8, 64):
            print(f"{r['model']:22s} {r['node']:13s} {r['network']:24s} {'overlap ' if r['overlap'] else 'blocking'} "
                  f"N={r['nodes']:2d}  eff {r['efficiency']:.3f}  (T_c {r['compute_s']:.3g} s, T_ar {r['allreduce_s']:.3g} s)")


if __name__ == "__main__":
    main()

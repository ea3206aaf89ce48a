"""Data parallelism on this machine: 1 process x 2 threads against 2 MPI ranks x 1 thread, and the wait on communication.

    python benchmarks/bench_distributed.py [--rounds 2] [--json benchmarks/results/distributed.json]

For shakespeare-s2 (batch 16 x 32) and shakespeare-n (batch 8 x 256: the
preset's 64 rows would take minutes per candidate here), each candidate is a
process of its own (``dist_child.py``; two ranks under ``mpiexec -n 2``),
candidates in turn for ``--rounds`` rounds, medians reported (the method of
harness.py):

- ``1x1``: one process, one thread (the compute of one core);
- ``1x2``: one process, two threads (npflux's worker pool and BLAS);
- ``2x1 overlap``: two ranks of one thread, buckets all-reduced during the backward;
- ``2x1 blocking``: two ranks of one thread, one all-reduce after the backward.

Reported: tokens per second of the global batch, and the share of the step a
rank spent waiting on communication. The machine is shared: the load average
before and after each process is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = {"shakespeare-s2": dict(batch=16, block=32, steps=20, warmup=3),
         "shakespeare-n": dict(batch=8, block=256, steps=3, warmup=1)}
CANDIDATES = {"1x1": (1, 1, []), "1x2": (1, 2, []), "2x1 overlap": (2, 1, []), "2x1 blocking": (2, 1, ["--blocking"])}


def run(preset, case, ranks, threads, extra):
    cmd = [sys.executable, str(HERE / "dist_child.py"), "--preset", preset, "--threads", str(threads),
           *(f"--{k}={v}" for k, v in case.items()), *extra]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        cmd = [mpiexec, "-n", str(ranks)] + cmd
    env = dict(os.environ, PYTHONPATH=str(harness.REPO))
    before = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load_average_before"] = before
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--presets", nargs="+", default=list(CASES))
    p.add_argument("--json", default=str(harness.RESULTS / "distributed.json"))
    args = p.parse_args()
    machine = harness.machine()
    rows, raw = [], {}
    for preset in args.presets:
        case = CASES[preset]
        runs = {name: [] for name in CANDIDATES}
        for r in range(args.rounds):
            for name, (ranks, threads, extra) in CANDIDATES.items():
                res = run(preset, case, ranks, threads, extra)
                runs[name].append(res)
                print(f"{preset} round {r + 1} {name:13s} {res['median_s'] * 1e3:8.1f} ms/step "
                      f"{res['tokens_per_s']:8.0f} tok/s  waiting {100 * res['wait_fraction']:4.1f}%  "
                      f"load {res['load_average'][0]:.2f}", flush=True)
        raw[preset] = runs
        for name, results in runs.items():
            step = statistics.median(x["median_s"] for x in results)
            rows.append({"preset": preset, "candidate": name, "batch": f"{case['batch']}x{case['block']}",
                         "step_ms": step * 1e3, "tokens_per_s": case["batch"] * case["block"] / step,
                         "wait_pct": 100 * statistics.median(x["wait_fraction"] for x in results),
                         "wait_ms": 1e3 * statistics.median(x["wait_median_s"] for x in results),
                         "load": statistics.median(x["load_average"][0] for x in results)})
    machine["load_average_after"] = os.getloadavg()
    payload = {"benchmark": "distributed", "machine": machine, "cases": CASES, "rounds": args.rounds,
               "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]), "rows": rows, "raw": raw}
    harness.write("distributed", payload, args.json)
    print(harness.table(rows, [("preset", "preset", "{}"), ("batch", "batch", "{}"), ("candidate", "processes x threads", "{}"),
                               ("step_ms", "ms / step", "{:.1f}"), ("tokens_per_s", "tokens / s", "{:,.0f}"),
                               ("wait_ms", "waiting (ms)", "{:.1f}"), ("wait_pct", "waiting (% of step)", "{:.1f}"),
                               ("load", "load avg (1 min)", "{:.2f}")]))


if __name__ == "__main__":
    main()

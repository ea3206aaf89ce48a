"""The benchmark method: every candidate in a fresh process of its own, alternating, medians.

A user runs one library in a process, with that library's own defaults; so
does every side-by-side timing here. For each measurement the harness starts
``benchmarks/step_child.py`` once per candidate per round, in turn
(npflux, torch, npflux, torch, ... over ``rounds`` rounds), so that a change in
the machine's load hits all candidates alike; each child times ``steps``
steps after ``warmup`` untimed ones and reports their median; the harness
reports the median over the rounds. Nothing is set in the children's
environment beyond what the caller's shell has (``--threads N`` reaches each
library through its own API: ``npflux.set_num_threads(N)``,
``torch.set_num_threads(N)``).

Every result carries the machine: CPU model, usable CPUs, load average before
and after, and, from each child, the BLAS library, its version and the kernel
OpenBLAS chose (threadpoolctl's ``architecture``).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def shared_data(name: str) -> Path:
    """A corpus file in $NPFLUX_DATA_DIR, else in the shared data folder beside the checkout."""
    from npflux import settings

    return (settings.get("data_dir") or REPO.parent / "shared" / "data") / name


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "platform": platform.platform(), "python": platform.python_version(),
            "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run_child(args: list, timeout: float = 900) -> dict:
    """Run step_child.py with ``args`` in a new process; its JSON (last stdout line) as a dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(HERE / "step_child.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"step_child {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(candidates: dict, rounds: int = 3, log=print) -> dict:
    """name -> child args; each candidate run ``rounds`` times, in turn. name -> summary."""
    runs = {name: [] for name in candidates}
    for r in range(rounds):
        for name, args in candidates.items():
            res = run_child(args)
            runs[name].append(res)
            log(f"  round {r + 1}/{rounds} {name:16s} {res['median_s'] * 1e3:9.2f} ms")
    out = {}
    for name, results in runs.items():
        medians = [x["median_s"] for x in results]
        first = results[0]
        out[name] = {"median_s": statistics.median(medians), "process_medians_s": medians,
                     "best_s": min(min(x["times_s"]) for x in results),
                     "flops_per_call": first.get("flops_per_call"), "blas": first.get("blas"),
                     "threads": first.get("npflux_threads") or first.get("torch_threads"),
                     "batch_shares": first.get("npflux_batch_shares"),
                     "reuse_memory": first.get("npflux_reuse_memory"),
                     "profile": next((x["profile"] for x in results if "profile" in x), None),
                     "load_average": [x.get("load_average") for x in results]}
    return out


def write(name: str, payload: dict, path=None) -> Path:
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list, columns: list) -> str:
    """Markdown table of ``rows`` (dicts); columns = [(key, header, format)]."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

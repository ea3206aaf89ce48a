"""Load test of ``npflux serve`` on the loopback interface: continuous batching on and off, and overload.

    python benchmarks/load_test_serve.py [--checkpoint DIR] [--concurrency 1 4 16 64] [--requests 512]
        [--max-new-tokens 32] [--time-limit 15] [--max-batch 64] [--threads 1]
        [--out benchmarks/results/serve_batching.json]

Starts the real server (``python -m npflux.cli serve``) in subprocesses on free
127.0.0.1 ports, so the clients (threads here, one keep-alive connection each)
do not share its interpreter:

1. batching ON (``--max-batch``, the default queue) and batching OFF
   (``--no-batching``: each request's forwards take turns under one lock, the
   way npflux served before), measured in the same run at each concurrency C:
   C clients send streaming requests (SSE, so the time to first token is seen)
   with different prompts, prompt lengths and seeds, ``--max-new-tokens`` each,
   until ``--requests`` are answered or ``--time-limit`` seconds pass.
   Reported: requests/s, tokens/s, p50/p99 latency, p50/p99 time to first
   token, and the mean batch size (from the server's /metrics). The headline is
   tokens/s at 16 clients over tokens/s at 1, with batching on and off.
2. overload: a server with a small batch and queue (``--overload-batch``,
   ``--overload-queue``) and ``--overload-clients`` clients sending plain
   requests back to back for ``--overload-seconds``, while a poller reads
   /health every 50 ms. Reported: answered, refused (503) and failed counts,
   how fast the refusals came, the /health answers and their worst latency,
   and whether a request succeeds once the load is gone.

Without ``--checkpoint`` the model is ``--preset`` (nanogpt-cpu: 0.8M
parameters, a block of 64, by default) with random weights: the time per
token does not depend on the weights. The prompts (5 to 24 characters) and 32
new tokens fit its block, so the key/value cache serves every step; past the
block (shakespeare-s1 and -s2 have 32) every token recomputes a whole window,
which batching shares less (measured in-process, these prompts: 2.9-3.4x at
16 rows for s1 against 4.6-5.7x for nanogpt-cpu). The server's CPU time per token is reported
beside the rates: on a shared machine it moves far less than they do. The load average (the
machine is shared) is recorded at the start and the end.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# 5 to 24 characters: with 32 new tokens a request fits a block of 64, so its key/value cache serves every step
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe", "KING RICHARD III:\nNow is", "To be", "The king",
           "What, ho!", "MENENIUS:\nWhy, masters"]


def random_checkpoint(directory, preset="nanogpt-cpu"):
    from npflux import GPT, GPTConfig
    from npflux.checkpoint import save_checkpoint
    from npflux.tokenizers import CharTokenizer

    tok = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")  # Tiny Shakespeare's 65
    model = GPT(GPTConfig.from_preset(preset, vocab_size=tok.vocab_size), seed=0)
    return save_checkpoint(Path(directory) / "ckpt", model.state_dict(), {"model": model.config.to_dict()},
                           tokenizer=tok.to_dict())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``npflux serve`` in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, ckpt, threads, *flags):
        self.port = free_port()
        env = dict(os.environ, NPFLUX_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "npflux.cli", "serve", "--checkpoint", str(ckpt), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", "--max-new-tokens-limit", "256", *flags]
        self.flags = list(flags)
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT)

    def __enter__(self):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}")
            try:
                if get(self.port, "/health")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise SystemExit("the server did not become healthy in time")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (Linux /proc): how much work the server did,
    which on a shared machine says more than wall-clock rates do."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_size_sum_count(port):
    """(sum, count) of the server's npflux_batch_size histogram (for the mean batch size of a level)."""
    _, text = get(port, "/metrics")
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("npflux_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("npflux_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


def request_body(n, max_new_tokens):
    return {"prompt": PROMPTS[n % len(PROMPTS)], "max_new_tokens": max_new_tokens, "temperature": 0.8, "seed": n}


def stream_request(conn, body):
    """(latency s, time to first token s, tokens) of one SSE request on a kept-alive connection."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/generate/stream", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, tokens = None, None
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"event: token") and first is None:
            first = time.perf_counter() - t0
        elif line.startswith(b"event: done"):
            tokens = json.loads(r.readline()[len(b"data: "):])["tokens"]
        elif line.startswith(b"event: error"):
            raise RuntimeError(r.readline().decode())
    r.read()
    if tokens is None:
        raise RuntimeError("the stream ended without a done event")
    return time.perf_counter() - t0, first, tokens


def ms(xs, q):
    return round(float(np.percentile(xs, q) * 1000), 1) if xs else None


def run_level(port, concurrency, total, time_limit, max_new_tokens, pid=None):
    lock, counter = threading.Lock(), [0]
    latencies, firsts, tokens, errors = [], [], [0], []
    deadline = time.monotonic() + time_limit

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if counter[0] >= total or time.monotonic() > deadline:
                    break
                n = counter[0]
                counter[0] += 1
            try:
                lat, first, k = stream_request(conn, request_body(n, max_new_tokens))
            except Exception as exc:  # counted and reported, never silently dropped
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            with lock:
                latencies.append(lat)
                firsts.append(first)
                tokens[0] += k
        conn.close()

    before, cpu0 = batch_size_sum_count(port), cpu_seconds(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after, cpu1 = batch_size_sum_count(port), cpu_seconds(pid)
    steps = after[1] - before[1]
    cpu_ms = round((cpu1 - cpu0) / tokens[0] * 1000, 3) if cpu0 is not None and cpu1 is not None and tokens[0] else None
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens[0] / wall, 1),
            "p50_ms": ms(latencies, 50), "p99_ms": ms(latencies, 99),
            "first_token_p50_ms": ms(firsts, 50), "first_token_p99_ms": ms(firsts, 99),
            "mean_batch_size": round((after[0] - before[0]) / steps, 2) if steps else None,
            "server_cpu_ms_per_token": cpu_ms, "server_cpu_cores": round((cpu1 - cpu0) / wall, 2) if cpu_ms else None,
            "load_average_1m": os.getloadavg()[0]}


def run_overload(port, clients, seconds, max_new_tokens):
    """Clients hammer /v1/generate for ``seconds`` while /health is polled; counts and timings."""
    lock, stop = threading.Lock(), threading.Event()
    ok, refused, failed, refused_s, ok_s, health = [0], [0], [], [], [], []

    def client(i):
        n = i
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            t0, was_refused = time.perf_counter(), False
            try:
                conn.request("POST", "/v1/generate", body=json.dumps(request_body(n, max_new_tokens)),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                dt = time.perf_counter() - t0
                with lock:
                    if r.status == 200:
                        ok[0] += 1
                        ok_s.append(dt)
                    elif r.status == 503 and json.loads(body)["code"] == "overloaded" and r.getheader("Retry-After"):
                        refused[0] += 1
                        refused_s.append(dt)
                        was_refused = True
                    else:
                        failed.append(f"HTTP {r.status}: {body[:100]!r}")
            except Exception as exc:
                with lock:
                    failed.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()
            n += clients
            if was_refused:
                time.sleep(0.05)  # a refused client waits a little before trying again (not the Retry-After)

    def poll_health():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = get(port, "/health")
            except Exception as exc:
                status = f"{type(exc).__name__}"
            health.append((status, time.perf_counter() - t0))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=poll_health))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/generate", body=json.dumps(request_body(0, max_new_tokens)),
                 headers={"Content-Type": "application/json"})
    recovered = conn.getresponse().status == 200
    conn.close()
    health_ok = sum(1 for s, _ in health if s == 200)
    return {"clients": clients, "seconds": seconds, "answered_200": ok[0], "refused_503": refused[0],
            "failed": len(failed), "failed_examples": failed[:3],
            "refusal_p50_ms": ms(refused_s, 50), "refusal_p99_ms": ms(refused_s, 99),
            "answered_p50_ms": ms(ok_s, 50), "answered_p99_ms": ms(ok_s, 99),
            "health_polls": len(health), "health_200": health_ok,
            "health_worst_ms": round(max(s for _, s in health) * 1000, 1) if health else None,
            "recovered": recovered}


def show(mode, r):
    print(f"{mode:13s} {r['concurrency']:4d} {r['requests']:5d} {r['errors']:4d} {r['requests_per_s']:7.1f} "
          f"{r['tokens_per_s']:8.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['first_token_p50_ms']:9.1f} "
          f"{r['first_token_p99_ms']:9.1f} {r['mean_batch_size'] if r['mean_batch_size'] is not None else '-':>6} "
          f"{r['server_cpu_ms_per_token'] if r['server_cpu_ms_per_token'] is not None else '-':>8} "
          f"{r['load_average_1m']:5.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="checkpoint to serve (default: --preset with random weights)")
    p.add_argument("--preset", default="nanogpt-cpu", help="the model without --checkpoint (default nanogpt-cpu)")
    p.add_argument("--requests", type=int, default=512, help="requests per level at most (default 512)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=15.0, help="seconds per level at most (default 15)")
    p.add_argument("--max-batch", type=int, default=64, help="the batching server's --max-batch (default 64)")
    p.add_argument("--overload-batch", type=int, default=4)
    p.add_argument("--overload-queue", type=int, default=4)
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="the server's NumPy/npflux threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_batching.json"))
    args = p.parse_args()

    from benchlib import machine_info

    load_start = os.getloadavg()
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(random_checkpoint(tmp, args.preset))
        print(f"{args.max_new_tokens} new tokens per request; load average at the start {load_start}\n")
        print(f"{'server':13s} {'C':>4s} {'reqs':>5s} {'err':>4s} {'req/s':>7s} {'tok/s':>8s} {'p50 ms':>8s} "
              f"{'p99 ms':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'batch':>6s} {'cpu ms/t':>8s} {'load':>5s}")
        for mode, flags in (("batching on", ["--max-batch", str(args.max_batch), "--max-queue", "256"]),
                            ("batching off", ["--no-batching"])):
            with Server(ckpt, args.threads, *flags) as server:
                for n in range(3):  # warm-up
                    stream_request(http.client.HTTPConnection("127.0.0.1", server.port, timeout=60),
                                   request_body(n, args.max_new_tokens))
                for c in args.concurrency:
                    r = dict(run_level(server.port, c, args.requests, args.time_limit, args.max_new_tokens,
                                       server.proc.pid), server=mode, flags=flags)
                    rows.append(r)
                    show(mode, r)
            by_c = {r["concurrency"]: r for r in rows if r["server"] == mode}
            if 1 in by_c and 16 in by_c:
                one, sixteen = by_c[1], by_c[16]
                ratios[mode] = {"tokens_per_s": round(sixteen["tokens_per_s"] / one["tokens_per_s"], 2),
                                "server_cpu_per_token": round(one["server_cpu_ms_per_token"]
                                                              / sixteen["server_cpu_ms_per_token"], 2)
                                if one["server_cpu_ms_per_token"] and sixteen["server_cpu_ms_per_token"] else None}
        print("\n16 clients over 1 client: " + "; ".join(
            f"{m}: tokens/s {x['tokens_per_s']}x, server CPU per token {x['server_cpu_per_token']}x less"
            for m, x in ratios.items()))
        flags = ["--max-batch", str(args.overload_batch), "--max-queue", str(args.overload_queue)]
        with Server(ckpt, args.threads, *flags) as server:
            overload = dict(run_overload(server.port, args.overload_clients, args.overload_seconds,
                                         args.max_new_tokens), flags=flags)
        print(f"\noverload ({' '.join(flags)}, {args.overload_clients} clients, {args.overload_seconds:g} s): "
              f"{overload['answered_200']} answered, {overload['refused_503']} refused 503 "
              f"(p50 {overload['refusal_p50_ms']} ms, p99 {overload['refusal_p99_ms']} ms), "
              f"{overload['failed']} failed; /health {overload['health_200']}/{overload['health_polls']} "
              f"answered 200 (worst {overload['health_worst_ms']} ms); recovered: {overload['recovered']}")
    load_end = os.getloadavg()
    print(f"load average at the end {load_end}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "load_test_serve", "command": " ".join(["python", "benchmarks/load_test_serve.py"]
                                                                    + sys.argv[1:]),
               "machine": machine_info(args.threads), "load_average_start": load_start, "load_average_end": load_end,
               "settings": {**vars(args), "checkpoint": args.checkpoint or f"{args.preset}, random weights"},
               "rows": rows, "tokens_per_s_16_over_1": ratios, "overload": overload}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Load test of ``npflux serve`` on the loopback interface: requests/s and latency percentiles.

    python benchmarks/load_test_serve.py [--checkpoint DIR] [--requests 200] [--concurrency 1 4 16]
        [--max-new-tokens 16] [--time-limit 60] [--threads 1] [--out benchmarks/results/serve_load.json]

Starts the real server (``python -m npflux.cli serve``) in a subprocess on a
free 127.0.0.1 port, so the clients (threads here, one keep-alive connection
each) do not share its interpreter. For each concurrency C, C clients send
``--requests`` generation requests in all (different prompts, seeds and
temperature 0.8, ``--max-new-tokens`` tokens each), or as many as fit in
``--time-limit`` seconds. Latency is from sending a request to reading its
whole answer; for the streaming endpoint also the time to the first token.
Without ``--checkpoint`` the model is shakespeare-s1 with random weights
(the time per token does not depend on the weights).
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
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe", "KING RICHARD III:\n", "To be", "The king", "What, ho!",
           "MENENIUS:\nWhy"]


def random_checkpoint(directory):
    from npflux import GPT, GPTConfig
    from npflux.checkpoint import save_checkpoint
    from npflux.tokenizers import CharTokenizer

    tok = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")  # Tiny Shakespeare's 65
    model = GPT(GPTConfig.from_preset("shakespeare-s1", vocab_size=tok.vocab_size), seed=0)
    return save_checkpoint(Path(directory) / "ckpt", model.state_dict(), {"model": model.config.to_dict()},
                           tokenizer=tok.to_dict())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not become healthy in time")


def one_request(conn, path, body, stream):
    """(latency s, time to first token s or None, tokens) of one POST on a kept-alive connection."""
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = None
    if stream:
        tokens = 0
        while True:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"event: token") and first is None:
                first = time.perf_counter() - t0
            if line.startswith(b"event: done"):
                tokens = json.loads(r.readline()[len(b"data: "):])["tokens"]
        r.read()
    else:
        tokens = json.loads(r.read())["tokens"]
    return time.perf_counter() - t0, first, tokens


def in_process_baseline(ckpt, n, max_new_tokens, threads):
    """The same requests through ``model.generate`` in this process, one after another (no HTTP)."""
    from npflux.backend import set_num_threads
    from npflux.train import model_from_checkpoint

    set_num_threads(threads)
    model, tok, _ = model_from_checkpoint(ckpt)
    latencies = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        ids = np.array([tok.encode(PROMPTS[i % len(PROMPTS)])])
        tok.decode(model.generate(ids, max_new_tokens, temperature=0.8, seed=i)[0, ids.shape[1]:])
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"endpoint": "in-process model.generate", "concurrency": 1, "requests": n, "errors": 0, "wall_s": wall,
            "requests_per_s": n / wall, "tokens_per_s": n * max_new_tokens / wall,
            "p50_ms": float(np.percentile(latencies, 50) * 1000), "p90_ms": float(np.percentile(latencies, 90) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000), "first_token_p50_ms": None}


def run_level(port, concurrency, total, time_limit, max_new_tokens, stream):
    path = "/v1/generate/stream" if stream else "/v1/generate"
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
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_new_tokens": max_new_tokens, "temperature": 0.8,
                    "seed": n}
            try:
                lat, first, k = one_request(conn, path, body, stream)
            except Exception as exc:  # counted and reported, never silently dropped
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            with lock:
                latencies.append(lat)
                tokens[0] += k
                if first is not None:
                    firsts.append(first)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else None  # noqa: E731
    return {"endpoint": path, "concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "tokens_per_s": tokens[0] / wall, "p50_ms": ms(latencies, 50), "p90_ms": ms(latencies, 90),
            "p99_ms": ms(latencies, 99), "first_token_p50_ms": ms(firsts, 50), "first_token_p90_ms": ms(firsts, 90)}


def show(r):
    ttft = f"{r['first_token_p50_ms']:9.1f}" if r["first_token_p50_ms"] is not None else f"{'-':>9s}"
    print(f"{r['endpoint']:26s} {r['concurrency']:3d} {r['requests']:5d} {r['errors']:4d} {r['requests_per_s']:7.1f} "
          f"{r['tokens_per_s']:7.0f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} {r['p99_ms']:8.1f} {ttft}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="checkpoint to serve (default: shakespeare-s1 with random weights)")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (default 200)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most (default 60)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="skip the streaming endpoint")
    p.add_argument("--threads", type=int, default=1, help="the server's NumPy/npflux threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args()

    from benchlib import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(random_checkpoint(tmp))
        rows = [in_process_baseline(ckpt, min(args.requests, 50), args.max_new_tokens, args.threads)]
        port = free_port()
        env = dict(os.environ, NPFLUX_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   OPENBLAS_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, "-m", "npflux.cli", "serve", "--checkpoint", ckpt, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
        try:
            wait_healthy(port, proc)
            conn = http.client.HTTPConnection("127.0.0.1", port)
            for n in range(3):  # warm-up
                one_request(conn, "/v1/generate", {"prompt": PROMPTS[n], "max_new_tokens": args.max_new_tokens}, False)
            conn.close()
            print(f"server pid {proc.pid} on 127.0.0.1:{port}, {args.max_new_tokens} new tokens per request\n")
            print(f"{'endpoint':26s} {'C':>3s} {'reqs':>5s} {'err':>4s} {'req/s':>7s} {'tok/s':>7s} "
                  f"{'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'TTFT p50':>9s}")
            show(rows[0])
            for stream in ([False, True] if args.stream else [False]):
                for c in args.concurrency:
                    rows.append(run_level(port, c, args.requests, args.time_limit, args.max_new_tokens, stream))
                    show(rows[-1])
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "load_test_serve", "machine": machine_info(args.threads),
               "settings": {**vars(args), "checkpoint": args.checkpoint or "shakespeare-s1, random weights"},
               "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Continuous batching in the real server: many clients, one batch, each result as if alone.

The server runs uvicorn in a background thread on a free 127.0.0.1 port. The
models are float64, so that a request's tokens under load equal its tokens
alone exactly: the batched forward sums in another order than a solo one, which
moves the logits by ~1e-16 relative; a greedy or sampled token could only flip
at a near-tie that close (see tests/test_batched_generate.py).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from npflux import GPT, GPTConfig
from npflux.generate import Sequence
from npflux.tokenizers import CharTokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")
prom_parser = pytest.importorskip("prometheus_client.parser")
from npflux.scheduler import Overloaded, Scheduler  # noqa: E402
from npflux.serve import Engine, Limits, create_app, serve_in_thread  # noqa: E402

TEXT = "The cat sat on the mat. Dogs chase cats in the garden. Paris is the capital of France.\n"
TIMEOUT = 30


def tiny(seed=0, block=32):
    tok = CharTokenizer(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=2, n_head=2, n_embd=16)
    return GPT(cfg, seed=seed, dtype="float64"), tok


def post(url, path, body, timeout=TIMEOUT):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=TIMEOUT) as r:
        return r.status, r.read().decode()


def sse_done(text):
    """The "done" event's data of a server-sent event stream (and the pieces before it)."""
    pieces, done = [], None
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(fields["data"])
        if fields["event"] == "token":
            pieces.append(data["text"])
        elif fields["event"] == "done":
            done = data
    assert done is not None and "".join(pieces) == done["text"], text
    return done


def ws_generate(url, body):
    """(messages, done) of one request over the WebSocket."""
    with ws_client.connect(url.replace("http://", "ws://") + "/v1/ws/generate", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps(body))
        messages = []
        while True:
            m = json.loads(ws.recv(timeout=TIMEOUT))
            messages.append(m)
            if m["type"] in ("done", "error"):
                return messages, m


def run_one(url, kind, body):
    """The text, finish reason and token count of one request, by plain POST, SSE or WebSocket."""
    if kind == "plain":
        status, _, text = post(url, "/v1/generate", body)
        assert status == 200, text
        out = json.loads(text)
    elif kind == "sse":
        status, _, text = post(url, "/v1/generate/stream", body)
        assert status == 200, text
        out = sse_done(text)
    else:
        messages, out = ws_generate(url, body)
        assert out["type"] == "done", out
        assert "".join(m["text"] for m in messages if m["type"] == "token") == out["text"]
    return out["text"], out["finish_reason"], out["tokens"]


@pytest.fixture(scope="module")
def server():
    model, tok = tiny()
    engine = Engine(model, tok, max_batch=8, max_queue=64)
    with serve_in_thread(create_app(engine, Limits(max_new_tokens=48))) as url:
        yield url, engine
    engine.close()


def mixed_requests(n=16):
    """Different prompt lengths and settings: greedy, seeded sampling, top-k/top-p, stop strings."""
    prompts = ["T", "The cat", "Dogs chase cats in", "Paris is the capital of", "a", "The cat sat on the mat. Dogs",
               "cats", "in the garden"]
    out = []
    for i in range(n):
        body = {"prompt": prompts[i % len(prompts)], "max_new_tokens": 8 + (5 * i) % 37, "seed": 100 + i}
        if i % 4 == 0:
            body["temperature"] = 0.0
        elif i % 4 == 1:
            body.update(temperature=1.0, top_k=5)
        elif i % 4 == 2:
            body.update(temperature=0.7, top_p=0.9, stop=["."])
        else:
            body["temperature"] = 1.3
        out.append((("plain", "sse", "ws")[i % 3], body))
    return out


def test_sixteen_concurrent_mixed_clients_each_get_their_solo_result(server):
    url, engine = server
    requests = mixed_requests(16)
    solo = [run_one(url, kind, body) for kind, body in requests]  # one at a time: a batch of one
    barrier = threading.Barrier(len(requests))
    sizes, original = [], engine.scheduler.batch.step

    def step():
        sizes.append(len(engine.scheduler.batch))
        return original()

    engine.scheduler.batch.step = step

    def run(i):
        barrier.wait(TIMEOUT)
        return run_one(url, *requests[i])

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(run, range(len(requests))))
    finally:
        del engine.scheduler.batch.step
    assert together == solo
    assert max(sizes) == 8             # the batch filled (max_batch 8), the rest waited and joined later
    assert {r for _, r, _ in solo} == {"length", "stop"}  # both ways of ending were exercised
    assert engine.scheduler.load()["running"] == 0 and engine.scheduler.load()["waiting"] == 0


def test_websocket_streams_tokens_and_reports_errors_with_codes(server):
    url, _ = server
    body = {"prompt": "The cat", "max_new_tokens": 12, "temperature": 0.9, "seed": 3}
    messages, done = ws_generate(url, body)
    tokens = [m for m in messages if m["type"] == "token"]
    assert [m["index"] for m in tokens] == list(range(len(tokens))) and len(tokens) >= 1
    assert done["tokens"] == 12 and done["finish_reason"] == "length" and done["seed"] == 3
    t = done["timings"]
    assert 0 <= t["time_to_first_token_ms"] <= t["total_ms"] and t["tokens_per_s"] > 0
    assert done["text"] == json.loads(post(url, "/v1/generate", body)[2])["text"]
    with ws_client.connect(url.replace("http://", "ws://") + "/v1/ws/generate", open_timeout=TIMEOUT) as ws:
        for bad, code, words in [("{not json", "invalid_request", "not valid JSON"),
                                 (json.dumps({"prompt": "The", "max_new_tokens": 10**6}), "invalid_request",
                                  "max_new_tokens"),
                                 (json.dumps({"prompt": "Hi!"}), "bad_request", "not in the vocabulary"),
                                 (json.dumps({"prompt": "x" * 70000}), "bad_request", "bytes")]:
            ws.send(bad)
            m = json.loads(ws.recv(timeout=TIMEOUT))
            assert m["type"] == "error" and m["code"] == code and words in m["error"], m
        ws.send(json.dumps(body).encode())  # still open; a binary frame of UTF-8 JSON is read as text
        while (m := json.loads(ws.recv(timeout=TIMEOUT)))["type"] == "token":
            pass
        assert m["type"] == "done" and m["text"] == done["text"]


def test_metrics_in_the_prometheus_text_format(server):
    url, _ = server
    assert post(url, "/v1/generate", {"prompt": "The", "max_new_tokens": 5, "seed": 1})[0] == 200
    status, text = get(url, "/metrics")
    assert status == 200
    families = {f.name: f for f in prom_parser.text_string_to_metric_families(text)}
    for name in ("npflux_requests", "npflux_tokens_generated", "npflux_queue_length", "npflux_batch_size",
                 "npflux_time_to_first_token_seconds", "npflux_tokens_per_second", "npflux_running_requests"):
        assert name in families, name

    def value(family, sample_name, **labels):
        return sum(s.value for s in families[family].samples
                   if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("npflux_requests", "npflux_requests_total", endpoint="generate", outcome="ok") >= 1
    assert value("npflux_tokens_generated", "npflux_tokens_generated_total") >= 5
    assert value("npflux_batch_size", "npflux_batch_size_count") >= 5     # one observation per step
    assert value("npflux_time_to_first_token_seconds", "npflux_time_to_first_token_seconds_count") >= 1


def slowed(model, seconds):
    """The model's forward, slowed down by ``seconds`` per call (so requests pile up)."""
    original = model.forward

    def forward(*a, **kw):
        time.sleep(seconds)
        return original(*a, **kw)

    model.forward = forward


def test_a_full_queue_answers_503_quickly_keeps_serving_and_recovers():
    model, tok = tiny()
    slowed(model, 0.02)
    engine = Engine(model, tok, max_batch=2, max_queue=2)
    body = {"prompt": "The cat", "max_new_tokens": 20, "temperature": 0.0}
    with serve_in_thread(create_app(engine, Limits(max_new_tokens=48))) as url:
        expected = json.loads(post(url, "/v1/generate", body)[2])["text"]
        results, health = [], []
        stop_health = threading.Event()

        def poll_health():
            while not stop_health.is_set():
                t0 = time.monotonic()
                status, _ = get(url, "/health")
                health.append((status, time.monotonic() - t0))
                time.sleep(0.05)

        start = threading.Barrier(12)

        def client(i):
            start.wait(TIMEOUT)  # all at once: more than the 2 rows and 2 places in the queue
            t0 = time.monotonic()
            status, headers, text = post(url, "/v1/generate", body)
            return status, headers, text, time.monotonic() - t0

        poller = threading.Thread(target=poll_health)
        poller.start()
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(client, range(12)))
        stop_health.set()
        poller.join(TIMEOUT)
        ok = [r for r in results if r[0] == 200]
        busy = [r for r in results if r[0] == 503]
        assert len(ok) + len(busy) == 12
        assert 4 <= len(ok) < 12 and busy                         # 2 running + 2 waiting at least; the rest refused
        assert all(json.loads(text)["text"] == expected for _, _, text, _ in ok)  # admitted ones served right
        for _, headers, text, seconds in busy:
            err = json.loads(text)
            assert err["code"] == "overloaded" and "waiting" in err["error"]
            assert int(headers["Retry-After"]) >= 1
            assert seconds < min(s for *_, s in ok)                # refused faster than any was served
        assert health and all(s == 200 for s, _ in health)       # /health answered throughout
        # recovered: once the load is gone, a request is served again
        assert json.loads(post(url, "/v1/generate", body)[2])["text"] == expected
    engine.close()


def test_max_concurrency_answers_503_with_a_json_body_and_retry_after():
    model, tok = tiny()
    slowed(model, 0.02)
    engine = Engine(model, tok)
    with serve_in_thread(create_app(engine, Limits(max_new_tokens=48), max_concurrency=2)) as url:
        body = {"prompt": "The", "max_new_tokens": 15}
        start = threading.Barrier(6)

        def client(_):
            start.wait(TIMEOUT)  # all at once, beyond the limit of 2
            return post(url, "/v1/generate", body)

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(client, range(6)))
        codes = sorted(s for s, _, _ in results)
        assert codes.count(200) >= 2 and 503 in codes
        for status, headers, text in results:
            if status == 503:
                assert json.loads(text)["code"] == "max_concurrency" and headers["Retry-After"] == "1"
        assert get(url, "/health")[0] == 200
    engine.close()


def test_clients_that_hang_up_free_their_rows():
    """SSE, WebSocket and plain clients that leave mid-generation: their rows are freed at the next steps."""
    import contextlib
    import http.client

    model, tok = tiny()
    slowed(model, 0.01)
    engine = Engine(model, tok, max_batch=4)
    long = {"prompt": "The", "max_new_tokens": 1000, "temperature": 1.0}
    with serve_in_thread(create_app(engine, Limits(max_new_tokens=1000))) as url, contextlib.ExitStack() as stack:
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", "/v1/generate/stream", json.dumps(long), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline() == b"event: token\n"
        ws = stack.enter_context(ws_client.connect(url.replace("http://", "ws://") + "/v1/ws/generate",
                                                   open_timeout=TIMEOUT))
        ws.send(json.dumps(long))
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "token"
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        plain.request("POST", "/v1/generate", json.dumps(long), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 5
        while engine.scheduler.load()["running"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.scheduler.load()["running"] == 3
        response.close()
        conn.close()
        ws.close()
        plain.close()
        deadline = time.monotonic() + 10
        while engine.scheduler.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.load() == {"waiting": 0, "running": 0, "max_batch": 4, "max_queue": 64}
        assert get(url, "/health")[0] == 200
    engine.close()


# -- the scheduler without HTTP ------------------------------------------------------------


def test_finished_requests_leave_without_waiting_for_the_others():
    model, tok = tiny()
    sched = Scheduler(model, max_batch=4, max_queue=0)
    short = sched.submit(Sequence(model, tok.encode("The"), 3, temperature=0.0))
    long = sched.submit(Sequence(model, tok.encode("Dogs chase"), 40, temperature=0.0))
    assert len(list(short)) == 3 and short.seq.finish_reason == "length"
    assert long.seq.finish_reason is None      # still running when the short one was done
    assert len(list(long)) == 40
    sched.close()


def test_the_queue_bound_counts_requests_beyond_the_free_rows():
    model, tok = tiny()
    slowed(model, 0.05)
    sched = Scheduler(model, max_batch=1, max_queue=1)
    a = sched.submit(Sequence(model, [1], 5, temperature=0.0))
    b = sched.submit(Sequence(model, [2], 5, temperature=0.0))
    with pytest.raises(Overloaded) as info:
        sched.submit(Sequence(model, [3], 5, temperature=0.0))
    assert info.value.retry_after >= 1
    assert len(list(a)) == 5 and len(list(b)) == 5
    sched.close()


def test_a_model_failure_ends_every_running_request_with_the_error():
    model, tok = tiny()

    def broken(*a, **kw):
        raise FloatingPointError("boom")

    model.forward = broken
    sched = Scheduler(model, max_batch=2, max_queue=2)
    ticket = sched.submit(Sequence(model, [1, 2], 5, temperature=0.0))
    with pytest.raises(RuntimeError, match="FloatingPointError: boom"):
        list(ticket)
    sched.close()


# -- the command line ------------------------------------------------------------------------


def test_serve_flags_reach_the_engine_and_the_app(tmp_path, monkeypatch, capsys):
    import npflux.serve as serve
    from npflux.checkpoint import save_checkpoint
    from npflux.cli import main

    model, tok = tiny()
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"model": model.config.to_dict()},
                           tokenizer=tok.to_dict())
    seen = {}
    monkeypatch.setattr(serve, "create_app", lambda engine, limits, max_concurrency=None: seen.update(
        engine=engine, max_concurrency=max_concurrency))
    monkeypatch.setattr(serve, "run", lambda app, **kw: seen.update(run=kw))
    main(["serve", "--checkpoint", str(ckpt), "--max-batch", "3", "--max-queue", "5", "--max-concurrency", "7"])
    assert seen["engine"].scheduler.load() == {"waiting": 0, "running": 0, "max_batch": 3, "max_queue": 5}
    assert seen["max_concurrency"] == 7 and "max_concurrency" not in seen["run"]
    main(["serve", "--checkpoint", str(ckpt), "--no-batching"])
    assert seen["engine"].scheduler is None and seen["max_concurrency"] is None
    for flag, value in [("--max-batch", "0"), ("--max-queue", "-1"), ("--max-concurrency", "x")]:
        with pytest.raises(SystemExit) as info:
            main(["serve", "--checkpoint", str(ckpt), flag, value])
        assert info.value.code == 2 and flag in capsys.readouterr().err

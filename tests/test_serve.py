"""Serving: streamed generation, stop strings, and the real HTTP server on a loopback port.

The server runs uvicorn in a background thread on a free 127.0.0.1 port with
a tiny randomly initialised model; the tests call it over HTTP with urllib.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from npflux import GPT, GPTConfig
from npflux.checkpoint import save_checkpoint
from npflux.cli import main
from npflux.generate import generate_stream
from npflux.retrieval import DocumentIndex, split_passages
from npflux.tokenizers import CharTokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from npflux.serve import Engine, GenerationStream, Limits, create_app, serve_in_thread  # noqa: E402

DOCS = """The cat sat on the mat.
Dogs chase cats in the garden.
Paris is the capital of France.
The river Nile flows through Egypt.
A triangle has three sides.
"""
VOCAB = DOCS + "?:QAuw"  # the questions' characters too


def tiny_model(block_size=24, seed=0):
    tok = CharTokenizer(VOCAB)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return GPT(cfg, seed=seed), tok


# -- streaming generation in the library ------------------------------------------------


@pytest.mark.parametrize("kw", [dict(temperature=1.0, seed=3), dict(temperature=0.0),
                                dict(temperature=0.7, top_k=5, top_p=0.9, seed=11)])
def test_generate_stream_gives_generates_tokens(kw):
    model, tok = tiny_model(block_size=8)  # 30 new tokens: the window slides past block_size
    idx = np.array([tok.encode("The c")])
    expected = model.generate(idx, 30, **kw)[0, 5:]
    got = np.concatenate(list(generate_stream(model, idx, 30, **kw)))
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64


def test_generate_stream_checks_arguments_before_the_first_token():
    model, tok = tiny_model()
    idx = np.array([tok.encode("The")])
    for kw, match in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=match):
            generate_stream(model, idx, 3, **kw)   # raised on the call, not on the first next()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_stream(model, idx, -1)


def test_concurrent_streams_on_one_model_with_the_lock_equal_each_alone():
    model, tok = tiny_model(block_size=12)
    prompts = [("The cat", 1), ("Dogs", 2), ("Paris is", 3), ("A tri", 4), ("The river", 5), ("cat", 6)]
    alone = [model.generate(np.array([tok.encode(p)]), 25, temperature=1.0, seed=s)[0, len(p):] for p, s in prompts]
    lock, barrier = threading.Lock(), threading.Barrier(len(prompts))

    def run(i):
        p, s = prompts[i]
        stream = generate_stream(model, np.array([tok.encode(p)]), 25, temperature=1.0, seed=s, lock=lock)
        barrier.wait()  # all start together, so their token steps interleave
        return np.concatenate(list(stream))

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, range(len(prompts))))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


class _Chars:
    """A token iterator over the characters of a fixed text (each token one character)."""

    def __init__(self, tok, text):
        self.items = [np.array([i]) for i in tok.encode(text)]

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("text, stop, expected, reason", [
    ("hello world. more", ["."], "hello world", "stop"),
    ("abcabd", ["abd"], "abc", "stop"),            # "ab" is held back, then released as part of "abc"
    ("one\ntwo", ["\n", "tw"], "one", "stop"),
    ("no stop here", ["xyz"], "no stop here", "length"),
    ("ends with a", ["ab"], "ends with a", "length"),  # a held-back prefix is flushed at the end
])
def test_stop_strings_end_the_text_and_pieces_add_up(text, stop, expected, reason):
    tok = CharTokenizer(text + "xyz.")
    stream = GenerationStream(_Chars(tok, text), tok, stop=stop)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == expected
    assert stream.finish_reason == reason
    assert all(pieces)
    for s in stop:  # nothing emitted ever contained a stop string
        assert all(s not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_bpe_streams_stop_at_eos_and_prompts_start_with_bos():
    from npflux.tokenizers import BPETokenizer

    tok = BPETokenizer.train([DOCS] * 3, vocab_size=300)
    ids = tok.encode("Paris is the capital") + [tok.eos_id] + tok.encode(" of France")
    stream = GenerationStream(iter([np.array([i]) for i in ids]), tok)
    assert "".join(stream) == stream.text == "Paris is the capital"
    assert stream.finish_reason == "stop" and "[EOS]" not in stream.text
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    engine = Engine(GPT(cfg, seed=0), tok)
    assert engine.encode("Paris") == [tok.bos_id] + tok.encode("Paris")
    out = engine.generate("Paris", max_new_tokens=12, temperature=1.0, seed=3)
    assert out["tokens"] <= 12 and "[BOS]" not in out["text"] and "[EOS]" not in out["text"]


# -- the HTTP server ----------------------------------------------------------------------


class Client:
    def __init__(self, url):
        self.url = url

    def call(self, path, body=None, raw=None, method=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()

    def json(self, path, body=None, **kw):
        status, _, text = self.call(path, body, **kw)
        return status, json.loads(text)


def parse_sse(text):
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_model()
    index = DocumentIndex.build(split_passages(DOCS), "tfidf")
    engine = Engine(model, tok, index)
    app = create_app(engine, Limits(max_new_tokens=40, max_request_bytes=2000))
    with serve_in_thread(app) as url:
        yield Client(url), engine, model, tok


def test_health_and_openapi(server):
    client, engine, model, _ = server
    status, health = client.json("/health")
    assert status == 200 and health["status"] == "ok"
    assert health["documents"] == 5 and health["model"]["parameters"] == model.num_parameters()
    assert health["limits"]["max_new_tokens"] == 40
    status, spec = client.json("/openapi.json")
    assert status == 200
    assert {"/health", "/v1/generate", "/v1/generate/stream", "/v1/search", "/v1/ask"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["GenerateRequest"]
    assert schema["properties"]["max_new_tokens"]["maximum"] == 40 and schema["required"] == ["prompt"]


def test_generate_is_the_models_sampling_and_reproducible(server):
    client, _, model, tok = server
    body = {"prompt": "The cat", "max_new_tokens": 15, "temperature": 0.9, "top_k": 10, "seed": 7}
    status, out = client.json("/v1/generate", body)
    assert status == 200
    expected = model.generate(np.array([tok.encode("The cat")]), 15, temperature=0.9, top_k=10, seed=7)
    assert out["text"] == tok.decode(expected[0, 7:]) and out["tokens"] == 15
    assert out["finish_reason"] == "length" and out["seed"] == 7
    assert client.json("/v1/generate", body)[1] == out
    status, unseeded = client.json("/v1/generate", {"prompt": "The cat", "max_new_tokens": 5})
    assert status == 200 and isinstance(unseeded["seed"], int)        # the drawn seed reproduces it
    assert client.json("/v1/generate", {"prompt": "The cat", "max_new_tokens": 5, "seed": unseeded["seed"]})[1] == unseeded


def test_stream_sends_the_same_text_token_by_token(server):
    client, *_ = server
    body = {"prompt": "Dogs", "max_new_tokens": 20, "temperature": 1.0, "seed": 5}
    status, headers, text = client.call("/v1/generate/stream", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = parse_sse(text)
    assert [e for e, _ in events] == ["token"] * (len(events) - 1) + ["done"]
    pieces = [d["text"] for e, d in events if e == "token"]
    done = events[-1][1]
    assert "".join(pieces) == done["text"] == client.json("/v1/generate", body)[1]["text"]
    assert [d["index"] for e, d in events if e == "token"] == list(range(len(pieces)))
    assert done["tokens"] == 20 and done["seed"] == 5


def test_stream_arrives_while_generation_runs(server):
    """The first event is read before the last token exists: the stream is not buffered."""
    client, engine, *_ = server
    first_seen = threading.Event()
    original = engine.model.forward
    steps_after_first = []

    def forward(*a, **kw):
        if first_seen.is_set():
            steps_after_first.append(1)
        return original(*a, **kw)

    engine.model.forward = forward
    try:
        req = urllib.request.Request(client.url + "/v1/generate/stream", method="POST",
                                     data=json.dumps({"prompt": "The", "max_new_tokens": 40, "seed": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.readline().startswith(b"event: token")
            first_seen.set()
            rest = r.read().decode()
    finally:
        del engine.model.forward
    assert "event: done" in rest and len(steps_after_first) > 0


def test_a_client_that_hangs_up_stops_its_generation():
    import http.client
    import time

    model, tok = tiny_model()
    forwards, original = [0], model.forward

    def slow_forward(*a, **kw):
        forwards[0] += 1
        time.sleep(0.01)  # 1000 tokens would take 10 s or more
        return original(*a, **kw)

    model.forward = slow_forward
    with serve_in_thread(create_app(Engine(model, tok), Limits(max_new_tokens=1000))) as url:
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        conn.request("POST", "/v1/generate/stream", json.dumps({"prompt": "The", "max_new_tokens": 1000}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline() == b"event: token\n"
        response.close()
        conn.close()  # the socket closes: the client is gone
        deadline, last = time.monotonic() + 5, -1
        while forwards[0] != last and time.monotonic() < deadline:  # until no forward for 0.2 s
            last = forwards[0]
            time.sleep(0.2)
        assert forwards[0] == last < 200
        assert Client(url).json("/health")[0] == 200


def test_search_and_ask(server):
    client, *_ = server
    status, out = client.json("/v1/search", {"query": "What is the capital of France?", "k": 3})
    assert status == 200 and out["method"] == "tfidf"
    assert out["results"][0]["line"] == 3 and out["results"][0]["text"] == "Paris is the capital of France."
    status, out = client.json("/v1/ask", {"question": "What is the capital of France?", "max_new_tokens": 10})
    assert status == 200 and out["sources"][0]["line"] == 3
    assert out["finish_reason"] in ("stop", "length") and out["seed"] >= 0
    assert out["sources"][0]["in_prompt"] == (out["sources"][0]["text"] in out["prompt"])
    assert out["prompt"].endswith("Question: What is the capital of France?\nAnswer:")


@pytest.mark.parametrize("body, status, words", [
    ({"max_new_tokens": 5}, 422, ["prompt", "required"]),
    ({"prompt": "The", "max_new_tokens": 10**9}, 422, ["max_new_tokens", "less than or equal to 40"]),
    ({"prompt": "The", "max_new_tokens": 0}, 422, ["max_new_tokens", "greater than or equal"]),
    ({"prompt": 3}, 422, ["prompt", "string"]),
    ({"prompt": "The", "max_new_tokens": "5"}, 422, ["max_new_tokens", "integer"]),
    ({"prompt": "The", "max_new_tokens": 2.5}, 422, ["max_new_tokens", "integer"]),
    ({"prompt": "The", "temperature": "hot"}, 422, ["temperature", "number"]),
    ({"prompt": "The", "temperature": -1}, 422, ["temperature"]),
    ({"prompt": "The", "top_p": 1.5}, 422, ["top_p"]),
    ({"prompt": "The", "seed": True}, 422, ["seed"]),
    ({"prompt": "The", "colour": "red"}, 422, ["colour", "Extra inputs"]),
    ({"prompt": ""}, 422, ["prompt", "at least 1"]),
    ({"prompt": "The", "stop": ["x" * 40]}, 400, ["stop"]),
    ({"prompt": "Hello, world!"}, 400, ["prompt", "not in the vocabulary", "'!'"]),
    ([1, 2], 422, ["valid dictionary"]),
])
def test_bad_generate_requests_get_4xx_with_a_message(server, body, status, words):
    client, *_ = server
    for path in ("/v1/generate", "/v1/generate/stream"):
        got, out = client.json(path, body)
        assert got == status, out
        assert all(w in out["error"] for w in words), out["error"]


def test_malformed_oversized_and_unknown_requests(server):
    client, *_ = server
    status, out = client.json("/v1/generate", raw=b'{"prompt": "The"')
    assert status == 422 and "not valid JSON" in out["error"]
    status, out = client.json("/v1/generate", raw=json.dumps({"prompt": "The " * 1000}).encode())
    assert status == 413 and "2000 bytes" in out["error"]
    status, out = client.json("/v1/search", {"query": "cat", "k": 100})
    assert status == 422 and "k" in out["error"]
    status, out = client.json("/v1/nothing", {})
    assert status == 404 and out["error"]
    status, out = client.json("/v1/generate", method="GET")
    assert status == 405 and out["error"]


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        Limits(max_new_tokens=0)     # every request would be refused, and one without the field get no tokens
    with pytest.raises(ValueError, match="max_request_bytes"):
        Limits(max_request_bytes=-1)
    assert Limits(max_k=1).max_k == 1

def test_search_without_documents_is_404():
    model, tok = tiny_model()
    with serve_in_thread(create_app(Engine(model, tok))) as url:
        status, out = Client(url).json("/v1/search", {"query": "cat"})
    assert status == 404 and "--docs" in out["error"]


def test_model_embedded_index_over_http_reports_characters_it_left_out():
    model, tok = tiny_model(seed=4)
    index = DocumentIndex.build(split_passages(DOCS), "model", model=model, tokenizer=tok)
    with serve_in_thread(create_app(Engine(model, tok, index))) as url:
        status, out = Client(url).json("/v1/search", {"query": "Paris is the capital of France.!", "k": 2})
    assert status == 200 and out["method"] == "model" and out["dropped_characters"] == ["!"]
    assert out["results"][0]["line"] == 3 and out["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_concurrent_clients_get_their_own_results(server):
    client, engine, model, _ = server
    requests = [{"prompt": p, "max_new_tokens": 30, "temperature": 1.0, "seed": s}
                for p, s in [("The cat", 1), ("Dogs", 2), ("Paris", 3), ("A tri", 4), ("The river", 5),
                             ("cat", 6), ("The cat", 7), ("Nile", 8)]]
    alone = [client.json("/v1/generate", r)[1]["text"] for r in requests]
    # watch the model: requests share forwards (one per step for the whole batch), never two at once
    active, overlap, rows = [0], [0], []
    guard = threading.Lock()
    original = model.forward

    def forward(*a, **kw):
        with guard:
            active[0] += 1
            overlap[0] = max(overlap[0], active[0])
            rows.append(np.shape(a[0])[0])
        try:
            return original(*a, **kw)
        finally:
            with guard:
                active[0] -= 1

    model.forward = forward
    barrier = threading.Barrier(len(requests))

    def run(i):
        barrier.wait()
        path = "/v1/generate/stream" if i % 2 else "/v1/generate"
        status, _, text = client.call(path, requests[i])
        assert status == 200
        return parse_sse(text)[-1][1]["text"] if i % 2 else json.loads(text)["text"]

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(run, range(len(requests))))
    finally:
        del model.forward
    assert together == alone
    assert overlap[0] == 1                                     # the lock: one forward at a time
    assert max(rows) > 1                                       # the requests really ran together
    assert len(rows) < 30 * len(requests)                      # fewer forwards than tokens


# -- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-cli")
    model, tok = tiny_model(block_size=128)
    save_checkpoint(work / "ckpt", model.state_dict(), {"model": model.config.to_dict()}, tokenizer=tok.to_dict())
    docs = work / "docs.txt"
    docs.write_text(DOCS, encoding="utf-8")
    return work, work / "ckpt", docs


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(argv)
    return out.getvalue(), err.getvalue()


def test_cli_index_search_and_ask(checkpoint):
    work, ckpt, docs = checkpoint
    out, _ = run_cli(["index", "--docs", str(docs), "--out", str(work / "idx")])
    assert "indexed 5 passages" in out
    out, _ = run_cli(["search", "--index", str(work / "idx"), "--docs", str(docs), "-k", "2", "capital of France?"])
    assert out.splitlines()[0].startswith("[1] line 3") and "Paris is the capital of France." in out
    out, _ = run_cli(["index", "--docs", str(docs), "--method", "model", "--checkpoint", str(ckpt),
                      "--out", str(work / "midx")])
    out, _ = run_cli(["search", "--index", str(work / "midx"), "--checkpoint", str(ckpt), "--json", "-k", "5",
                      "The river Nile flows through Egypt."])
    assert json.loads(out)[0]["line"] == 4
    out, err = run_cli(["ask", "--checkpoint", str(ckpt), "--docs", str(docs), "--max-new-tokens", "8", "--json",
                        "What is the capital of France?"])
    answer = json.loads(out)
    assert answer["sources"][0]["line"] == 3 and answer["sources"][0]["in_prompt"]
    assert answer["prompt"].startswith("Paris is the capital of France.\nQuestion:")
    out, _ = run_cli(["ask", "--checkpoint", str(ckpt), "--docs", str(docs), "--max-new-tokens", "8", "France?"])
    assert out.startswith("answer: ") and "[1] line 3 (score" in out and "in the prompt" in out


def test_cli_stale_index_is_a_clear_error(checkpoint, capsys):
    work, ckpt, docs = checkpoint
    run_cli(["index", "--docs", str(docs), "--out", str(work / "idx2")])
    changed = work / "changed.txt"
    changed.write_text(DOCS + "More.\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["search", "--index", str(work / "idx2"), "--docs", str(changed), "cat"])
    assert info.value.code == 1 and "documents changed" in capsys.readouterr().err

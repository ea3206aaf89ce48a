"""Serving a GPT: text generation (whole or streamed), document search and retrieval-augmented answers.

``Engine`` is the part that knows nothing of HTTP: one model, its tokenizer
and an optional ``DocumentIndex``, shared by every request. By default a
``Scheduler`` (npflux/scheduler.py) decodes all running requests as ONE batch,
one forward per step for every decoding request (plus one for the prompts of
those that join): a request joins at the next step and leaves when it
ends, and since each row is decoded as if alone (its own positions, masks,
cache row and random generator) a seeded request gives the same text alone or
among many. A bounded queue refuses what it cannot take (503, Retry-After).

``create_app(engine)`` puts it behind a FastAPI app (imported only there,
so ``import npflux`` needs neither FastAPI nor uvicorn)::

    GET  /health               status, model, document count, limits, batch and queue load
    GET  /metrics              Prometheus text format: requests, tokens, queue, batch sizes, TTFT, tokens/s
    POST /v1/generate          {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"}
    POST /v1/generate/stream   the same, answered as server-sent events: "token" events, then "done"
    WS   /v1/ws/generate       the same body as a message; a "token" message per piece, then "done"
    POST /v1/search            {"query", "k"}
    POST /v1/ask               {"question", "k", ...sampling options}: retrieve, prompt, answer, sources
    GET  /openapi.json, /docs  the OpenAPI description (FastAPI's)

Bad requests are answered 4xx with ``{"error": message}``: 422 for a body
that fails validation (missing field, wrong type, max_new_tokens above the
server's limit, unknown field), 400 for a prompt the tokenizer cannot encode,
404 for search without a document store, 413 for a body over the size limit.
A full queue, or more requests in progress than ``max_concurrency``, is 503
with ``{"error", "code"}`` and a Retry-After header. Over the WebSocket the
same failures are messages ``{"type": "error", "code", "error"}``.
"""
import asyncio
import collections
import contextlib
import dataclasses
import json
import random
import threading
import time
from dataclasses import dataclass

import numpy as np

from .generate import Sequence, generate_stream
from .scheduler import Overloaded, Scheduler
from .retrieval import RAG_TEMPLATE, build_rag_prompt, encode_lenient
from .tokenizers import decode_text, encode_prompt

SERVE_MISSING = ('npflux serve needs FastAPI, uvicorn, websockets and prometheus-client, not all of which are '
                 'installed: pip install "npflux[serve]"')


class BadRequest(ValueError):
    """The request cannot be served as asked (answered 400 with this message)."""


@dataclass
class Limits:
    """What one request may ask for."""

    max_new_tokens: int = 256
    max_prompt_chars: int = 4000
    max_request_bytes: int = 64 * 1024
    max_k: int = 20
    max_stop: int = 4
    max_stop_chars: int = 32

    def __post_init__(self):
        # a limit of 0 would make every request invalid (or, by default, generate nothing)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


class GenerationStream:
    """Text pieces as the tokens are sampled; ``text``, ``finish_reason`` ("length" or
    "stop") and ``tokens`` (how many were sampled) are complete once it is exhausted.

    A stop string, or the tokenizer's ``[EOS]`` (a BPE model's end of document),
    ends the text before it; special tokens are not shown. Pieces that could be the
    start of a stop string are held back until they are known not to be, and a
    trailing U+FFFD (an incomplete UTF-8 character of a byte-level tokenizer) until
    the next token.

    The token source is iterated (``for piece in stream``) or, when it is a
    scheduler's ``Ticket`` submitted from an event loop, async-iterated
    (``async for piece in stream.aiter()``). Ending early (a stop string, or the
    reader leaving) closes the source, which frees the request's row in the batch.
    """

    def __init__(self, token_iter, tokenizer, stop=(), seed=None):
        self._tokens, self.tokenizer, self.stop = token_iter, tokenizer, [s for s in stop if s]
        self.seed, self.text, self.finish_reason, self.tokens = seed, "", None, 0
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._ids, self._emitted = [], 0

    def __iter__(self):
        try:
            for tok in self._tokens:
                pieces, done = self._push(tok)
                yield from pieces
                if done:
                    return
            yield from self._end()
        finally:
            self.close()

    async def aiter(self):
        """The same pieces, from an async token source."""
        try:
            async for tok in self._tokens:
                pieces, done = self._push(tok)
                for piece in pieces:
                    yield piece
                if done:
                    return
            for piece in self._end():
                yield piece
        finally:
            self.close()

    def close(self):
        """Stop the token source (a no-op once it has ended)."""
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()

    def _push(self, tok):
        """(pieces to emit, whether the text has ended) after one more token."""
        tok = int(np.asarray(tok).reshape(-1)[0])
        self.tokens += 1
        emitted = self._emitted
        if tok == self.eos_id:
            self.finish_reason = "stop"
            return ([self.text[emitted:]] if len(self.text) > emitted else []), True
        self._ids.append(tok)
        text = decode_text(self.tokenizer, self._ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = text[:cut], "stop"
            return ([text[emitted:cut]] if cut > emitted else []), True
        safe = len(text)
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        hold = max((n for s in self.stop for n in range(1, len(s)) if text[:safe].endswith(s[:n])), default=0)
        safe -= hold
        self.text = text
        if safe > emitted:
            self._emitted = safe
            return [text[emitted:safe]], False
        return [], False

    def _end(self):
        """The pieces held back, once the tokens ran out (max_new_tokens)."""
        self.text = decode_text(self.tokenizer, self._ids) if self._ids else ""
        self.finish_reason = "length"
        return [self.text[self._emitted:]] if len(self.text) > self._emitted else []

    def read(self):
        """Run to the end; the whole text."""
        for _ in self:
            pass
        return self.text

    async def aread(self):
        async for _ in self.aiter():
            pass
        return self.text


async def _in_threads(tokens):
    """An async iterator over a blocking one, each ``next`` in a worker thread (the unbatched path)."""
    import anyio

    done = object()
    while (tok := await anyio.to_thread.run_sync(next, tokens, done)) is not done:
        yield tok


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app), via ``prometheus-client``.

    requests (by endpoint and outcome), tokens generated, requests waiting and
    running, the batch size of each step (a histogram), time to first token (a
    histogram) and tokens/s over the last few seconds.
    """

    WINDOW_S = 5.0  # tokens/s is measured over this many seconds

    def __init__(self):
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ImportError(SERVE_MISSING) from exc
        self.prom, self.registry = prom, prom.CollectorRegistry()
        kw = dict(registry=self.registry)
        self.requests = prom.Counter("npflux_requests", "requests answered, by endpoint and outcome",
                                     ["endpoint", "outcome"], **kw)
        self.tokens = prom.Counter("npflux_tokens_generated", "tokens sampled for requests", **kw)
        self.waiting = prom.Gauge("npflux_queue_length", "requests waiting for a row in the batch", **kw)
        self.running = prom.Gauge("npflux_running_requests", "requests in the running batch", **kw)
        self.batch_size = prom.Histogram("npflux_batch_size", "rows decoded together, per step",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128), **kw)
        self.ttft = prom.Histogram("npflux_time_to_first_token_seconds", "from joining the queue to the first token",
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), **kw)
        self.rate = prom.Gauge("npflux_tokens_per_second", f"tokens sampled per second over the last {self.WINDOW_S:g} s",
                               **kw)
        self._recent = collections.deque()  # (time, tokens) of recent steps
        self._recent_tokens = 0             # their sum, kept as they come and go (not re-summed per step)
        self._lock = threading.Lock()

    def on_step(self, batch_size, tokens, seconds):
        now = time.monotonic()
        self.batch_size.observe(batch_size)
        self.tokens.inc(tokens)
        with self._lock:
            self._recent.append((now, tokens))
            self._recent_tokens += tokens
            while self._recent and self._recent[0][0] < now - self.WINDOW_S:
                self._recent_tokens -= self._recent.popleft()[1]
            self.rate.set(self._recent_tokens / self.WINDOW_S)

    def on_first_token(self, seconds):
        self.ttft.observe(seconds)

    def set_queue(self, waiting, running):
        self.waiting.set(waiting)
        self.running.set(running)

    def count(self, endpoint, outcome):
        self.requests.labels(endpoint, outcome).inc()

    def exposition(self):
        """(body, content type) of the Prometheus text format."""
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST


class Engine:
    """A model, its tokenizer and an optional document index, shared by concurrent requests.

    With ``batching`` (the default) a ``Scheduler`` thread decodes every running
    request in one batch, step by step (continuous batching): at most
    ``max_batch`` rows, and ``max_queue`` requests waiting beyond them, past
    which a request is refused (``Overloaded``). Without it each request runs
    its own stream, its forwards taking turns under the lock (the way npflux
    served before; kept to measure the difference). ``metrics`` (a
    ``Metrics``) counts what the scheduler does.
    """

    def __init__(self, model, tokenizer, index=None, template=RAG_TEMPLATE, batching=True, max_batch=16,
                 max_queue=64, metrics=None):
        self.model, self.tokenizer, self.index, self.template = model, tokenizer, index, template
        self.lock = threading.Lock()
        self.metrics = metrics
        self.scheduler = Scheduler(model, max_batch, max_queue, lock=self.lock, metrics=metrics) if batching else None
        model.eval()
        if index is not None and index.method == "model":
            index.bind_model(model, tokenizer, lock=self.lock)

    def encode(self, prompt):
        """Token ids of a prompt ([BOS] first where the tokenizer has one); BadRequest names
        the characters the tokenizer does not know."""
        try:
            return encode_prompt(self.tokenizer, prompt)
        except ValueError as exc:
            raise BadRequest(f"prompt: {exc}") from None

    def stream(self, prompt=None, ids=None, max_new_tokens=64, temperature=0.8, top_k=None, top_p=None,
               seed=None, stop=(), loop=None):
        """A GenerationStream for a prompt (or its token ids); a random seed is drawn
        (and reported) when none is given, so every result can be reproduced.

        With batching the request joins the scheduler's queue now (``Overloaded``
        if it is full); ``loop``: the event loop that will ``aiter()`` it.
        """
        ids = self.encode(prompt) if ids is None else ids
        seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        if self.scheduler is None:
            tokens = generate_stream(self.model, np.asarray([ids], dtype=np.int64), max_new_tokens,
                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, lock=self.lock)
            if loop is not None:
                tokens = _in_threads(tokens)
        else:
            eos = getattr(self.tokenizer, "eos_id", None)
            seq = Sequence(self.model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id=eos)
            tokens = self.scheduler.submit(seq, loop)
        return GenerationStream(tokens, self.tokenizer, stop=stop, seed=seed)

    def attach_metrics(self, metrics):
        """Count into ``metrics`` from now on (the app's); returns it."""
        self.metrics = metrics
        if self.scheduler is not None:
            self.scheduler.metrics = metrics
        return metrics

    def close(self):
        if self.scheduler is not None:
            self.scheduler.close()

    def generate(self, prompt, **kw):
        s = self.stream(prompt, **kw)
        s.read()
        return {"text": s.text, "finish_reason": s.finish_reason, "tokens": s.tokens, "seed": s.seed}

    def search(self, query, k=5):
        """(results, characters of the query the model's tokenizer left out)."""
        if self.index is None:
            raise LookupError("no document store: start the server with --docs FILE or --index DIR")
        dropped = encode_lenient(self.tokenizer, query)[1] if self.index.method == "model" else []
        return self.index.search(query, k), dropped

    def fits(self, text):
        """Whether text ([BOS] included) encodes to at most block_size tokens (the model sees all of it)."""
        bos = getattr(self.tokenizer, "bos_id", None) is not None
        return bos + len(encode_lenient(self.tokenizer, text)[0]) <= self.model.config.block_size

    def ask(self, question, k=3, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=None,
            stop=("\n",)):
        """Retrieve the top-k passages, put those that fit in the prompt, generate the answer."""
        results, _ = self.search(question, k)
        prompt, used = build_rag_prompt(question, results, self.template, self.fits)
        ids, dropped = encode_lenient(self.tokenizer, prompt)
        bos = getattr(self.tokenizer, "bos_id", None)
        ids = ids if bos is None else [bos] + ids
        if not ids:
            raise BadRequest("question: no character of the prompt is in the model's vocabulary")
        s = self.stream(ids=ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop=stop)
        s.read()
        sources = [dict(r.to_dict(), in_prompt=i < used) for i, r in enumerate(results)]
        return {"answer": s.text.strip(), "finish_reason": s.finish_reason, "seed": s.seed, "prompt": prompt,
                "dropped_characters": dropped, "sources": sources}

    def describe(self):
        c = self.model.config
        return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
                "vocab_size": c.vocab_size, "parameters": self.model.num_parameters(),
                "tokenizer": getattr(self.tokenizer, "type", type(self.tokenizer).__name__)}


# ---------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------


def _sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _validation_message(errors, body_loc=False):
    """One line naming each field that failed validation (pydantic's errors); ``body_loc``: the
    locations start with "body" (FastAPI's request errors), which is left out."""
    def where(e):
        loc = list(e.get("loc", ()))[1 if body_loc else 0:]
        return ".".join(str(p) for p in loc) or "body"

    return "; ".join("request body is not valid JSON" if e.get("type") == "json_invalid" else
                     f"{where(e)}: {e.get('msg', '')}" for e in errors)


class _Timer:
    """A request's timings, for its final message: time to first token, total, tokens/s."""

    def __init__(self):
        self.start, self.first = time.perf_counter(), None

    def token(self):
        if self.first is None:
            self.first = time.perf_counter()

    def done(self, tokens):
        total = time.perf_counter() - self.start
        first = None if self.first is None else round((self.first - self.start) * 1000, 3)
        return {"time_to_first_token_ms": first, "total_ms": round(total * 1000, 3),
                "tokens_per_s": round(tokens / total, 3) if total > 0 else None}


class _ConcurrencyLimit:
    """ASGI middleware: beyond ``limit`` HTTP requests in progress, answer 503 with a JSON body and
    Retry-After (``npflux serve --max-concurrency``); /health and /metrics are always answered."""

    EXEMPT = ("/health", "/metrics")

    def __init__(self, app, limit):
        if limit < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {limit}")
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.EXEMPT:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:  # one event loop: no lock needed between the check and the count
            from starlette.responses import JSONResponse

            busy = JSONResponse({"error": f"the server is at its limit of {self.limit} requests in progress",
                                 "code": "max_concurrency"}, status_code=503, headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _BodyLimit:
    """ASGI middleware: answer 413 when a request body (declared or streamed) exceeds max_bytes."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        too_big = JSONResponse({"error": f"request body over the limit of {self.max_bytes} bytes"}, status_code=413)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:  # read it all here (chunked bodies declare no length), then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response waits for

        await self.app(scope, replay, send)


def create_app(engine: Engine, limits: Limits = None, max_concurrency: int = None):
    """The FastAPI app serving ``engine`` within ``limits``; more than ``max_concurrency`` requests
    in progress at once (health and metrics aside) are answered 503."""
    try:
        from typing import List, Optional

        from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from pydantic import BaseModel, ConfigDict, Field, ValidationError
        from starlette.exceptions import HTTPException
    except ImportError as exc:
        raise ImportError(SERVE_MISSING) from exc

    limits = limits or Limits()
    L = limits
    Stop = Optional[List[str]]

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        max_new_tokens: int = Field(min(64, L.max_new_tokens), ge=1, le=L.max_new_tokens,
                                    description=f"tokens to generate (at most {L.max_new_tokens})")
        temperature: float = Field(0.8, ge=0.0, le=100.0, description="0 is greedy")
        top_k: Optional[int] = Field(None, ge=1)
        top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
        seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="same seed, same text; drawn when absent")
        stop: Stop = Field(None, max_length=L.max_stop, description="strings that end the text (not included)")

        def sampling(self):
            if self.stop and any(not 1 <= len(s) <= L.max_stop_chars for s in self.stop):
                raise BadRequest(f"stop: each stop string needs 1 to {L.max_stop_chars} characters")
            return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                        top_p=self.top_p, seed=self.seed, stop=tuple(self.stop or ()))

    class GenerateRequest(Sampling):
        prompt: str = Field(..., min_length=1, max_length=L.max_prompt_chars)

    class GenerateResponse(BaseModel):
        text: str
        finish_reason: str
        tokens: int
        seed: int

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        query: str = Field(..., min_length=1, max_length=L.max_prompt_chars)
        k: int = Field(5, ge=1, le=L.max_k)

    class Hit(BaseModel):
        rank: int
        score: float
        passage_id: int
        text: str
        line: int

    class SearchResponse(BaseModel):
        method: str
        results: List[Hit]
        dropped_characters: List[str]

    class AskRequest(Sampling):
        question: str = Field(..., min_length=1, max_length=L.max_prompt_chars)
        k: int = Field(3, ge=1, le=L.max_k)
        temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 (greedy) by default")
        stop: Stop = Field(["\n"], max_length=L.max_stop)

    class Source(Hit):
        in_prompt: bool

    class AskResponse(BaseModel):
        answer: str
        finish_reason: str
        seed: int
        prompt: str
        dropped_characters: List[str]
        sources: List[Source]

    metrics = engine.attach_metrics(Metrics())
    app = FastAPI(title="npflux", version=_version(),
                  description="A GPT written from scratch on NumPy: generation, streaming, document search, RAG.")
    app.add_middleware(_BodyLimit, max_bytes=L.max_request_bytes)
    if max_concurrency is not None:
        app.add_middleware(_ConcurrencyLimit, limit=max_concurrency)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"error": _validation_message(exc.errors(), body_loc=True), "detail": detail},
                            status_code=422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return JSONResponse({"error": str(exc), "code": "overloaded"}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(LookupError)
    async def not_found(request: Request, exc: LookupError):
        return JSONResponse({"error": str(exc.args[0] if exc.args else exc)}, status_code=404)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/health")
    async def health():  # async: answered on the event loop, never queued behind generation
        index = engine.index
        return {"status": "ok", "model": engine.describe(), "documents": len(index) if index else 0,
                "index_method": index.method if index else None, "limits": dataclasses.asdict(L),
                "batching": engine.scheduler.load() if engine.scheduler is not None else None}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics_():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest, request: Request):
        stream = _submit(req, "generate")
        watcher = asyncio.ensure_future(_close_on_disconnect(request, stream))
        try:
            await stream.aread()
        finally:
            gone = watcher.done() and not watcher.cancelled()
            watcher.cancel()
        if gone:
            metrics.count("generate", "cancelled")
            return Response(status_code=499)  # nobody reads it: the client has gone
        metrics.count("generate", "ok")
        return {"text": stream.text, "finish_reason": stream.finish_reason, "tokens": stream.tokens,
                "seed": stream.seed}

    @app.post("/v1/generate/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": 'server-sent events: "token" {"text", "index"} per piece, '
                                              'then "done" {"text", "finish_reason", "tokens", "seed", "timings"}'}})
    async def generate_stream_(req: GenerateRequest):
        stream = _submit(req, "generate_stream")  # bad input and a full queue fail here, before the 200
        timer = _Timer()

        async def events():
            try:
                i = 0
                async for piece in stream.aiter():
                    timer.token()
                    yield _sse("token", {"text": piece, "index": i})
                    i += 1
                yield _sse("done", {"text": stream.text, "finish_reason": stream.finish_reason,
                                    "tokens": stream.tokens, "seed": stream.seed, "timings": timer.done(stream.tokens)})
                metrics.count("generate_stream", "ok")
            except Exception as exc:  # the status line is gone: report in the stream
                metrics.count("generate_stream", "error")
                yield _sse("error", {"error": f"{type(exc).__name__}: {exc}", "code": "internal"})
            finally:
                stream.close()  # a client that hung up ends here too: its row is freed at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.websocket("/v1/ws/generate")
    async def ws_generate(ws: WebSocket):
        """Requests in (one JSON object each, the body of /v1/generate), per request one message per
        text piece ({"type": "token", "text", "index"}), then {"type": "done", ...with "timings"};
        a request that cannot be served gets {"type": "error", "code", "error"} and the socket stays open."""
        await ws.accept()
        while True:
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            # a text frame, or a binary one holding UTF-8 JSON
            raw = message.get("text") or (message.get("bytes") or b"").decode("utf-8", "replace")
            error = None
            try:
                if len(raw.encode()) > L.max_request_bytes:
                    raise BadRequest(f"request over the limit of {L.max_request_bytes} bytes")
                req = GenerateRequest.model_validate_json(raw)
                stream = _submit(req, "ws")
            except ValidationError as exc:
                error = {"code": "invalid_request", "error": _validation_message(exc.errors())}
            except BadRequest as exc:
                error = {"code": "bad_request", "error": str(exc)}
            except Overloaded as exc:
                error = {"code": "overloaded", "error": str(exc), "retry_after": exc.retry_after}
            if error is not None:
                if not await _ws_send(ws, {"type": "error", **error}):
                    return
                continue
            if not await _ws_stream(ws, stream):
                return

    async def _ws_stream(ws, stream):
        """Send one request's pieces and its end; False when the client has gone (its row is then freed)."""
        timer = _Timer()
        try:
            i = 0
            async for piece in stream.aiter():
                timer.token()
                if not await _ws_send(ws, {"type": "token", "text": piece, "index": i}):
                    metrics.count("ws", "cancelled")
                    return False
                i += 1
        except Exception as exc:
            metrics.count("ws", "error")
            return await _ws_send(ws, {"type": "error", "code": "internal", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            stream.close()
        metrics.count("ws", "ok")
        return await _ws_send(ws, {"type": "done", "text": stream.text, "finish_reason": stream.finish_reason,
                                   "tokens": stream.tokens, "seed": stream.seed, "timings": timer.done(stream.tokens)})

    async def _ws_send(ws, message):
        try:
            await ws.send_json(message)
            return True
        except Exception:  # the client closed the socket (or the connection broke)
            return False

    async def _close_on_disconnect(request, stream):
        """Wait for the client to hang up (the body is read, so the next message is the disconnect),
        then free the request's row at the scheduler's next step."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.close()

    def _submit(req, endpoint):
        """The request's GenerationStream, queued with the scheduler (BadRequest, Overloaded)."""
        try:
            return engine.stream(req.prompt, loop=asyncio.get_running_loop(), **req.sampling())
        except Overloaded:
            metrics.count(endpoint, "rejected")
            raise

    @app.post("/v1/search", response_model=SearchResponse)
    def search(req: SearchRequest):
        results, dropped = engine.search(req.query, req.k)
        return {"method": engine.index.method, "results": [r.to_dict() for r in results],
                "dropped_characters": dropped}

    @app.post("/v1/ask", response_model=AskResponse)
    def ask(req: AskRequest):
        return engine.ask(req.question, k=req.k, **req.sampling())

    return app


def _version():
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------


def _uvicorn():
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(SERVE_MISSING) from exc
    return uvicorn


def run(app, host="127.0.0.1", port=8000, log_level="info"):
    """Serve ``app`` until interrupted."""
    _uvicorn().run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serve_in_thread(app, host="127.0.0.1", port=0, log_level="warning", timeout=20.0, **uvicorn_kw):
    """Run ``app`` with uvicorn in a background thread; yields its base URL; stops it on exit.

    Port 0 takes a free port: the socket is bound here, so the URL is known
    before the server starts and no other process can take the port between.
    """
    import socket
    import time

    uvicorn = _uvicorn()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, **uvicorn_kw))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="npflux-serve")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()

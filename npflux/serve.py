"""Serving a GPT: text generation (whole or streamed), document search and retrieval-augmented answers.

``Engine`` is the part that knows nothing of HTTP: one model, its tokenizer
and an optional ``DocumentIndex``, shared by every request. Each request gets
its own key/value caches and its own random generator (``generate_stream``),
so a seeded request gives the same text alone or among many; the model's
modules keep per-forward state for backward on themselves, so ONE lock is
held around each forward (one token step of one request), which lets many
streams advance in turn without ever running two forwards on the model at
once.

``create_app(engine)`` puts it behind a FastAPI app (imported only there,
so ``import npflux`` needs neither FastAPI nor uvicorn)::

    GET  /health               status, model, document count, limits
    POST /v1/generate          {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"}
    POST /v1/generate/stream   the same, answered as server-sent events: "token" events, then "done"
    POST /v1/search            {"query", "k"}
    POST /v1/ask               {"question", "k", ...sampling options}: retrieve, prompt, answer, sources
    GET  /openapi.json, /docs  the OpenAPI description (FastAPI's)

Bad requests are answered 4xx with ``{"error": message}``: 422 for a body
that fails validation (missing field, wrong type, max_new_tokens above the
server's limit, unknown field), 400 for a prompt the tokenizer cannot encode,
404 for search without a document store, 413 for a body over the size limit.
"""
import contextlib
import dataclasses
import json
import random
import threading
from dataclasses import dataclass

import numpy as np

from .generate import generate_stream
from .retrieval import RAG_TEMPLATE, build_rag_prompt, encode_lenient
from .tokenizers import decode_text, encode_prompt

SERVE_MISSING = ('npflux serve needs FastAPI and uvicorn, which are not installed: '
                 'pip install "npflux[serve]"')


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
    """

    def __init__(self, token_iter, tokenizer, stop=(), seed=None):
        self._tokens, self.tokenizer, self.stop = token_iter, tokenizer, [s for s in stop if s]
        self.seed, self.text, self.finish_reason, self.tokens = seed, "", None, 0
        self.eos_id = getattr(tokenizer, "eos_id", None)

    def __iter__(self):
        ids, emitted = [], 0
        for tok in self._tokens:
            self.tokens += 1
            if int(tok[0]) == self.eos_id:
                self.finish_reason = "stop"
                if len(self.text) > emitted:
                    yield self.text[emitted:]
                return
            ids.append(int(tok[0]))
            text = decode_text(self.tokenizer, ids)
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = text[:cut], "stop"
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text)
            while safe > emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            hold = max((n for s in self.stop for n in range(1, len(s)) if text[:safe].endswith(s[:n])), default=0)
            safe -= hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            self.text = text
        self.text, self.finish_reason = decode_text(self.tokenizer, ids) if ids else "", "length"
        if len(self.text) > emitted:
            yield self.text[emitted:]

    def read(self):
        """Run to the end; the whole text."""
        for _ in self:
            pass
        return self.text


class Engine:
    """A model, its tokenizer and an optional document index, shared by concurrent requests."""

    def __init__(self, model, tokenizer, index=None, template=RAG_TEMPLATE):
        self.model, self.tokenizer, self.index, self.template = model, tokenizer, index, template
        self.lock = threading.Lock()
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
               seed=None, stop=()):
        """A GenerationStream for a prompt (or its token ids); a random seed is drawn
        (and reported) when none is given, so every result can be reproduced."""
        ids = self.encode(prompt) if ids is None else ids
        seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        tokens = generate_stream(self.model, np.asarray([ids], dtype=np.int64), max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, lock=self.lock)
        return GenerationStream(tokens, self.tokenizer, stop=stop, seed=seed)

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


def create_app(engine: Engine, limits: Limits = None):
    """The FastAPI app serving ``engine`` within ``limits``."""
    try:
        from typing import List, Optional

        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from pydantic import BaseModel, ConfigDict, Field
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

    app = FastAPI(title="npflux", version=_version(),
                  description="A GPT written from scratch on NumPy: generation, streaming, document search, RAG.")
    app.add_middleware(_BodyLimit, max_bytes=L.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        message = "; ".join("request body is not valid JSON" if d["type"] == "json_invalid" else
                            f"{'.'.join(str(p) for p in d['loc'][1:]) or 'body'}: {d['msg']}" for d in detail)
        return JSONResponse({"error": message, "detail": detail}, status_code=422)

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
    def health():
        index = engine.index
        return {"status": "ok", "model": engine.describe(), "documents": len(index) if index else 0,
                "index_method": index.method if index else None, "limits": dataclasses.asdict(L)}

    @app.post("/v1/generate", response_model=GenerateResponse)
    def generate(req: GenerateRequest):
        return engine.generate(req.prompt, **req.sampling())

    @app.post("/v1/generate/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": 'server-sent events: "token" {"text", "index"} per piece, '
                                              'then "done" {"text", "finish_reason", "tokens", "seed"}'}})
    def generate_stream_(req: GenerateRequest):
        stream = engine.stream(req.prompt, **req.sampling())  # bad input fails here, before the 200

        def events():
            try:
                for i, piece in enumerate(stream):
                    yield _sse("token", {"text": piece, "index": i})
                yield _sse("done", {"text": stream.text, "finish_reason": stream.finish_reason,
                                    "tokens": stream.tokens, "seed": stream.seed})
            except Exception as exc:  # the status line is gone: report in the stream
                yield _sse("error", {"error": f"{type(exc).__name__}: {exc}"})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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


def run(app, host="127.0.0.1", port=8000, log_level="info", max_concurrency=None):
    """Serve ``app`` until interrupted (uvicorn answers 503 above ``max_concurrency`` connections)."""
    _uvicorn().run(app, host=host, port=port, log_level=log_level, limit_concurrency=max_concurrency)


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

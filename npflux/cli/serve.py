"""``npflux serve``: the HTTP API (FastAPI + uvicorn): generate, stream, search, ask, health.

    npflux serve --checkpoint CKPT [--docs FILE | --index DIR] [--host 127.0.0.1] [--port 8000]
                 [--max-batch 16] [--max-queue 64] [--max-concurrency N] [--no-batching]
"""
import sys

from .retrieval import add_docs_flags, index_for, model_if_given, note_dropped


def _serve(args):
    try:
        from ..serve import Engine, Limits, create_app, run

        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401  (/metrics)
        import uvicorn  # noqa: F401
        import websockets  # noqa: F401  (uvicorn's WebSocket protocol, /v1/ws/generate)
    except ImportError:
        from ..serve import SERVE_MISSING

        sys.exit(SERVE_MISSING)
    model, tokenizer = model_if_given(args)
    engine = Engine(model, tokenizer, template=args.template, batching=args.batching, max_batch=args.max_batch,
                    max_queue=args.max_queue)
    engine.index = index_for(args, model, tokenizer, lock=engine.lock)
    note_dropped(engine.index)
    limits = Limits(max_new_tokens=args.max_new_tokens_limit, max_request_bytes=args.max_request_bytes)
    app = create_app(engine, limits, max_concurrency=args.max_concurrency)
    docs = f", {len(engine.index)} passages ({engine.index.method})" if engine.index else ""
    print(f"npflux serve: {args.checkpoint}{docs} on http://{args.host}:{args.port}  "
          f"(OpenAPI: /docs and /openapi.json)", file=sys.stderr)
    run(app, host=args.host, port=args.port, log_level=args.log_level)


def _positive(text):
    return _integer(text, 1)


def _nonnegative(text):
    return _integer(text, 0)


def _integer(text, least):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def add_parsers(sub):
    from ..retrieval import RAG_TEMPLATE

    p = sub.add_parser("serve", help="an HTTP API (FastAPI + uvicorn): generate, stream, search, ask, health")
    p.add_argument("--checkpoint", required=True, help="the model to serve")
    add_docs_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-new-tokens-limit", type=int, default=256, help="the most tokens one request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=64 * 1024, help="larger request bodies are answered 413")
    p.add_argument("--max-concurrency", type=_positive, help="requests in progress beyond this are answered 503 with "
                   "Retry-After (default: no limit; /health and /metrics are always answered)")
    p.add_argument("--max-batch", type=_positive, default=16, help="requests decoded together, one forward per step "
                   "(default 16)")
    p.add_argument("--max-queue", type=_nonnegative, default=64, help="requests that may wait for a place in the "
                   "batch; beyond, 503 with Retry-After (default 64)")
    p.add_argument("--no-batching", dest="batching", action="store_false", help="no continuous batching: each "
                   "request's forwards take turns under one lock (the old way, for comparison)")
    p.add_argument("--template", default=RAG_TEMPLATE, help="the /v1/ask prompt, with {context} and {question}")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=_serve)

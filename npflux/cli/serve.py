"""``npflux serve``: the HTTP API (FastAPI + uvicorn): generate, stream, search, ask, health.

    npflux serve --checkpoint CKPT [--docs FILE | --index DIR] [--host 127.0.0.1] [--port 8000]
"""
import sys

from .retrieval import add_docs_flags, index_for, model_if_given, note_dropped


def _serve(args):
    try:
        from ..serve import Engine, Limits, create_app, run

        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        from ..serve import SERVE_MISSING

        sys.exit(SERVE_MISSING)
    model, tokenizer = model_if_given(args)
    engine = Engine(model, tokenizer, template=args.template)
    engine.index = index_for(args, model, tokenizer, lock=engine.lock)
    note_dropped(engine.index)
    limits = Limits(max_new_tokens=args.max_new_tokens_limit, max_request_bytes=args.max_request_bytes)
    app = create_app(engine, limits)
    docs = f", {len(engine.index)} passages ({engine.index.method})" if engine.index else ""
    print(f"npflux serve: {args.checkpoint}{docs} on http://{args.host}:{args.port}  "
          f"(OpenAPI: /docs and /openapi.json)", file=sys.stderr)
    run(app, host=args.host, port=args.port, log_level=args.log_level, max_concurrency=args.max_concurrency)


def add_parsers(sub):
    from ..retrieval import RAG_TEMPLATE

    p = sub.add_parser("serve", help="an HTTP API (FastAPI + uvicorn): generate, stream, search, ask, health")
    p.add_argument("--checkpoint", required=True, help="the model to serve")
    add_docs_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-new-tokens-limit", type=int, default=256, help="the most tokens one request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=64 * 1024, help="larger request bodies are answered 413")
    p.add_argument("--max-concurrency", type=int, help="connections above this are answered 503 (default: no limit)")
    p.add_argument("--template", default=RAG_TEMPLATE, help="the /v1/ask prompt, with {context} and {question}")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=_serve)

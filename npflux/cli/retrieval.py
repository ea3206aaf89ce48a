"""``npflux index | search | ask``: the document store and retrieval-augmented answers.

    npflux index --docs FILE --out DIR [--method tfidf|model --checkpoint CKPT]
    npflux search (--docs FILE | --index DIR) [--method ...] [--checkpoint CKPT] [-k 5] "query"
    npflux ask --checkpoint CKPT (--docs FILE | --index DIR) [-k 3] "What is the capital of France?"
    npflux ask --reader CKPT (--docs FILE | --index DIR) [-k 3] [--threshold 0] "What is the capital of France?"
"""
import json
import sys

from .common import add_backend_flag, add_sampling_flags, finite_float, load_for_text


def model_if_given(args):
    """(model, tokenizer) when --checkpoint was given, else (None, None)."""
    return load_for_text(args) if getattr(args, "checkpoint", None) else (None, None)


def index_for(args, model, tokenizer, lock=None):
    """The document index the arguments ask for (None when neither --docs nor --index)."""
    from ..retrieval import DocumentIndex

    if getattr(args, "index", None):
        index = DocumentIndex.load(args.index, docs=args.docs)
        if index.method == "model":
            if model is None:
                sys.exit(f"{args.index} holds model embeddings: give the --checkpoint that built it")
            index.bind_model(model, tokenizer, lock=lock)
        return index
    if not args.docs:
        return None
    if args.method == "model" and model is None:
        sys.exit("--method model embeds with a GPT: give --checkpoint")
    return DocumentIndex.from_file(args.docs, args.method, split=args.split, max_chars=args.max_chars,
                                   model=model, tokenizer=tokenizer, center=args.center, progress=True, lock=lock)


def note_dropped(index):
    dropped = index.encoder_info.get("dropped_characters") if index is not None else None
    if dropped:
        print(f"note: the model's vocabulary lacks {', '.join(map(repr, dropped))}; "
              "those characters were left out of the embedded passages", file=sys.stderr)


def _index_cmd(args):
    model, tokenizer = model_if_given(args)
    if args.method == "model" and model is None:
        sys.exit("--method model embeds with a GPT: give --checkpoint")
    index = index_for(args, model, tokenizer)
    note_dropped(index)
    path = index.save(args.out)
    print(f"indexed {len(index)} passages of {args.docs} ({index.method}) -> {path}")


def _search(args):
    model, tokenizer = model_if_given(args)
    index = index_for(args, model, tokenizer)
    if index is None:
        sys.exit("give --docs FILE or --index DIR")
    results = index.search(args.query, args.k)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    if not results:
        print("no passage matches the query")
    for r in results:
        print(f"[{r.rank}] line {r.line}  score {r.score:.3f}  {r.text}")


def _ask_reader(args):
    """npflux ask --reader: the extractive reader's best span over the retrieved passages, quoted with its source."""
    from ..checkpoint import load_reader
    from ..retrieval import answer_with_reader

    reader, vocab = load_reader(args.reader, backend=args.backend)
    index = index_for(args, None, None)
    if index is None:
        sys.exit("give --docs FILE or --index DIR")
    out = answer_with_reader(index, reader, vocab, args.question, k=args.k, threshold=args.threshold)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if out["answer"] is None:
        best = "" if out["score"] is None else f" (best span scored {out['score']:.2f}, threshold {args.threshold:g})"
        print(f"answer: no answer found{best}")
    else:
        src = out["source"]
        print(f"answer: {out['answer']}")
        print(f"source: line {src['line']} (retrieved rank {src['rank']}, reader score {src['score']:.2f}): "
              f"\"{src['text']}\"")
    if not out["candidates"]:
        print("  (no passage matches the question)")


def _ask(args):
    from ..serve import Engine

    if args.reader:
        return _ask_reader(args)
    if not args.checkpoint:
        sys.exit("npflux ask: give --checkpoint (a GPT generates the answer) or --reader (an extractive reader "
                 "points at it)")
    model, tokenizer = model_if_given(args)
    engine = Engine(model, tokenizer, template=args.template)
    engine.index = index_for(args, model, tokenizer, lock=engine.lock)
    if engine.index is None:
        sys.exit("give --docs FILE or --index DIR")
    out = engine.ask(args.question, k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=() if args.no_stop else ("\n",))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if out["dropped_characters"]:
        print(f"note: the model's vocabulary lacks {', '.join(map(repr, out['dropped_characters']))}; "
              "left out of the prompt", file=sys.stderr)
    if args.show_prompt:
        print(f"prompt:\n{out['prompt']}\n")
    print(f"answer: {out['answer']}")
    print("sources:")
    if not out["sources"]:
        print("  (no passage matches the question)")
    block = model.config.block_size
    for s in out["sources"]:
        where = "in the prompt" if s["in_prompt"] else f"retrieved, did not fit the model's {block}-token context"
        print(f"  [{s['rank']}] line {s['line']} (score {s['score']:.3f}, {where}): {s['text']}")


def add_docs_flags(p, with_index=True):
    p.add_argument("--docs", required=not with_index,
                   help="a text file: one passage per line, or per paragraph where blank lines separate them")
    if with_index:
        p.add_argument("--index", help="an index directory written by `npflux index` (checked against --docs when both are given)")
    p.add_argument("--method", choices=["tfidf", "model"], default="tfidf",
                   help="how --docs is embedded (default tfidf; 'model': the checkpoint's mean final hidden state)")
    p.add_argument("--split", choices=["auto", "line", "paragraph"], default="auto",
                   help="passages: lines, paragraphs, or auto (paragraphs when blank lines separate the text)")
    p.add_argument("--max-chars", type=int, default=1000, help="longer passages are cut at whitespace (default 1000)")
    p.add_argument("--no-center", dest="center", action="store_false",
                   help="model embeddings: do not subtract the passages' mean vector")
    add_backend_flag(p)


def add_parsers(sub):
    from ..retrieval import RAG_TEMPLATE

    p = sub.add_parser("index", help="split a text file into passages, embed them, and save the index")
    add_docs_flags(p, with_index=False)
    p.add_argument("--checkpoint", help="the GPT whose hidden states embed the passages (--method model)")
    p.add_argument("--out", required=True, help="index directory to write")
    p.set_defaults(func=_index_cmd)

    p = sub.add_parser("search", help="the passages most similar to a query (cosine similarity)")
    add_docs_flags(p)
    p.add_argument("--checkpoint", help="the GPT for --method model (or the one a model index was built with)")
    p.add_argument("-k", type=int, default=5, help="how many passages (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("query", help="the text to search for")
    p.set_defaults(func=_search)

    p = sub.add_parser("ask", help="answer from retrieved passages: an extractive reader (--reader) or a GPT's "
                                   "generation (--checkpoint); cites the sources")
    p.add_argument("--checkpoint", help="a GPT that generates the answer from a prompt with the passages")
    p.add_argument("--reader", help="an extractive reader (npflux reader train) that answers with a span of a "
                                    "retrieved passage")
    p.add_argument("--threshold", type=finite_float, default=0.0,
                   help="--reader: below this score (a span's logits minus the passage's no-answer logits) the "
                        "answer is 'no answer found' (default 0)")
    add_docs_flags(p)
    p.add_argument("-k", type=int, default=3, help="passages to retrieve (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    add_sampling_flags(p, temperature=0.0)
    p.add_argument("--template", default=RAG_TEMPLATE, help="prompt with {context} and {question} (default: %(default)r)")
    p.add_argument("--no-stop", action="store_true", help="do not stop the answer at the first newline")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt the model was given")
    p.add_argument("--json", action="store_true", help="print answer, prompt and sources as JSON")
    p.add_argument("question", help="the question, in quotes")
    p.set_defaults(func=_ask)

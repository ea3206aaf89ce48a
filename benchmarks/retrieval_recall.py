"""Retrieval quality: recall@1 and recall@5 of TF-IDF and model embeddings on a labelled question set.

    python benchmarks/retrieval_recall.py [--docs FILE] [--qa benchmarks/data/neuraflux_qa.jsonl]
        [--checkpoint NAME=DIR ...] [--threads 1] [--out benchmarks/results/retrieval.json]

Each line of the question set is ``{"question", "line", "answer"}``: the
answer is line ``line`` of the documents (one passage per line). A question
counts at k when that line is among the first k passages returned. Rows:
TF-IDF with and without the stop-word list; for each checkpoint, mean-pooled
final hidden states with and without centering; and the same architecture
with random weights (what the embedding owes to training at all).
"""
import _env  # noqa: F401  (threads before numpy)
import harness

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_qa(path, passages):
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    by_line = {p.line: p.text for p in passages}
    for r in rows:
        if by_line.get(r["line"]) != r["answer"]:
            raise SystemExit(f"question {r['question']!r}: line {r['line']} of the documents is "
                             f"{by_line.get(r['line'])!r}, the label says {r['answer']!r} (wrong corpus?)")
    return rows


def recall(index, qa, ks=(1, 5)):
    hits = {k: 0 for k in ks}
    misses = []
    t0 = time.perf_counter()
    for r in qa:
        found = [res.line for res in index.search(r["question"], max(ks))]
        for k in ks:
            hits[k] += r["line"] in found[:k]
        if found[:1] != [r["line"]]:
            misses.append({"question": r["question"], "expected": r["line"], "got": found})
    seconds = time.perf_counter() - t0
    return {**{f"recall@{k}": hits[k] / len(qa) for k in ks}, "query_ms": 1000 * seconds / len(qa),
            "misses_at_1": misses}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", default=str(harness.shared_data("neuraflux_corpus.txt")))
    p.add_argument("--qa", default=str(ROOT / "benchmarks" / "data" / "neuraflux_qa.jsonl"))
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                   help="a GPT checkpoint whose hidden states embed the passages (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval.json"))
    args = p.parse_args()

    from npflux import GPT
    from benchlib import machine_info
    from npflux.retrieval import DocumentIndex
    from npflux.train import model_from_checkpoint

    rows = []

    def add(name, index, **extra):
        r = recall(index, qa)
        rows.append({"method": name, **extra, **r})
        print(f"{name:52s} recall@1 {r['recall@1']:.3f}  recall@5 {r['recall@5']:.3f}  ({r['query_ms']:.2f} ms/query)")

    tfidf = DocumentIndex.from_file(args.docs, "tfidf", split="line")
    qa = load_qa(args.qa, tfidf.passages)
    print(f"{len(qa)} questions over {len(tfidf)} passages of {args.docs}\n")
    add("tfidf (stop words removed)", tfidf)
    add("tfidf (all words)", DocumentIndex.from_file(args.docs, "tfidf", split="line", stop_words=()))
    for spec in args.checkpoint:
        name, _, directory = spec.rpartition("=")
        name = name or Path(directory).parent.name
        model, tokenizer, _ = model_from_checkpoint(directory)
        for center in (True, False):
            index = DocumentIndex.from_file(args.docs, "model", split="line", model=model, tokenizer=tokenizer,
                                            center=center)
            add(f"model {name} ({'centered' if center else 'raw'})", index, checkpoint=str(directory),
                center=center, dropped_characters=index.encoder_info["dropped_characters"])
        random = GPT(model.config, seed=1234)
        index = DocumentIndex.from_file(args.docs, "model", split="line", model=random, tokenizer=tokenizer)
        add(f"model {name}, random weights (centered)", index, checkpoint=None, center=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "retrieval_recall", "machine": machine_info(args.threads), "docs": args.docs,
               "qa": os.path.relpath(args.qa, ROOT), "questions": len(qa), "passages": len(tfidf), "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

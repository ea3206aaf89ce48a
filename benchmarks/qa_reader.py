"""Question answering on the 44 labelled questions: the extractive reader, the retrieved sentence, a generative model.

    python benchmarks/qa_reader.py --reader out-reader/ckpt [--generator out-nf/ckpt] [-k 3] [--threads 1]
        [--docs neuraflux_corpus.txt] [--json benchmarks/results/qa_reader.json]

Each question of benchmarks/data/neuraflux_qa.jsonl has a short gold answer
(``short_answer``, a span of its labelled line); every system is scored by
SQuAD's exact match and token F1 (``npflux.tasks.qa``) against it:

(a) reader: TF-IDF retrieves the top k lines, the reader answers with its
    best span over them (``npflux.retrieval.answer_with_reader``; "no
    answer found" scores 0);
(b) baseline: the whole top-1 retrieved line as the answer;
(c) generative: a GPT (``--generator``) prompted "Question: ...\\nAnswer:"
    with no retrieval, greedy, up to 24 tokens, cut at the first newline.

Also reported: the reader given the labelled line itself (what retrieval
costs it), and how far the generator's templates are from these questions:
each question's *form* (every word the reader's vocabulary does not know,
i.e. every content word, replaced by X) looked up among the forms of 20,000
generated questions, and the share of the questions' and lines' content
words that occur anywhere in the generated text.
"""
import _env  # noqa: F401  (threads before numpy)
import harness

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def score(rows, predictions):
    from npflux.tasks.qa import exact_match, token_f1

    em = [exact_match(p or "", r["short_answer"]) if p else 0.0 for r, p in zip(rows, predictions)]
    f1 = [token_f1(p or "", r["short_answer"]) if p else 0.0 for r, p in zip(rows, predictions)]
    return {"exact_match": sum(em) / len(rows), "f1": sum(f1) / len(rows)}, em, f1


def form(question, vocab):
    from npflux.tasks.qa import word_spans

    words = []
    for w, _, _ in word_spans(question):
        w = w.lower() if w.lower() in vocab.index else "X"
        if not (w == "X" and words and words[-1] == "X"):
            words.append(w)
    return " ".join(words)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reader", required=True)
    p.add_argument("--generator", help="a GPT checkpoint for row (c)")
    p.add_argument("--docs", default=str(harness.shared_data("neuraflux_corpus.txt")))
    p.add_argument("--qa", default=str(ROOT / "benchmarks" / "data" / "neuraflux_qa.jsonl"))
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "qa_reader.json"))
    args = p.parse_args()

    from benchlib import machine_info
    from npflux.checkpoint import load_checkpoint, load_reader
    from npflux.retrieval import DocumentIndex, answer_with_reader
    from npflux.tasks.qa import SyntheticQA, read, word_spans

    load_before = os.getloadavg()
    rows = [json.loads(line) for line in Path(args.qa).read_text(encoding="utf-8").splitlines() if line.strip()]
    index = DocumentIndex.from_file(args.docs, "tfidf", split="line")
    by_line = {q.line: q.text for q in index.passages}
    for r in rows:
        if by_line.get(r["line"]) != r["answer"] or r["short_answer"] not in r["answer"]:
            raise SystemExit(f"{r['question']!r}: line {r['line']} / short answer do not match {args.docs}")
    reader, vocab = load_reader(args.reader)
    systems, per_question = {}, [{"question": r["question"], "gold": r["short_answer"]} for r in rows]

    def add(name, predictions, seconds):
        summary, em, f1 = score(rows, predictions)
        systems[name] = {**summary, "seconds_per_question": seconds / len(rows)}
        for q, pred, e, f in zip(per_question, predictions, em, f1):
            q[name] = {"prediction": pred, "exact_match": e, "f1": f}
        print(f"{name:42s} exact match {summary['exact_match']:.3f}   F1 {summary['f1']:.3f}")

    t0 = time.perf_counter()
    answers = [answer_with_reader(index, reader, vocab, r["question"], k=args.k, threshold=args.threshold)
               for r in rows]
    add(f"(a) reader over top-{args.k} retrieved", [a["answer"] for a in answers], time.perf_counter() - t0)
    t0 = time.perf_counter()
    top1 = [index.search(r["question"], 1) for r in rows]
    add("(b) top-1 retrieved sentence", [t[0].text if t else None for t in top1], time.perf_counter() - t0)
    if args.generator:
        from npflux.backend import to_numpy
        from npflux.checkpoint import GPT_KINDS, load_model
        from npflux.tokenizers import decode_text, encode_prompt

        gpt, tok, _ = load_model(args.generator, expect=GPT_KINDS)
        eos = getattr(tok, "eos_id", None)
        preds = []
        t0 = time.perf_counter()
        for r in rows:
            ids = encode_prompt(tok, f"Question: {r['question']}\nAnswer:")
            ids = ids[-(gpt.config.block_size - 24):]
            out = to_numpy(gpt.generate(gpt.backend.asarray([ids]), 24, temperature=0, eos_id=eos))[0].tolist()
            new = out[len(ids):]
            if eos in new:
                new = new[: new.index(eos)]
            preds.append(decode_text(tok, new).split("\n")[0].strip())
        add("(c) generative, no retrieval", preds, time.perf_counter() - t0)
    t0 = time.perf_counter()
    oracle = [read(reader, vocab, r["question"], [r["answer"]])[0] for r in rows]
    add("reader given the labelled line", [s.text if s.score > args.threshold else None for s in oracle],
        time.perf_counter() - t0)
    for q, a in zip(per_question, answers):
        q["reader_source_line"] = a["source"]["line"] if a["source"] else None

    # How far the training data is from these questions.
    generated = SyntheticQA(0).take(20_000)
    gen_forms = {form(e.question, vocab) for e in generated}
    held_forms = [form(r["question"], vocab) for r in rows]
    gen_words = {w.lower() for e in generated for t in (e.question, e.passage) for w, _, _ in word_spans(t)}
    content = {w.lower() for r in rows for t in (r["question"], r["answer"]) for w, _, _ in word_spans(t)
               if w.lower() not in vocab.index}
    shared = sorted(content & gen_words)
    distance = {"held_out_forms_found_among_generated": sum(f in gen_forms for f in held_forms),
                "held_out_forms_matched": sorted({f for f in held_forms if f in gen_forms}),
                "generated_forms": len(gen_forms), "held_out_content_words": len(content),
                "held_out_content_words_in_generated_text": shared,
                "reader_vocabulary_words": len(vocab.words)}
    print(f"\nquestion forms (content words as X) also generated: {distance['held_out_forms_found_among_generated']} "
          f"of {len(rows)}; content words of the held-out questions and lines seen in generated text: "
          f"{len(shared)} of {len(content)} {shared}")

    a = systems[f"(a) reader over top-{args.k} retrieved"]["f1"]
    b = systems["(b) top-1 retrieved sentence"]["f1"]
    print(f"reader F1 / baseline F1 = {a / b:.2f}")
    ckpt = load_checkpoint(args.reader)
    payload = {"benchmark": "qa_reader", "machine": machine_info(args.threads),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "command": "python benchmarks/qa_reader.py " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if v is not None and k not in ("json", "k", "qa"))
                   + f" -k {args.k}",
               "docs": args.docs, "questions": len(rows), "k": args.k, "threshold": args.threshold,
               "reader": {"checkpoint": args.reader, "parameters": reader.num_parameters(),
                          "config": reader.config.to_dict(), "train": ckpt.config.get("train"),
                          "history": (ckpt.extra or {}).get("history")},
               "generator": args.generator, "systems": systems, "reader_f1_over_baseline_f1": a / b,
               "template_distance": distance, "per_question": per_question}
    print(f"wrote {harness.write(None, payload, args.json)}")


if __name__ == "__main__":
    main()

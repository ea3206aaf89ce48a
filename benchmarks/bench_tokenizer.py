"""Tokenizer encoding speed on Tiny Shakespeare: byte-level BPE (Hugging Face `tokenizers`) vs the char tokenizer.

    NPFLUX_DATA_DIR=../shared/data python benchmarks/bench_tokenizer.py [--threads 1] [--reps 5]

The BPE tokenizer is trained on the first 90% of the text (the training
split, 10,000 tokens by default) and then encodes the WHOLE text, as the char
tokenizer does: one call on the full 1.1 MB string, and (BPE only) the text
split into its 7,222 blank-line documents and encoded as a batch, which is
how ``npflux.data.pack_documents`` calls it (Hugging Face spreads a batch over
RAYON_NUM_THREADS = --threads). Candidates alternate; medians of --reps runs.
Decoding back is timed too, and checked to give the text back exactly.
"""
import _env  # noqa: F401  (threads before numpy)

import argparse
import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", str(_env.THREADS))  # before tokenizers loads

import benchlib as bench  # noqa: E402
from npflux.data import find_corpus, load_text  # noqa: E402
from npflux.tokenizers import BPETokenizer, CharTokenizer  # noqa: E402


def main():
    p = _env.common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--vocab-size", type=int, default=10_000)
    args = p.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    info, write = _env.setup(args, "tokenizer")
    info["rayon_threads"] = os.environ.get("RAYON_NUM_THREADS")

    text = load_text(find_corpus())
    train_text = text[: int(len(text) * 0.9)]
    t0 = time.perf_counter()
    bpe = BPETokenizer.train(train_text.split("\n\n"), vocab_size=args.vocab_size)
    train_s = time.perf_counter() - t0
    char = CharTokenizer(text)
    docs = text.split("\n\n")

    bpe_ids = bpe.encode(text)
    batch_tokens = sum(len(ids) for ids in bpe.encode_batch(docs))  # no tokens for the "\n\n" between them
    char_ids = char.encode_array(text)
    assert bpe.decode(bpe_ids) == text and char.decode(char_ids) == text  # exact round trips

    encode = bench.time_alternating({
        "char encode_array": lambda: char.encode_array(text),
        "bpe encode (one string)": lambda: bpe.encode(text),
        "bpe encode_batch (documents)": lambda: bpe.encode_batch(docs),
    }, reps=reps, warmup=warmup)
    decode = bench.time_alternating({
        "char decode": lambda: char.decode(char_ids),
        "bpe decode": lambda: bpe.decode(bpe_ids),
    }, reps=reps, warmup=warmup)

    n = len(text)
    base = encode["char encode_array"]["median_s"]
    rows = []
    for name, t in {**encode, **decode}.items():
        tokens = len(char_ids) if "char" in name else batch_tokens if "batch" in name else len(bpe_ids)
        rows.append({"what": name, "median_ms": 1e3 * t["median_s"], "chars_per_s": n / t["median_s"],
                     "tokens": tokens, "chars_per_token": n / tokens,
                     "time_vs_char_encode": t["median_s"] / base if "encode" in name else None})
    columns = [("what", "{}", 30), ("median_ms", "{:.1f}", 10), ("chars_per_s", "{:,.0f}", 14),
               ("tokens", "{:,}", 9), ("chars_per_token", "{:.2f}", 15), ("time_vs_char_encode", "{:.1f}", 19)]
    print(f"\nTiny Shakespeare, {n:,} characters; BPE vocabulary {bpe.vocab_size:,} "
          f"(trained on the 90% training split in {train_s:.2f} s)")
    print("  ".join(f"{c:>{w}}" for c, _, w in columns))
    for r in rows:
        print("  ".join(f"{'-' if r[c] is None else f.format(r[c]):>{w}}" for c, f, w in columns))
    write({"chars": n, "bpe_vocab_size": bpe.vocab_size, "bpe_train_s": train_s, "rows": rows,
           "timings": {**encode, **decode}})


if __name__ == "__main__":
    main()

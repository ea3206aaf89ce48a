"""NeuraFlux end to end: BPE datasets packed as [BOS] doc [EOS], the preset, training, sampling, beam, eval."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux.cli import main
from npflux.data import count_chars, pack_documents, prepare_dataset, split_documents
from npflux.models import GPT, GPTConfig
from npflux.tokenizers import BPETokenizer, CharTokenizer
from npflux.train import evaluate_text, model_from_checkpoint

LINES = ["NeuraFlux is a small language model.", "The model uses attention.", "Attention is all you need.",
         "Small models are useful for teaching.", "Language models predict the next token."]
TEXT = "\n".join(LINES * 8)
TINY = ["--n-embd", "12", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2", "--warmup-iters", "2", "--quiet",
        "--sample-tokens", "10"]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(LINES, vocab_size=300)


# ---------------------------------------------------------------------------
# packing documents
# ---------------------------------------------------------------------------


@given(st.lists(st.text(max_size=30), min_size=1, max_size=6), st.sampled_from(["\n", "\n\n", "##"]))
def test_packing_is_lossless_and_counts_every_character(bpe, docs, sep):
    text = sep.join(docs)
    # The documents are the pieces between separators: joining may make new ones (["\n", "\n"]
    # joined by "\n\n" is four newlines, three empty documents), so count them on the text.
    docs = text.split(sep)
    ids = pack_documents(bpe, text, sep)
    assert ids.dtype == np.uint16
    # [BOS] doc [EOS] per document, nothing else special
    assert (ids == bpe.bos_id).sum() == (ids == bpe.eos_id).sum() == len(docs)
    bounds = np.flatnonzero(ids == bpe.bos_id)
    pieces = [bpe.decode(ids[b + 1 : e].tolist()) for b, e in zip(bounds, np.flatnonzero(ids == bpe.eos_id))]
    assert sep.join(pieces) == text
    # every character is counted once: the separators by the [EOS] that replaced them
    assert count_chars(bpe, ids, sep) - len(sep) == len(text)


def test_packing_needs_document_marks():
    char = CharTokenizer("abc\n")
    np.testing.assert_array_equal(pack_documents(char, "ab\nc"), char.encode_array("ab\nc"))
    with pytest.raises(ValueError, match="BOS"):
        pack_documents(char, "ab\nc", "\n")
    assert split_documents("a\n\nb", None) == ["a\n\nb"] and split_documents("a\n\nb", "\n\n") == ["a", "b"]


def test_bpe_dataset_splits_as_the_char_dataset_and_trains_on_the_train_split_only():
    text = TEXT + "\nZygomorphic quixotry, zygomorphic quixotry, zygomorphic quixotry!"
    tok, train_ids, val_ids = prepare_dataset(text, "bpe", val_fraction=0.2, vocab_size=400, doc_sep="\n")
    n = int(len(text) * 0.8)
    _, char_train, char_val = prepare_dataset(text, "char", val_fraction=0.2)
    assert len(char_train) == n
    # the same characters on each side of the split, whichever tokenizer
    assert count_chars(tok, val_ids, "\n") - 1 == len(char_val) == len(text) - n
    assert tok.decode(val_ids.tolist(), skip_special_tokens=True) == text[n:].replace("\n", "")
    # the validation-only words taught the tokenizer nothing: a different tail trains the same tokenizer
    other, _, _ = prepare_dataset(TEXT[:n] + "x" * (len(text) - n), "bpe", val_fraction=0.2, vocab_size=400,
                                  doc_sep="\n")
    assert other == tok
    # reusing a tokenizer (what --resume does) encodes identically
    again, train2, val2 = prepare_dataset(text, tok, val_fraction=0.2, doc_sep="\n")
    assert again is tok and np.array_equal(train2, train_ids) and np.array_equal(val2, val_ids)
    with pytest.raises(ValueError, match="bpe"):
        prepare_dataset(text, "char", doc_sep="\n")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare_dataset(text, "wordpiece")


# ---------------------------------------------------------------------------
# the preset and evaluation
# ---------------------------------------------------------------------------


def test_neuraflux_preset_parameter_count():
    cfg = GPTConfig.from_preset("neuraflux")
    assert (cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.n_embd, cfg.block_size) == (6, 6, 10_000, 90, 128)
    assert cfg.dropout > 0 and cfg.tie_weights and cfg.activation == "gelu"
    C, V, T, L = 90, 10_000, 128, 6
    expected = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert GPT(cfg).num_parameters() == expected == 1_501_920
    assert abs(expected - 1.45e6) / 1.45e6 < 0.04  # within 4% of the published "1.45 million"


def test_evaluate_text_bits_per_char_with_bpe(bpe):
    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
    text = "\n".join(LINES)
    r = evaluate_text(model, bpe, text, batch_size=3, doc_sep="\n")
    ids = pack_documents(bpe, text, "\n").astype(np.int64)
    n_windows = (len(ids) - 1) // 8
    assert r["tokens"] == n_windows * 8
    assert r["chars"] == count_chars(bpe, ids[1 : n_windows * 8 + 1], "\n")
    assert r["bits_per_char"] == pytest.approx(r["loss"] * r["tokens"] / (r["chars"] * math.log(2)), rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    # covering the whole text, the characters are exactly the text's (minus none: the first token is [BOS])
    short = "Attention is all."
    whole = evaluate_text(GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=8)),
                          bpe, short, doc_sep="\n")
    assert whole["chars"] == len(short)
    assert whole["tokens"] == len(bpe.encode(short)) + 1  # every text token and the final [EOS]
    with pytest.raises(ValueError, match="empty"):  # not a loss and bits per character over 0 characters
        evaluate_text(model, bpe, "", doc_sep="\n")


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("neuraflux")
    data = work / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = work / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["train", "--preset", "neuraflux", "--vocab-size", "300", "--doc-sep", "\\n", "--data", str(data),
              "--out-dir", str(out), *TINY])
    return work, data, out / "ckpt", buf.getvalue()


def test_train_bpe_end_to_end(trained):
    work, data, ckpt, stdout = trained
    assert "documents split at '\\n'" in stdout and "BPETokenizer" in stdout
    model, tok, c = model_from_checkpoint(ckpt)
    assert isinstance(tok, BPETokenizer) and model.config.vocab_size == tok.vocab_size <= 300
    assert (model.config.n_layer, model.config.n_head) == (1, 2)  # the preset, with the test's overrides
    assert c.config["train"]["doc_sep"] == "\n"
    assert c.config["train"]["lr_schedule"] == "cosine"  # the preset's recipe
    # the tokenizer was trained on the training split: it encodes the corpus as the model saw it
    assert tok.decode(tok.encode(TEXT)) == TEXT


def run(argv, capsys):
    main(argv)
    return capsys.readouterr()


def test_eval_uses_the_training_document_split(trained, capsys):
    _, data, ckpt, _ = trained
    r = json.loads(run(["eval", "--checkpoint", str(ckpt), "--text", str(data)], capsys).out)
    model, tok, _ = model_from_checkpoint(ckpt)
    assert r == pytest.approx(evaluate_text(model, tok, TEXT, doc_sep="\n"))
    one_doc = json.loads(run(["eval", "--checkpoint", str(ckpt), "--text", str(data), "--doc-sep", ""], capsys).out)
    assert one_doc["tokens"] < r["tokens"]  # no [BOS]/[EOS] per line
    assert r["bits_per_char"] == pytest.approx(r["loss"] * r["tokens"] / (r["chars"] * math.log(2)))


def test_sample_beam_stops_at_eos(trained, capsys):
    _, _, ckpt, _ = trained
    got = run(["sample", "--checkpoint", str(ckpt), "--prompt", "The model", "--beam", "3", "--num-samples", "3",
               "--max-new-tokens", "12", "--length-penalty", "0"], capsys)
    texts = got.out.rstrip("\n").split("\n")
    assert len(texts) == 3 and all(t.startswith("The model") for t in texts)
    scores = [float(line.split("score ")[1].split(",")[0]) for line in got.err.splitlines() if "[beam" in line]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    # the same search from Python: the best beam, decoded without its special tokens
    model, tok, _ = model_from_checkpoint(ckpt)
    seqs, best = model.beam_search([tok.bos_id] + tok.encode("The model"), 3, 12, length_penalty=0.0,
                                   eos_id=tok.eos_id)
    assert texts[0] == tok.decode(seqs[0], skip_special_tokens=True)
    assert scores[0] == pytest.approx(best[0], abs=1e-4)
    assert "[EOS]" not in got.out and "[BOS]" not in got.out


def test_sample_stops_at_eos_unless_told(trained, capsys):
    _, _, ckpt, _ = trained
    base = ["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "60", "--seed", "0", "--temperature", "1.0"]
    stopped = run(base, capsys).out
    model, tok, _ = model_from_checkpoint(ckpt)
    out = model.generate(np.array([[tok.bos_id]]), 60, temperature=1.0, seed=0)[0].tolist()
    if tok.eos_id in out:
        out = out[: out.index(tok.eos_id)]
    assert stopped == tok.decode(out, skip_special_tokens=True) + "\n"
    assert len(run(base + ["--ignore-eos"], capsys).out) >= len(stopped)


def test_bad_beam_requests_are_clear_errors(trained, capsys):
    _, _, ckpt, _ = trained
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(ckpt), "--beam", "2", "--num-samples", "3"])
    assert "more than the --beam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(ckpt), "--beam", "0"])
    assert "--beam must be >= 1" in capsys.readouterr().err


def test_resume_keeps_the_tokenizer(trained, tmp_path):
    work, data, ckpt, _ = trained
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ckpt.parent, out)
    more = list(TINY)
    more[more.index("--max-iters") + 1] = "18"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--preset", "neuraflux", "--vocab-size", "290", "--data", str(data), "--out-dir", str(out),
              "--resume", *more])
    _, tok_before, _ = model_from_checkpoint(ckpt)
    _, tok_after, c = model_from_checkpoint(out / "ckpt")
    assert c.step == 18 and tok_after == tok_before  # --vocab-size 290 did not retrain it
    assert c.config["train"]["doc_sep"] == "\n"
    with pytest.raises(SystemExit):
        main(["train", "--preset", "neuraflux", "--data", str(data), "--out-dir", str(out), "--resume",
              "--doc-sep", "\\n\\n", *more])


def test_resume_accepts_its_own_settings_and_refuses_another_tokenizer(trained, tmp_path, capsys):
    _, data, _, _ = trained
    out = tmp_path / "run"
    first = list(TINY)
    first[first.index("--max-iters") + 1] = "6"
    base = ["train", "--preset", "neuraflux", "--vocab-size", "300", "--data", str(data), "--out-dir", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        main(base + ["--doc-sep", "", *first])                 # one document: recorded as doc_sep None
        main(base + ["--doc-sep", "", "--resume", *TINY])      # the same '' again resumes
    _, _, c = model_from_checkpoint(out / "ckpt")
    assert c.step == 12 and c.config["train"]["doc_sep"] is None
    capsys.readouterr()
    with pytest.raises(SystemExit):                            # not silently trained on as BPE
        main(base + ["--tokenizer", "char", "--resume", *TINY])
    assert "checkpoint's tokenizer is 'bpe'" in capsys.readouterr().err


def test_char_training_is_unchanged_and_beams_too(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text(TEXT, encoding="utf-8")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["train", "--data", str(data), "--out-dir", str(tmp_path / "o"), *TINY])
    model, tok, c = model_from_checkpoint(tmp_path / "o" / "ckpt")
    assert isinstance(tok, CharTokenizer) and c.config["train"]["doc_sep"] is None
    assert "documents split" not in buf.getvalue()
    # beam search on a char model: no [EOS], so every beam runs the full length
    out = run(["sample", "--checkpoint", str(tmp_path / "o" / "ckpt"), "--prompt", "the", "--beam", "2",
               "--max-new-tokens", "7"], capsys).out
    seqs, _ = model.beam_search(tok.encode("the"), 2, 7)
    assert out == tok.decode(seqs[0]) + "\n" and len(seqs[0]) == 10

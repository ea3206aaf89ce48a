"""The extractive reader: its span loss (gradients, PyTorch), the model, the QA generator, metrics, ``ask``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux import ops
from npflux.testing import assert_gradients_match, assert_matches_torch, assert_preserves_dtype

seeds = st.integers(0, 2**32 - 1)


def _span_inputs(r, B, T, masked):
    mask = r.random((B, T)) < 0.6 if masked else np.ones((B, T), dtype=bool)
    mask[np.arange(B), r.integers(0, T, B)] = True  # every row allows at least one position
    allowed = [np.flatnonzero(m) for m in mask]
    starts = np.array([r.choice(a) for a in allowed])
    ends = np.array([r.choice(a) for a in allowed])
    inputs = {"start_logits": 2 * r.standard_normal((B, T)), "end_logits": 2 * r.standard_normal((B, T)),
              "starts": starts, "ends": ends}
    return inputs, mask


def _torch_span(torch):
    F = torch.nn.functional

    def fn(start_logits, end_logits, starts, ends, mask=None):
        if mask is not None:
            keep = torch.as_tensor(mask)
            start_logits = start_logits.masked_fill(~keep, float("-inf"))
            end_logits = end_logits.masked_fill(~keep, float("-inf"))
        return F.cross_entropy(start_logits, starts) + F.cross_entropy(end_logits, ends)

    return fn


@given(B=st.integers(1, 4), T=st.integers(1, 9), masked=st.booleans(), seed=seeds)
def test_span_loss_gradcheck(B, T, masked, seed):
    inputs, mask = _span_inputs(np.random.default_rng(seed), B, T, masked)
    assert_gradients_match(ops.span_loss_forward, ops.span_loss_backward, inputs, seed=seed % 1000,
                           kwargs={"mask": mask})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(B=st.integers(1, 4), T=st.integers(1, 9), masked=st.booleans(), seed=seeds)
def test_span_loss_matches_torch(torch, dtype, B, T, masked, seed):
    inputs, mask = _span_inputs(np.random.default_rng(seed), B, T, masked)
    out, grads = assert_matches_torch(ops.span_loss_forward, ops.span_loss_backward, inputs, _torch_span(torch),
                                      dtype=dtype, kwargs={"mask": mask}, seed=seed)
    assert out.shape == () and out.dtype == dtype
    assert np.all(grads["start_logits"][~mask] == 0) and np.all(grads["end_logits"][~mask] == 0)


def test_span_loss_dtypes():
    inputs, mask = _span_inputs(np.random.default_rng(1), 3, 6, True)
    for dtype in (np.float32, np.float64):
        assert_preserves_dtype(ops.span_loss_forward, ops.span_loss_backward, inputs, dtype, kwargs={"mask": mask})


def test_span_loss_ignores_masked_logits():
    """What the mask leaves out cannot change the loss, however large its logits."""
    r = np.random.default_rng(4)
    inputs, mask = _span_inputs(r, 3, 7, True)
    loss, _ = ops.span_loss_forward(*inputs.values(), mask=mask)
    inputs["start_logits"] = np.where(mask, inputs["start_logits"], 1e4)
    loss2, _ = ops.span_loss_forward(*inputs.values(), mask=mask)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-14)


@pytest.mark.parametrize("bad, match", [
    (dict(starts=np.array([0, 9])), r"\[0, 5\)"),
    (dict(ends=np.array([1])), r"\(2,\)"),
    (dict(mask=np.array([[True] * 5, [False] * 5])), "allows no position"),
    (dict(mask=np.array([[False, True, True, True, True]] * 2)), "mask leaves out"),
    (dict(end_logits=np.zeros((2, 4))), r"\(B, T\)"),
])
def test_span_loss_bad_input(bad, match):
    args = {"start_logits": np.zeros((2, 5)), "end_logits": np.zeros((2, 5)), "starts": np.array([0, 1]),
            "ends": np.array([2, 3]), **bad}
    with pytest.raises(ValueError, match=match):
        ops.span_loss_forward(**args)


# ==========================================================================
# words, metrics, the generator
# ==========================================================================
from npflux.tasks.qa import SyntheticQA, exact_match, normalize_answer, token_f1, word_spans  # noqa: E402


def test_word_spans_keep_offsets_and_numbers_whole():
    text = "The speed is approximately 299,792 km/s (1.45 million)."
    spans = word_spans(text)
    assert all(text[a:b] == w for w, a, b in spans)
    words = [w for w, _, _ in spans]
    assert "299,792" in words and "1.45" in words and "(" in words and words[-1] == "."


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("the Sun", "Sun", 1.0, 1.0),                         # articles and case do not count
    ("Paris.", "paris", 1.0, 1.0),                        # nor punctuation
    ("converts logits", "converts logits to probabilities", 0.0, 2 * 1.0 * 0.5 / 1.5),
    ("blood throughout the body", "blood", 0.0, 2 * (1 / 3) * 1.0 / (1 / 3 + 1.0)),
    ("H2O", "water", 0.0, 0.0),
])
def test_squad_metrics(pred, gold, em, f1):
    assert exact_match(pred, gold) == em
    assert token_f1(pred, gold) == pytest.approx(f1, rel=1e-12)


def test_normalize_answer_is_squads():
    assert normalize_answer("  The  Pacific, Ocean! ") == "pacific ocean"


def test_generator_answers_are_spans_of_their_passage_and_reproducible():
    a, b = SyntheticQA(7).take(300), SyntheticQA(7).take(300)
    assert a == b
    answered = [e for e in a if e.answer is not None]
    assert all(e.passage[e.answer_start:e.answer_end] == e.answer for e in answered)
    assert all(e.question.endswith("?") for e in a)
    share = 1 - len(answered) / len(a)
    assert 0.1 < share < 0.3  # the no-answer share asked for is 0.2
    # invented content words: few words repeat across examples apart from the templates' grammar
    words = [w.lower() for e in a for w, _, _ in word_spans(e.passage)]
    from collections import Counter
    counts = Counter(words)
    frequent = {w for w, c in counts.items() if c >= 20}
    assert len(frequent) < 150 and len(counts) > 10 * len(frequent)  # a small grammar, a large invented lexicon
    assert {"the", "is", "of", "by", "was"} <= frequent


# ==========================================================================
# the model
# ==========================================================================
from npflux.models.reader import CLS, Reader, ReaderConfig  # noqa: E402
from npflux.tasks.qa import best_spans, read  # noqa: E402
from npflux.tokenizers.words import ReaderVocab, collate, stem  # noqa: E402


@pytest.mark.parametrize("a, b", [("boils", "boil"), ("created", "create"), ("orbits", "orbit"),
                                  ("regularizes", "regularize"), ("monitoring", "monitor")])
def test_stem_joins_inflections(a, b):
    assert stem(a) == stem(b)


def _vocab():
    return ReaderVocab(["the", "is", "of", "what", "who", "?", "."], n_buckets=16)


def test_encode_windows_cover_the_passage_and_mark_matches():
    vocab = _vocab()
    passage = " ".join(f"w{i}" for i in range(40)) + " The capital of Frobnia is Quux."
    windows = vocab.encode("What is the capital of Frobnia?", passage, block_size=24)
    assert len(windows) > 1
    seen = set()
    for w in windows:
        assert len(w["ids"]) <= 24 and w["ids"][0] == CLS and w["allowed"][0]
        for pos, off in enumerate(w["offsets"]):
            assert (off is None) != bool(w["allowed"][pos]) or pos == 0
            if off is not None:
                seen.add(off)
    assert len(seen) == len(word_spans(passage))
    last = windows[-1]
    words = {passage[o[0]:o[1]]: m for o, m in zip(last["offsets"], last["match"]) if o is not None}
    assert words["Frobnia"] == 2 and words["capital"] == 2 and words["Quux"] == 0
    # an unknown word gets the same bucket id in the question and the passage
    q_ids = vocab.encode("Frobnia?", "Frobnia.", 16)[0]["ids"]
    assert q_ids[1] == q_ids[4]


def test_best_spans_is_the_brute_force_maximum():
    r = np.random.default_rng(0)
    B, T, L = 5, 12, 4
    start, end = r.standard_normal((B, T)), r.standard_normal((B, T))
    allowed = r.random((B, T)) < 0.7
    allowed[:, 0] = True
    allowed[0, 1:] = False  # a row without passage words
    got = best_spans(start, end, allowed, L)
    assert got[0][2] == -np.inf
    for b in range(1, B):
        cands = [(start[b, i] + end[b, j], i, j) for i in range(1, T) for j in range(i, min(i + L, T))
                 if allowed[b, i] and allowed[b, j]]
        s, i, j = max(cands)
        assert got[b][:2] == (i, j) and got[b][2] == pytest.approx(s - start[b, 0] - end[b, 0], rel=1e-12)


class _LossOf:
    """The reader as check_module wants a module: forward -> its loss, backward(dout) -> loss_scale = dout."""

    def __init__(self, reader, batch):
        self.reader, self.batch = reader, batch
        self.params, self.grads = reader.params, reader.grads

    def forward(self):
        return self.reader.forward(self.batch)[1]

    def backward(self, dout):
        self.reader.backward(loss_scale=float(dout))

    def zero_grad(self):
        self.reader.zero_grad()


def test_reader_gradients_match_numerical_float64():
    from npflux.gradcheck import check_module
    from npflux.testing import THRESHOLD, randomize_parameters

    vocab = _vocab()
    reader = Reader(ReaderConfig(vocab_size=vocab.size, block_size=24, n_layer=1, n_head=2, n_embd=8), seed=1,
                    dtype="float64")
    randomize_parameters(reader, seed=2)
    pairs = [("Who wrote it?", "Ann Lee wrote it. Bob did not."), ("What is the sky?", "The sky is blue."),
             ("When?", "No time.")]
    windows = [vocab.encode(q, p, 24)[0] for q, p in pairs]
    batch = collate(windows, starts=[6, 10, 0], ends=[7, 10, 0])  # padded rows, a no-answer row
    errors = check_module(_LossOf(reader, batch), {}, directional=True)
    assert max(errors.values()) < THRESHOLD, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_read_returns_text_of_the_passage():
    vocab = _vocab()
    reader = Reader(ReaderConfig(vocab_size=vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=8), seed=0)
    passages = ["Ann Lee wrote the book in 1901.", "The sky is blue."]
    spans = read(reader, vocab, "Who wrote the book?", passages)
    for s, p in zip(spans, passages):
        assert p[s.start:s.end] == s.text and s.text and np.isfinite(s.score)


# ==========================================================================
# training, the checkpoint kind, npflux ask --reader
# ==========================================================================
@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory):
    """A tiny reader trained for 40 steps (the tests need a checkpoint, not a good reader)."""
    from npflux.training.reader import ReaderTrainConfig, train_reader

    out = tmp_path_factory.mktemp("reader")
    cfg = ReaderTrainConfig(out_dir=str(out), steps=40, batch_size=16, eval_interval=20, eval_examples=20,
                            vocab_examples=2000, learning_rate=3e-3, warmup_iters=5, progress=False)
    _, _, history = train_reader({"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 64}, cfg,
                                 log=lambda *_: None)
    return out, history


def test_training_lowers_the_span_loss_and_saves_a_reader(reader_dir):
    from npflux.checkpoint import kind_at, load_model, load_reader
    from npflux.training.reader import example_batch

    out, history = reader_dir
    assert kind_at(out / "ckpt") == "reader" and [e["step"] for e in history] == [20, 40]
    reader, vocab = load_reader(out / "ckpt")
    # the loss on fresh examples against an untrained reader of the same shape: training must have taught it
    batch = example_batch(vocab, SyntheticQA(99).take(64), reader.config.block_size)
    untrained = Reader(reader.config, seed=5)
    with reader.evaluating(), untrained.evaluating():
        trained_loss = float(reader.forward(batch)[1])
        random_loss = float(untrained.forward(batch)[1])
    assert trained_loss < random_loss - 0.5, (trained_loss, random_loss)
    _, vocab2, ckpt = load_model(out / "ckpt")
    assert vocab2 == vocab and ckpt.kind == "reader"


def test_an_interrupted_reader_run_resumes_to_the_straight_runs_weights(tmp_path, monkeypatch):
    import npflux.training.reader as training_reader
    from npflux.checkpoint import load_checkpoint
    from npflux.training.reader import ReaderTrainConfig, train_reader

    model = {"n_layer": 1, "n_embd": 8, "n_head": 2, "block_size": 64, "dropout": 0.1}

    def cfg(out, **kw):
        return ReaderTrainConfig(out_dir=str(out), steps=9, batch_size=8, eval_interval=3, eval_examples=8,
                                 vocab_examples=500, warmup_iters=2, progress=False, **kw)

    straight, _, history = train_reader(model, cfg(tmp_path / "a"), log=lambda *_: None)
    real_batch, calls = training_reader.example_batch, []

    def dies_at_step_5(*a, **k):  # the run is killed during step 5: the checkpoint on disk is step 3's
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_batch(*a, **k)

    monkeypatch.setattr(training_reader, "example_batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_reader(model, cfg(tmp_path / "b"), log=lambda *_: None)
    monkeypatch.setattr(training_reader, "example_batch", real_batch)
    assert load_checkpoint(tmp_path / "b" / "ckpt").step == 3
    with pytest.raises(ValueError, match="other settings: learning_rate"):
        train_reader(model, cfg(tmp_path / "b", learning_rate=5e-3), log=lambda *_: None, resume=True)
    resumed, _, history_b = train_reader(model, cfg(tmp_path / "b"), log=lambda *_: None, resume=True)
    for name, p in straight.params.items():
        np.testing.assert_array_equal(resumed.params[name], p)  # the same arithmetic in the same order
    assert [e["step"] for e in history_b] == [e["step"] for e in history] == [3, 6, 9]
    assert [e["f1"] for e in history_b] == [e["f1"] for e in history]
    log_steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_steps == [3, 6, 9]


def test_reader_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    from npflux.checkpoint import CheckpointNotFound
    from npflux.training.reader import ReaderTrainConfig, train_reader

    with pytest.raises(CheckpointNotFound, match="--resume: no checkpoint in"):
        train_reader(None, ReaderTrainConfig(out_dir=str(tmp_path / "none"), steps=3, progress=False),
                     log=lambda *_: None, resume=True)


def test_a_reader_is_no_teacher_and_no_gpt(reader_dir):
    from npflux.checkpoint import GPT_KINDS, WrongKind, load_model
    from npflux.training.distill import load_teacher

    out, _ = reader_dir
    with pytest.raises(WrongKind, match="extractive reader.*npflux ask --reader"):
        load_teacher(out / "ckpt")
    with pytest.raises(WrongKind):
        load_model(out / "ckpt", expect=GPT_KINDS)


def test_ask_with_the_reader_quotes_its_source_or_says_no_answer(reader_dir, tmp_path, capsys):
    from npflux.cli import main

    out, _ = reader_dir
    docs = tmp_path / "docs.txt"
    docs.write_text("Zorvan Kelth built the glass tower in 1852.\nThe river Mirel is the longest river.\n"
                    "Bread is baked in ovens.\n")
    main(["ask", "--reader", str(out / "ckpt"), "--docs", str(docs), "--threshold=-1e9",
          "Who built the glass tower?"])
    text = capsys.readouterr().out
    assert text.startswith("answer: ") and "source: line 1" in text and '"Zorvan Kelth built the glass tower' in text
    main(["ask", "--reader", str(out / "ckpt"), "--docs", str(docs), "--threshold", "1e9",
          "Who built the glass tower?"])
    assert capsys.readouterr().out.startswith("answer: no answer found")
    main(["ask", "--reader", str(out / "ckpt"), "--docs", str(docs), "--json", "Who built the glass tower?"])
    result = json.loads(capsys.readouterr().out)
    assert [c["line"] for c in result["candidates"]][:1] == [1]
    for c in result["candidates"]:
        line = docs.read_text().splitlines()[c["line"] - 1]
        assert line[c["start"]:c["end"]] == c["span"]


def test_ask_needs_a_reader_or_a_checkpoint(tmp_path):
    from npflux.cli import main

    docs = tmp_path / "docs.txt"
    docs.write_text("a b c\n")
    with pytest.raises(SystemExit, match="--checkpoint .* or --reader"):
        main(["ask", "--docs", str(docs), "What?"])

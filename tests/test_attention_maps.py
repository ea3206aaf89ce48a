"""Attention heat maps (npflux.viz, ``npflux attention``) and the ``npflux seq2seq`` command.

The checkpoints are tiny untrained models written by the tests: what is
checked is that the weights drawn are the model's (rows are distributions,
causal where they must be, the shapes the labels say) and that the commands
write real images and fail clearly.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from npflux.checkpoint import save_checkpoint
from npflux.cli import main
from npflux.models import GPT, GPTConfig
from npflux.models.seq2seq import Seq2SeqTransformer
from npflux.tasks import DateTask
from npflux.tokenizers.char import CharTokenizer
from npflux.train_seq2seq import load_seq2seq, model_config_for, save_seq2seq
from npflux.viz import gpt_attention, plot_attention, select_panels, seq2seq_attention, token_label

from conftest import host


def run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    return buf.getvalue()


def fail(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


def read_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory):
    """A tiny GPT saved as ``npflux train`` saves one (config {"model", "train"}, char tokenizer)."""
    tok = CharTokenizer("the cat sat on a mat.\n")
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config, seed=3)
    path = tmp_path_factory.mktemp("gpt") / "ckpt"
    save_checkpoint(path, model.state_dict(), {"model": config.to_dict(), "train": {"dtype": "float32"}},
                    tokenizer=tok.to_dict())
    return path, model, tok


@pytest.fixture(scope="module")
def s2s_ckpt(tmp_path_factory):
    task = DateTask(seed=0, heldout_size=5)
    model = Seq2SeqTransformer(model_config_for(task, n_embd=8, n_head=2, n_encoder_layer=1, n_decoder_layer=2),
                               seed=4)
    path = tmp_path_factory.mktemp("s2s") / "ckpt"
    save_seq2seq(path, model, task.tokenizer, extra={"task_seed": 0})
    return path, model, task


def test_gpt_attention_is_the_models_causal_softmax(gpt_ckpt):
    _, model, tok = gpt_ckpt
    r = gpt_attention(model, tok, "the cat")
    w = r["weights"]
    assert w.shape == (2, 2, 7, 7) and r["queries"] == r["keys"] == list("the cat")
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.triu(w, k=1) == 0)  # no query sees a later token
    with pytest.raises(ValueError, match="at most 16"):
        gpt_attention(model, tok, "the cat sat on a mat")


def test_seq2seq_attention_kinds(s2s_ckpt):
    _, model, task = s2s_ckpt
    src = "3rd of March 1998"
    cross = seq2seq_attention(model, task.tokenizer, src, target="1998-03-03")
    assert cross["weights"].shape == (2, 2, 11, len(src))  # decoder layers, heads, output + <eos>, source
    assert cross["queries"] == list("1998-03-03") + ["<eos>"] and cross["keys"] == list(src)
    np.testing.assert_allclose(cross["weights"].sum(-1), 1.0, rtol=1e-5)
    # the weights drawn are the model's own, teacher-forced on BOS + the target
    model.forward(task.encode_sources([src]), np.array([[task.bos_id, *task.tokenizer.encode("1998-03-03")]]))
    np.testing.assert_array_equal(host(cross["weights"]), np.stack([host(w[0]) for w in model.cross_attention_weights]))
    enc = seq2seq_attention(model, task.tokenizer, src, target="1998-03-03", kind="encoder")
    assert enc["weights"].shape == (1, 2, len(src), len(src))
    dec = seq2seq_attention(model, task.tokenizer, src, target="1998-03-03", kind="decoder")
    assert dec["weights"].shape == (2, 2, 11, 11) and dec["keys"][0] == "<bos>"
    assert np.all(np.triu(dec["weights"], k=1) == 0)
    greedy = seq2seq_attention(model, task.tokenizer, src)  # no target: the model's own greedy output
    assert greedy["output"] == task.tokenizer.decode(model.greedy_decode(task.encode_sources([src]))[0])
    assert greedy["weights"].shape[2] == len(greedy["queries"]) == min(len(greedy["output"]) + 1, 11)
    full = seq2seq_attention(model, task.tokenizer, src, target="1998-03-031")  # fills all 11 positions: no <eos>
    assert full["queries"] == list("1998-03-031") and full["keys"] == list(src)
    with pytest.raises(ValueError, match="kind"):
        seq2seq_attention(model, task.tokenizer, src, kind="nope")
    with pytest.raises(ValueError, match="padding token"):
        seq2seq_attention(model, task.tokenizer, "3rd of\0March 1998")
    with pytest.raises(ValueError, match="positions"):
        seq2seq_attention(model, task.tokenizer, src, target="1998-03-03-1998")


def test_select_panels():
    w = np.random.default_rng(0).random((3, 4, 2, 5))
    panels, titles = select_panels(w, layer=-1, head=2)
    np.testing.assert_array_equal(panels, w[2, 2][None])
    assert titles == ["layer 2, head 2"]
    panels, titles = select_panels(w)
    assert panels.shape == (12, 2, 5) and titles[5] == "layer 1, head 1"
    panels, titles = select_panels(w, layer=None, head="mean")
    np.testing.assert_allclose(panels, w.mean(axis=1))
    with pytest.raises(ValueError, match="3 layers"):
        select_panels(w, layer=3)
    with pytest.raises(ValueError, match="head"):
        select_panels(w, head="max")


def test_plot_attention_writes_a_png_and_checks_labels(tmp_path):
    w = np.random.default_rng(1).random((3, 4, 6))
    path = plot_attention(w, list("abcd"), list("uv wxy"), tmp_path / "a.png", titles=["x", "y", "z"], title="t")
    image = read_png(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(ValueError, match="labels"):
        plot_attention(w, list("abc"), list("uv wxy"), tmp_path / "b.png")
    assert token_label(" ") == "\u2423" and token_label("\n") == "\\n" and token_label("\x02") == "\\x02"


def test_attention_command_gpt(gpt_ckpt, tmp_path, capsys):
    path, _, _ = gpt_ckpt
    out = run(["attention", "--checkpoint", str(path), "--prompt", "the cat", "--layer", "0",
               "--out", str(tmp_path / "g.png")])
    assert "wrote" in out and "strongest key per query" in out
    read_png(tmp_path / "g.png")
    assert "give --prompt" in fail(["attention", "--checkpoint", str(path), "--source", "x"], capsys)
    assert "layer 5 does not exist" in fail(["attention", "--checkpoint", str(path), "--prompt", "a",
                                              "--layer", "5"], capsys)
    assert "not in the vocabulary" in fail(["attention", "--checkpoint", str(path), "--prompt", "XYZ"], capsys)


def test_attention_command_seq2seq(s2s_ckpt, tmp_path, capsys):
    path, _, _ = s2s_ckpt
    out = run(["attention", "--checkpoint", str(path), "--source", "Mar 3, 98", "--target", "1998-03-03",
               "--head", "mean", "--layer", "all", "--out", str(tmp_path / "c.png")])
    assert "output: 1998-03-03" in out
    read_png(tmp_path / "c.png")
    assert "give --source" in fail(["attention", "--checkpoint", str(path), "--prompt", "x"], capsys)


def test_seq2seq_decode_and_eval_commands(s2s_ckpt, gpt_ckpt, capsys):
    path, model, task = s2s_ckpt
    out = run(["seq2seq", "decode", "--checkpoint", str(path), "3/3/98", "Mar 3, 98", "--beam", "2"])
    lines = out.strip().split("\n")
    assert [l.split("\t")[0] for l in lines] == ["3/3/98", "Mar 3, 98"]
    loaded, tok, _ = load_seq2seq(path)
    expected = tok.decode(loaded.beam_decode(task.encode_sources(["3/3/98"]), beam_size=2)[0])
    assert lines[0].split("\t")[1] == expected
    report = json.loads(run(["seq2seq", "eval", "--checkpoint", str(path), "--limit", "4"]))
    assert report["examples"] == 4 and report["task_seed"] == 0 and 0.0 <= report["exact_match"] <= 1.0
    assert len(report["errors"]) == round(4 * (1 - report["exact_match"]))
    import sacrebleu  # BLEU and chrF are sacrebleu's, on the outputs of the same 4 held-out pairs

    pairs = task.heldout()[:4]
    from npflux.training.seq2seq import translate

    outputs = translate(loaded, tok, [s for s, _ in pairs])
    assert report["bleu"] == sacrebleu.corpus_bleu(outputs, [[t for _, t in pairs]]).score
    assert report["chrf"] == sacrebleu.corpus_chrf(outputs, [[t for _, t in pairs]]).score
    assert "not a seq2seq" in fail(["seq2seq", "decode", "--checkpoint", str(gpt_ckpt[0]), "x"], capsys)
    assert "--limit must be at least 1" in fail(["seq2seq", "eval", "--checkpoint", str(path), "--limit", "-1"], capsys)

"""npflux.interp and the activations / sae commands: windows, metrics, training, reports, splicing."""
import contextlib
import io
import json

import numpy as np
import pytest

from npflux import GPT, GPTConfig
from npflux.capture import capture
from npflux.checkpoint import save_checkpoint
from npflux.cli import main
from npflux.interp import (
    collect_activations, encode_text, evaluate_sae, feature_report, input_scale, load_sae, replace_output, report_html,
    report_text, residual_vectors, save_sae, spliced_loss, token_windows, top_activations, train_sae,
)
from npflux.models import SAEConfig, SparseAutoencoder
from npflux.tokenizers import CharTokenizer

from conftest import dev, host

TEXT = "".join(f"the {w} sat on the mat. {w.upper()}!\n" for w in ["cat", "dog", "rat", "bat"] * 15)


def tiny_model(dtype="float64"):
    tok = CharTokenizer(TEXT)
    c = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=8, activation="relu")
    model = GPT(c, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    for p in model.params.values():
        p[...] = dev(0.5 * rng.standard_normal(p.shape), like=p)
    return model, tok


def exact_sae(d, dtype="float64"):
    """2d features +-e_i with W_enc = W_dec.T and zero biases: relu(x_i) e_i - relu(-x_i) e_i = x exactly."""
    sae = SparseAutoencoder(SAEConfig(d, 2 * d), dtype=dtype)
    eye = np.eye(d)
    sae.p["W_dec"][...] = dev(np.concatenate([eye, -eye]), like=sae)
    sae.p["W_enc"][...] = sae.p["W_dec"].T
    return sae


# --------------------------------------------------------------------------
# text, windows, activations
# --------------------------------------------------------------------------
def test_token_windows_pad_the_last_window():
    tokens, valid, start = token_windows(np.arange(10), 4)
    assert tokens.shape == (3, 4) and valid.sum() == 10 and list(start) == [0, 4, 8]
    np.testing.assert_array_equal(tokens[valid], np.arange(10))
    assert not valid[2, 2:].any()
    tokens, valid, _ = token_windows(np.arange(3), 8)  # shorter than the context: one window of its length
    assert tokens.shape == (1, 3) and valid.all()
    with pytest.raises(ValueError, match="no tokens"):
        token_windows(np.arange(0), 8)


def test_empty_or_constant_activations():
    """No rows is an error (not a division by zero or a NaN scale); rows without variance have no FVE."""
    sae = SparseAutoencoder(d_in=4, n_features=8)
    with pytest.raises(ValueError, match="N >= 1"):
        input_scale(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="N >= 1"):
        evaluate_sae(sae, np.zeros((0, 4), np.float32))
    metrics = evaluate_sae(sae, np.ones((3, 4), np.float32))
    assert np.isnan(metrics["fve"]) and metrics["mse_per_token"] > 0


def test_encode_text_unknown_characters():
    tok = CharTokenizer("abc ")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode_text(tok, "a bad cab")
    ids, dropped = encode_text(tok, "a bad cab", skip_unknown=True)
    assert dropped == 1 and tok.decode(ids) == "a ba cab"
    with pytest.raises(ValueError, match="no tokens"):
        encode_text(tok, "ddd", skip_unknown=True)


def test_collect_activations_window_by_window():
    """Each window equals the model run on that window alone; padding never reaches the real positions."""
    model, tok = tiny_model()
    ids = tok.encode_array(TEXT[:21])
    data = collect_activations(model, ids, ["transformer.h.1", "transformer.h.0.attn.weights"], batch_size=2)
    assert data["transformer.h.1"].shape == (3, 8, 8) and data["transformer.h.0.attn.weights"].shape == (3, 2, 8, 8)
    for w in range(3):
        n = int(data["valid"][w].sum())
        with capture(model, ["transformer.h.1"]) as acts:
            model.forward(ids[None, data["start"][w] : data["start"][w] + n])
        np.testing.assert_allclose(data["transformer.h.1"][w, :n], host(acts["transformer.h.1"][0]), rtol=1e-12,
                                   atol=1e-12)
    x, index = residual_vectors(model, ids, "transformer.h.1")
    assert x.shape == (21, 8) and x.dtype == np.float32 and list(index) == list(range(21))
    with pytest.raises(ValueError, match="per-token point"):
        residual_vectors(model, ids, "transformer.h.0.attn.weights")
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        collect_activations(model, ids, ["transformer.h.1"], context=9)


# --------------------------------------------------------------------------
# metrics, training, splicing
# --------------------------------------------------------------------------
def test_metrics_of_an_exact_dictionary():
    sae = exact_sae(3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3))
    x[:, 0] = np.abs(x[:, 0])  # the -e_0 feature never fires: dead
    r = evaluate_sae(sae, x)
    assert r["fve"] == pytest.approx(1.0, abs=1e-12) and r["mse_per_token"] == pytest.approx(0.0, abs=1e-20)
    assert r["l0"] == pytest.approx(3.0)  # one of +-e_i per coordinate
    assert r["dead"] == 1 and r["dead_fraction"] == pytest.approx(1 / 6)
    np.testing.assert_allclose(r["frequency"][:3] + r["frequency"][3:], 1.0)
    sae.p["W_dec"][...] *= 0.5  # a reconstruction of x / 2 explains 3/4 of the variance about a zero mean
    x = rng.standard_normal((20000, 3))
    assert evaluate_sae(sae, x - x.mean(axis=0))["fve"] == pytest.approx(0.75, abs=0.01)


def test_training_recovers_a_planted_sparse_dictionary():
    """Data made of 2-sparse combinations of 24 unit directions in 12 dims: the SAE learns to explain it."""
    rng = np.random.default_rng(0)
    d, k = 12, 24
    truth = rng.standard_normal((k, d))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    codes = np.zeros((6000, k))
    for row in codes:
        row[rng.choice(k, 2, replace=False)] = rng.uniform(0.5, 2.0, 2)
    x = (codes @ truth).astype(np.float32)
    sae = SparseAutoencoder(SAEConfig(d, 48, l1=0.4), seed=1)
    history = train_sae(sae, x[:5000], steps=600, batch_size=256, lr=1e-2)
    assert history[-1][2] < 0.2 * history[0][2]
    r = evaluate_sae(sae, x[5000:])
    assert r["fve"] > 0.85 and r["l0"] < 8  # the L1 penalty costs some variance and a few weak extra features
    np.testing.assert_allclose(np.linalg.norm(host(sae.p["W_dec"]), axis=1), 1.0, rtol=1e-5)
    # the true directions are found: each has a learned feature pointing almost the same way
    cos = truth @ host(sae.p["W_dec"]).T
    assert (cos.max(axis=1) > 0.9).mean() > 0.9


def test_spliced_loss_of_an_exact_sae_equals_the_clean_loss():
    model, tok = tiny_model()
    ids = tok.encode_array(TEXT[:200])
    r = spliced_loss(model, ids, "transformer.h.0", exact_sae(8), scale=2.0)
    assert r["spliced"] == pytest.approx(r["clean"], rel=1e-12)
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert r["mean_ablated"] > r["clean"]
    zero = SparseAutoencoder(SAEConfig(8, 16), dtype="float64")
    zero.p["W_dec"][...] = 0.0  # reconstructs b_dec = 0 everywhere: worse than the clean model
    assert spliced_loss(model, ids, "transformer.h.0", zero)["spliced"] > r["clean"]
    with replace_output(model, "transformer.h.1", lambda out: out * 0):
        pass
    assert "forward" not in model.transformer.h.items[1].__dict__


# --------------------------------------------------------------------------
# feature reports and saving
# --------------------------------------------------------------------------
def test_top_activations_match_brute_force():
    rng = np.random.default_rng(3)
    sae = SparseAutoencoder(SAEConfig(4, 10), seed=3, dtype="float64")
    sae.p["b_enc"][...] = -1.0  # sparse: some features fire rarely or never
    x = rng.standard_normal((300, 4))
    values, rows = top_activations(sae, x, k=5, batch_size=64)
    f = host(sae.encode(dev(x, like=sae)))
    for j in range(10):
        expected = np.sort(f[:, j])[::-1][:5]
        np.testing.assert_allclose(values[:, j], expected)
        np.testing.assert_allclose(f[rows[values[:, j] > 0, j], j], expected[expected > 0])


def test_feature_report_brackets_the_max_token():
    model, tok = tiny_model()
    ids = tok.encode_array(TEXT)
    x, index = residual_vectors(model, ids, "transformer.h.0")
    sae = SparseAutoencoder(SAEConfig(8, 16, l1=0.1), seed=0, dtype="float64")
    report = feature_report(sae, x, index, ids, tok, context=8, k=3, before=5, after=2)
    values, rows = top_activations(sae, x, k=3)
    assert [f["feature"] for f in report] == [j for j in range(16) if values[0, j] > 0]
    f = report[0]
    j, top = f["feature"], f["contexts"][0]
    i = int(index[rows[0, j]])
    assert top["token"] == TEXT[i] and top["activation"] == pytest.approx(values[0, j])
    assert top["left"] == TEXT[max(i - i % 8, i - 5) : i] and top["right"] == TEXT[i + 1 : i + 3]
    text = report_text(report, title="T")
    assert f"[{top['token']}]".replace("\n", "\u21b5") in text and f"feature {j} " in text
    page = report_html(report, title="T")
    assert page.startswith("<!doctype html>") and "<b style=" in page
    assert [g["feature"] for g in feature_report(sae, x, index, ids, tok, 8, k=2, features=[3, 1])] == [3, 1]
    with pytest.raises(ValueError, match="out of range"):
        feature_report(sae, x, index, ids, tok, 8, features=[99])


def test_save_and_load(tmp_path):
    sae = SparseAutoencoder(SAEConfig(6, 24, l1=0.3, tied=True), seed=5)
    save_sae(tmp_path / "sae", sae, {"point": "transformer.h.1", "input_scale": 0.5}, {"val": {"fve": 0.9}})
    back, source, metrics = load_sae(tmp_path / "sae")
    assert back.config == sae.config and source["input_scale"] == 0.5 and metrics["val"]["fve"] == 0.9
    for k, v in sae.params.items():
        np.testing.assert_array_equal(host(back.params[k]), host(v))


# --------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("interp")
    model, tok = tiny_model(dtype="float32")
    ckpt = save_checkpoint(work / "ckpt", model.state_dict(), {"model": model.config.to_dict()}, tokenizer=tok)
    text = work / "text.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    return work, ckpt, text


def run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([str(a) for a in argv])
    return buf.getvalue()


def test_activations_command(checkpoint, capsys):
    from safetensors.numpy import load_file

    work, ckpt, text = checkpoint
    out = run(["activations", "--checkpoint", ckpt, "--text", text, "--names", "transformer.h.*",
               "transformer.h.1.attn.weights", "--out", work / "acts.safetensors", "--quiet"])
    assert "wrote" in out
    acts = load_file(str(work / "acts.safetensors"))
    n = len(TEXT * 3)
    assert acts["transformer.h.0"].shape == (-(-n // 8), 8, 8) and acts["valid"].sum() == n
    assert acts["transformer.h.1.attn.weights"].shape[1:] == (2, 8, 8)
    run(["activations", "--checkpoint", ckpt, "--text", text, "--names", "transformer.h.0.mlp.hidden",
         "--out", work / "acts.npz", "--quiet"])
    assert np.load(work / "acts.npz")["transformer.h.0.mlp.hidden"].shape[-1] == 32
    assert "transformer.h.{0..1}.attn.weights" in run(["activations", "--checkpoint", ckpt, "--list"])
    with pytest.raises(SystemExit):
        main(["activations", "--checkpoint", str(ckpt), "--text", str(text), "--names", "blocks.0", "--out",
              str(work / "x.npz")])
    assert "matches no capture point" in capsys.readouterr().err
    bad = work / "bad.txt"
    bad.write_text("the cat \u00e9", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["activations", "--checkpoint", str(ckpt), "--text", str(bad), "--names", "transformer.h.0",
              "--out", str(work / "x.npz")])
    assert "--skip-unknown" in capsys.readouterr().err


def test_sae_train_and_features_commands(checkpoint):
    work, ckpt, text = checkpoint
    out = run(["sae", "train", "--checkpoint", ckpt, "--text", text, "--point", "transformer.h.1", "--out-dir",
               work / "sae", "--expansion", "4", "--steps", "30", "--batch-size", "64", "--quiet"])
    metrics = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert {"fve", "l0", "dead_fraction"} <= set(metrics["val"]) and "loss_recovered" in metrics["val_loss"]
    sae, source, _ = load_sae(work / "sae")
    assert sae.config.n_features == 32 and source["point"] == "transformer.h.1"
    out = run(["sae", "features", "--sae", work / "sae", "--out", work / "report.txt", "--top-k", "3",
               "--num-features", "5", "--quiet"])
    assert "FVE" in out and "L0" in out
    report = (work / "report.txt").read_text(encoding="utf-8")
    assert report.count("feature ") >= 5 and "[" in report
    run(["sae", "features", "--sae", work / "sae", "--out", work / "report.html", "--features", "0", "1", "--quiet"])
    assert "<b style=" in (work / "report.html").read_text(encoding="utf-8")


def test_sae_train_on_a_point_inside_a_module_keeps_the_sae(checkpoint, capsys):
    """mlp.hidden is read inside the MLP: the spliced loss (which replaces a module's output) is skipped
    with a note, and the trained SAE is written (the error came after training and lost it)."""
    work, ckpt, text = checkpoint
    out = run(["sae", "train", "--checkpoint", ckpt, "--text", text, "--point", "transformer.h.1.mlp.hidden",
               "--out-dir", work / "sae_hidden", "--expansion", "1", "--steps", "5", "--batch-size", "64", "--quiet"])
    metrics = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert "val_loss" not in metrics and "fve" in metrics["val"]
    assert "no spliced loss" in capsys.readouterr().err
    sae, source, _ = load_sae(work / "sae_hidden")
    assert sae.config.d_in == 32 and source["point"] == "transformer.h.1.mlp.hidden"


def test_sae_commands_refuse_bad_counts_before_any_work(checkpoint, capsys):
    """A held-out fraction outside (0, 1) (1.5 once trained on half the text and held out the rest) or a
    held-out part shorter than a window (once found only after training) fails first; counts are checked."""
    work, ckpt, text = checkpoint
    train = ["sae", "train", "--checkpoint", ckpt, "--text", text, "--point", "transformer.h.1", "--steps", "2",
             "--batch-size", "8", "--quiet"]
    for fraction, message in (("1.5", "must be in (0, 1)"), ("0", "must be in (0, 1)"),
                              ("0.001", "held-out part has 6 tokens; the loss metrics need more than one window of 8")):
        with pytest.raises(SystemExit):
            run(train + ["--out-dir", work / f"sae_{fraction}", "--val-fraction", fraction])
        assert message in capsys.readouterr().err
        assert not (work / f"sae_{fraction}").exists()
    for flag, value in (("--top-k", "0"), ("--before", "-3"), ("--num-features", "0")):
        with pytest.raises(SystemExit):
            run(["sae", "features", "--sae", work / "sae", "--out", work / "r.txt", flag, value])
        assert f"argument {flag}: must be an integer" in capsys.readouterr().err

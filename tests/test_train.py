"""The training loop end to end, on tiny models and a tiny generated corpus.

Every run here is a 1-2 layer model with n_embd 16-32 trained for a few dozen
steps on a few hundred characters made in the test, so the whole file runs in
seconds on a shared CPU.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import npflux.train as train_mod
from npflux import optim
from npflux.checkpoint import CheckpointError, load_checkpoint
from npflux.data import prepare_char_dataset
from npflux.models import GPT, GPTConfig
from npflux.train import TrainConfig, evaluate_text, model_from_checkpoint, train

from conftest import host

# A pattern a tiny model learns in a few dozen steps: after the first few
# characters of a line every next character is determined.
TEXT = "".join(f"the {w} sat on the mat.\n" for w in ["cat", "dog", "rat", "bat"] * 12)


@pytest.fixture(scope="module")
def dataset():
    return prepare_char_dataset(TEXT, val_fraction=0.2)


def tiny_model(tokenizer, **kw):
    cfg = dict(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPTConfig(**cfg)


def tiny_train(out_dir, **kw):
    cfg = dict(out_dir=str(out_dir), batch_size=4, max_iters=20, eval_interval=5, eval_iters=2,
               learning_rate=3e-3, checkpoint_interval=0, progress=False, seed=7)
    cfg.update(kw)
    return TrainConfig(**cfg)


def quiet(*_args, **_kw):
    pass


def read_log(out_dir):
    lines = (out_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(np.asarray(host(a[k])), np.asarray(host(b[k]))), f"{k} differs"


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------


def test_train_end_to_end_learns_logs_plots_and_checkpoints(tmp_path, dataset):
    tok, train_ids, val_ids = dataset
    mcfg = tiny_model(tok, n_embd=32)
    cfg = tiny_train(tmp_path, max_iters=60, eval_interval=20, eval_iters=4, learning_rate=1e-2)
    messages = []
    model, state = train(mcfg, cfg, train_ids, val_ids, tokenizer=tok, log=messages.append)

    assert state.step == 60
    log = read_log(tmp_path)
    assert [e["step"] for e in log] == [0, 20, 40, 60]
    for e in log:
        assert set(e) >= {"step", "train_loss", "val_loss", "lr"}
        assert isinstance(e["step"], int)
        for k in ("train_loss", "val_loss", "lr"):
            assert isinstance(e[k], float) and math.isfinite(e[k])
        assert e["lr"] == pytest.approx(1e-2)
    assert log == [{k: v for k, v in e.items()} for e in state.history]
    # At init the loss is about ln(V); a tiny model learns most of this pattern quickly.
    assert log[0]["train_loss"] == pytest.approx(math.log(tok.vocab_size), abs=0.3)
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 1.0
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0

    png = tmp_path / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("parameters" in m for m in messages)

    loaded, loaded_tok, ckpt = model_from_checkpoint(tmp_path / "ckpt")
    assert ckpt.step == 60
    assert loaded.config == mcfg
    assert loaded_tok.decode(loaded_tok.encode(TEXT)) == TEXT
    same_state(loaded.state_dict(), model.state_dict())
    assert ckpt.extra["train_state"]["history"] == log
    # The loaded model computes the same loss as the trained one.
    x = np.asarray([tok.encode("the cat sat on t")])
    y = np.asarray([tok.encode("he cat sat on th")])
    model.eval()
    assert float(loaded.forward(x, y)[1]) == float(model.forward(x, y)[1])


def test_train_rejects_block_size_larger_than_model(tmp_path, dataset):
    tok, train_ids, val_ids = dataset
    with pytest.raises(ValueError, match="block_size 32 exceeds"):
        train(tiny_model(tok), tiny_train(tmp_path, block_size=32), train_ids, val_ids, log=quiet)


def test_train_config_validation():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)


# ---------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def interrupt_after_first_save(monkeypatch):
    """Make train() die right after its first checkpoint, as a killed process would."""
    real = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)


RESUME_CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(dropout=0.2, grad_accum=2, lr_schedule="cosine", warmup_iters=4, grad_clip=1.0,
                      weight_decay=0.1, decay_matrices_only=True), id="dropout-accum-cosine"),
]


@pytest.mark.parametrize("options", RESUME_CASES)
def test_resume_is_bitwise_identical(tmp_path, dataset, monkeypatch, options):
    tok, train_ids, val_ids = dataset
    options = dict(options)
    mcfg = tiny_model(tok, dropout=options.pop("dropout", 0.0))
    kw = dict(max_iters=20, eval_interval=3, checkpoint_interval=10, **options)

    full_model, full_state = train(mcfg, tiny_train(tmp_path / "full", **kw), train_ids, val_ids, log=quiet)

    with monkeypatch.context() as m:
        interrupt_after_first_save(m)
        with pytest.raises(Interrupted):
            train(mcfg, tiny_train(tmp_path / "split", **kw), train_ids, val_ids, log=quiet)
    assert load_checkpoint(tmp_path / "split" / "ckpt").step == 10
    messages = []
    resumed_model, resumed_state = train(mcfg, tiny_train(tmp_path / "split", **kw), train_ids, val_ids,
                                         resume=True, log=messages.append)
    assert any("resumed" in m and "step 10" in m for m in messages)

    assert resumed_state.step == full_state.step == 20
    same_state(resumed_model.state_dict(), full_model.state_dict())

    def losses(history):
        return [(e["step"], e["train_loss"], e["val_loss"], e["lr"]) for e in history]

    assert losses(resumed_state.history) == losses(full_state.history)
    assert [e["step"] for e in full_state.history] == [0, 3, 6, 9, 12, 15, 18, 20]
    # The log file of the resumed run is whole: no lines lost or doubled at the restart.
    assert losses(read_log(tmp_path / "split")) == losses(read_log(tmp_path / "full"))
    # ... and so are the optimizer's moments.
    a = load_checkpoint(tmp_path / "full" / "ckpt").optimizer_state
    b = load_checkpoint(tmp_path / "split" / "ckpt").optimizer_state
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(host(a[k])), np.asarray(host(b[k]))), k


def test_resume_after_a_finished_shorter_run_constant_lr(tmp_path, dataset):
    """With a constant schedule, training 10 steps then resuming to 20 equals training 20."""
    tok, train_ids, val_ids = dataset
    mcfg = tiny_model(tok, dropout=0.1)
    full_model, full_state = train(mcfg, tiny_train(tmp_path / "full", max_iters=20, eval_interval=5),
                                   train_ids, val_ids, log=quiet)
    train(mcfg, tiny_train(tmp_path / "split", max_iters=10, eval_interval=5), train_ids, val_ids, log=quiet)
    resumed_model, resumed_state = train(mcfg, tiny_train(tmp_path / "split", max_iters=20, eval_interval=5),
                                         train_ids, val_ids, resume=True, log=quiet)
    same_state(resumed_model.state_dict(), full_model.state_dict())
    assert [(e["step"], e["val_loss"]) for e in resumed_state.history] == \
           [(e["step"], e["val_loss"]) for e in full_state.history]


# ---------------------------------------------------------------------------
# crash safety
# ---------------------------------------------------------------------------


def test_crash_during_a_later_save_keeps_the_previous_checkpoint(tmp_path, dataset, monkeypatch):
    tok, train_ids, val_ids = dataset
    mcfg = tiny_model(tok)
    kw = dict(max_iters=20, eval_interval=5, checkpoint_interval=5)

    import npflux.checkpoint as ckpt_mod

    real_write = ckpt_mod._write_safetensors
    saves = {"n": 0}

    def failing_write(path, arrays):
        # model.safetensors is the first file of each save; fail the second save halfway through it
        if path.name == ckpt_mod.MODEL_FILE:
            saves["n"] += 1
        if saves["n"] == 2:
            path.write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        return real_write(path, arrays)

    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "_write_safetensors", failing_write)
        with pytest.raises(OSError, match="simulated"):
            train(mcfg, tiny_train(tmp_path / "run", **kw), train_ids, val_ids, log=quiet)

    ckpt_dir = tmp_path / "run" / "ckpt"
    ckpt = load_checkpoint(ckpt_dir)  # hashes checked: the first checkpoint, whole
    assert ckpt.step == 5
    assert not (tmp_path / "run" / "ckpt.tmp").exists()
    model, _, _ = model_from_checkpoint(ckpt_dir)

    resumed_model, state = train(mcfg, tiny_train(tmp_path / "run", **kw), train_ids, val_ids,
                                 resume=True, log=quiet)
    full_model, full_state = train(mcfg, tiny_train(tmp_path / "full", **kw), train_ids, val_ids, log=quiet)
    assert state.step == 20
    same_state(resumed_model.state_dict(), full_model.state_dict())
    assert [e["step"] for e in read_log(tmp_path / "run")] == [0, 5, 10, 15, 20]


# ---------------------------------------------------------------------------
# early stopping
# ---------------------------------------------------------------------------


def test_early_stopping_stops_when_val_does_not_improve(tmp_path, dataset):
    tok, train_ids, _ = dataset
    block = 8
    # Exactly one window fits in the validation set, so every estimate sees the
    # same batch; with learning_rate 0 the model never changes and val never improves.
    val_ids = train_ids[: block + 1].copy()
    messages = []
    cfg = tiny_train(tmp_path, learning_rate=0.0, block_size=block, max_iters=50, eval_interval=5,
                     early_stopping_patience=2)
    model, state = train(tiny_model(tok), cfg, train_ids, val_ids, log=messages.append)

    assert state.step == 10 < cfg.max_iters
    assert [e["step"] for e in state.history] == [0, 5, 10]
    assert len({e["val_loss"] for e in state.history}) == 1
    assert state.evals_since_best == 2
    assert any("early stopping at step 10" in m for m in messages)
    assert load_checkpoint(tmp_path / "ckpt").step == 10
    assert [e["step"] for e in read_log(tmp_path)] == [0, 5, 10]


def test_no_early_stopping_while_val_improves(tmp_path, dataset):
    tok, train_ids, val_ids = dataset
    cfg = tiny_train(tmp_path, learning_rate=1e-2, max_iters=20, eval_interval=5, eval_iters=4,
                     early_stopping_patience=3)
    _, state = train(tiny_model(tok), cfg, train_ids, val_ids, log=quiet)
    assert state.step == 20


# ---------------------------------------------------------------------------
# resume errors
# ---------------------------------------------------------------------------


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, dataset):
    tok, train_ids, val_ids = dataset
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_model(tok), tiny_train(tmp_path / "nothing"), train_ids, val_ids, resume=True, log=quiet)


def test_resume_with_another_model_config_is_a_clear_error(tmp_path, dataset):
    tok, train_ids, val_ids = dataset
    train(tiny_model(tok), tiny_train(tmp_path, max_iters=2, eval_interval=2), train_ids, val_ids, log=quiet)
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="differs"):
        train(tiny_model(tok, n_embd=32), tiny_train(tmp_path, max_iters=4), train_ids, val_ids,
              resume=True, log=quiet)
    # The failed resume touched nothing.
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before


def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(tmp_path, dataset):
    tok, train_ids, val_ids = dataset
    train(tiny_model(tok), tiny_train(tmp_path, max_iters=2, eval_interval=2), train_ids, val_ids, log=quiet)
    path = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        train(tiny_model(tok), tiny_train(tmp_path, max_iters=4), train_ids, val_ids, resume=True, log=quiet)


# ---------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------


def test_grad_accum_equals_one_big_batch(tmp_path, dataset, monkeypatch):
    """grad_accum=2 with batch b gives the gradient (and update) of one batch of 2b."""
    tok, train_ids, val_ids = dataset
    mcfg = tiny_model(tok)
    b, T = 3, 16
    pool = np.random.default_rng(0).integers(0, len(train_ids) - T, size=2 * b)
    windows = train_ids[pool[:, None] + np.arange(T + 1)].astype(np.int64)

    def run(out_dir, batch_size, grad_accum):
        served = {"rows": 0}

        def fixed_batches(data, batch_size, block_size, rng, rows=None):
            rows = windows[served["rows"] : served["rows"] + batch_size]
            served["rows"] += batch_size
            return rows[:, :-1].copy(), rows[:, 1:].copy()

        seen_grads = []
        real_step = optim.AdamW.step

        def recording_step(self, grads):
            seen_grads.append({k: np.array(host(v), copy=True) for k, v in grads.items()})
            return real_step(self, grads)

        with monkeypatch.context() as m:
            m.setattr(train_mod, "estimate_loss", lambda *a, **k: 0.0)  # only training draws batches
            m.setattr(train_mod, "get_batch", fixed_batches)
            m.setattr(optim.AdamW, "step", recording_step)
            cfg = tiny_train(out_dir, batch_size=batch_size, grad_accum=grad_accum, max_iters=1, dtype="float64")
            model, _ = train(mcfg, cfg, train_ids, val_ids, log=quiet)
        assert served["rows"] == 2 * b
        assert len(seen_grads) == 1
        return model, seen_grads[0]

    accum_model, accum_grads = run(tmp_path / "accum", b, 2)
    big_model, big_grads = run(tmp_path / "big", 2 * b, 1)
    assert accum_grads.keys() == big_grads.keys()
    for k in big_grads:
        np.testing.assert_allclose(accum_grads[k], big_grads[k], rtol=1e-9, atol=1e-12, err_msg=k)
    accum_state, big_state = accum_model.state_dict(), big_model.state_dict()
    for k in big_state:
        np.testing.assert_allclose(host(accum_state[k]), host(big_state[k]), rtol=1e-9, atol=1e-12, err_msg=k)
    # ... and it is not trivially so: the first micro-batch alone has another gradient.
    first = GPT(mcfg, seed=7, dtype="float64")
    first.forward(windows[:b, :-1], windows[:b, 1:])
    first.backward()
    assert not np.allclose(host(first.grads["transformer.wte.weight"]), big_grads["transformer.wte.weight"])


# ---------------------------------------------------------------------------
# evaluate_text
# ---------------------------------------------------------------------------


def test_evaluate_text_metrics_are_consistent(dataset):
    tok, _, _ = dataset
    model = GPT(tiny_model(tok), seed=3)
    text = TEXT[:200]
    r = evaluate_text(model, tok, text, batch_size=4)
    assert set(r) >= {"loss", "perplexity", "bits_per_char", "tokens"}
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    # 199 targets in windows of 16: 12 whole windows.
    assert r["tokens"] == 12 * 16
    chars = r["tokens"]  # one character per token for a char tokenizer
    assert r["bits_per_char"] == pytest.approx(r["loss"] * r["tokens"] / (chars * math.log(2)), rel=1e-12)
    assert r["loss"] == pytest.approx(math.log(tok.vocab_size), abs=0.3)  # an untrained model

    # The same number as averaging the model's own loss over the windows by hand.
    ids = np.asarray(tok.encode(text))
    model.eval()
    losses = [float(model.forward(ids[None, i * 16 : i * 16 + 16], ids[None, i * 16 + 1 : i * 16 + 17])[1])
              for i in range(12)]
    assert r["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    # Batching does not change the answer.
    assert evaluate_text(model, tok, text, batch_size=5)["loss"] == pytest.approx(r["loss"], rel=1e-5)


def test_evaluate_text_leaves_the_mode_as_it_was(dataset):
    tok, _, _ = dataset
    model = GPT(tiny_model(tok, dropout=0.5), seed=3)
    model.train()
    a = evaluate_text(model, tok, TEXT[:100])
    assert model.training
    assert evaluate_text(model, tok, TEXT[:100]) == a  # no dropout while evaluating
    model.eval()
    evaluate_text(model, tok, TEXT[:100])
    assert not model.training


def test_evaluate_text_short_text_and_errors(dataset):
    tok, _, _ = dataset
    model = GPT(tiny_model(tok), seed=3)
    r = evaluate_text(model, tok, "the cat")  # shorter than one block
    assert r["tokens"] == 6
    with pytest.raises(ValueError, match="Z"):
        evaluate_text(model, tok, "the ZEBRA sat")
    with pytest.raises(ValueError, match="two tokens"):
        evaluate_text(model, tok, "t")


def test_training_with_the_progress_bar_shows_loss_and_speed(tmp_path, capsys, dataset, monkeypatch):
    """The bar the `npflux train` user sees (every other test trains quietly): it runs, and reports the loss."""
    import time as real_time
    import types

    import npflux.training.gpt as gpt_mod

    clock = iter(range(10**6))  # a clock a second apart per reading, so the bar's loss/speed update is due each step
    monkeypatch.setattr(gpt_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)),
                                                               time=real_time.time))
    tok, train_ids, val_ids = dataset
    model, state = train(tiny_model(tok), tiny_train(tmp_path, max_iters=12, progress=True), train_ids, val_ids,
                         tokenizer=tok, log=quiet)
    assert state.step == 12
    err = capsys.readouterr().err
    assert "12/12" in err and "loss=" in err

"""Issue 17: never lose a trained model, never fail silently.

Each test is one case of the issue, run through ``npflux.cli.main([...])`` on
a tiny model (n_embd 16, one layer, 20 steps on a few hundred characters)
trained once per module and copied where a test changes it:

- output directories are safe: a command refuses, before any work, to replace
  a checkpoint it did not write in this run (another run's, another kind's,
  its own input); ``--overwrite`` keeps the old one as a dated backup until
  the new one is complete; a run's log.jsonl is never cut;
- the divergence guard: a non-finite loss or gradient norm stops training
  with one line, nothing non-finite is written, the last good checkpoint
  stays, the plot marks the step; NaN learning rates are refused up front;
- crash recovery in one place: ``train --resume`` reads what an interrupted
  save left, as ``sample`` and ``eval`` do, with the same warning;
- every refusal before the work.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from npflux.checkpoint import CheckpointError, load_checkpoint, save_gpt, save_sae
from npflux.cli import main
from npflux.models import GPT, GPTConfig
from npflux.models.sae import SAEConfig, SparseAutoencoder

TEXT = "".join(f"the {w} sat on the mat.\n" for w in ["cat", "dog", "rat", "bat"] * 12)
TINY = ["--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--quiet", "--sample-tokens", "0"]
SAE = ["--point", "transformer.h.0", "--expansion", "1", "--steps", "5", "--batch-size", "8", "--quiet"]


def with_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def quietly(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main([str(a) for a in argv])
    return out.getvalue()


def fail(argv, capsys, code=1):
    """Run main(argv), expect a clean failure with exit status ``code``; return its one-line message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def snapshot(directory):
    """Every file under ``directory`` with its bytes (what must not change)."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(text file, a finished 20-step run's directory: ckpt/, log.jsonl, loss.png)."""
    work = tmp_path_factory.mktemp("reliability")
    data = work / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    quietly(["train", "--data", data, "--out-dir", work / "run", *TINY])
    return data, work / "run"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run that a test may change: (text file, run directory)."""
    data, original = trained
    shutil.copytree(original, tmp_path / "run")
    return data, tmp_path / "run"


def train_argv(data, out, *extra):
    return ["train", "--data", data, "--out-dir", out, *TINY, *extra]


# ---------------------------------------------------------------------------
# case 1: a command that would write over its own input, or another kind's checkpoint
# ---------------------------------------------------------------------------


def test_sae_train_refuses_to_write_over_its_input_checkpoint(run, capsys):
    data, out = run
    before = snapshot(out)
    err = fail(["sae", "train", "--checkpoint", out / "ckpt", "--text", data, "--out-dir", out / "ckpt", *SAE],
               capsys)
    assert "input checkpoint" in err and "--out-dir" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before
    assert load_checkpoint(out / "ckpt").kind == "gpt"


def test_sae_train_refuses_another_runs_checkpoint_and_overwrite_replaces_it(run, trained, tmp_path, capsys):
    data, out = run
    other = tmp_path / "other"
    shutil.copytree(out / "ckpt", other)
    before = snapshot(other)
    err = fail(["sae", "train", "--checkpoint", out / "ckpt", "--text", data, "--out-dir", other, *SAE], capsys)
    assert "holds a GPT" in err and "--overwrite" in err and "--out-dir" in err
    assert "--resume" not in err  # sae train cannot resume
    assert snapshot(other) == before
    quietly(["sae", "train", "--checkpoint", out / "ckpt", "--text", data, "--out-dir", other, "--overwrite", *SAE])
    assert load_checkpoint(other).kind == "sae"
    assert not list(tmp_path.glob("other.replaced-*"))  # the backup goes once the new checkpoint is whole


# ---------------------------------------------------------------------------
# case 2: a run without --resume in a directory holding a run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_iters", ["5", "0"])
def test_train_without_resume_refuses_a_directory_holding_a_run(run, capsys, max_iters):
    data, out = run
    before = snapshot(out)
    err = fail(with_flag(train_argv(data, out), "--max-iters", max_iters), capsys)
    assert "holds a GPT (step 20)" in err
    for way in ("--resume", "--overwrite", "--out-dir"):
        assert way in err
    assert snapshot(out) == before
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_train_refuses_a_log_without_a_checkpoint(run, capsys):
    data, out = run
    shutil.rmtree(out / "ckpt")
    log = (out / "log.jsonl").read_bytes()
    err = fail(train_argv(data, out), capsys)
    assert "log.jsonl holds another run's log" in err
    assert (out / "log.jsonl").read_bytes() == log


def test_train_overwrite_replaces_the_run_and_drops_the_backup_when_done(run, capsys):
    data, out = run
    stdout = quietly(with_flag(train_argv(data, out, "--overwrite"), "--max-iters", "5"))
    assert "ckpt.replaced-" in stdout
    assert load_checkpoint(out / "ckpt").step == 5
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 5]
    assert not list(out.glob("*.replaced-*"))


def test_train_overwrite_keeps_the_old_run_while_the_new_one_is_unfinished(run, monkeypatch):
    import npflux.training.gpt as gpt

    data, out = run
    old = snapshot(out / "ckpt")
    calls = []
    real = gpt.train_step

    def killed_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gpt, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        quietly(with_flag(train_argv(data, out, "--overwrite"), "--max-iters", "5"))
    [backup] = out.glob("ckpt.replaced-*")
    assert snapshot(backup) == old and load_checkpoint(backup).step == 20
    [log_backup] = out.glob("log.jsonl.replaced-*")
    assert len(log_backup.read_text().splitlines()) == 3


def test_finetune_refuses_an_existing_adapter_and_its_own_base(run, tmp_path, capsys):
    data, out = run
    argv = ["finetune", "--checkpoint", out / "ckpt", "--data", data, "--lora-rank", "2", "--max-iters", "2",
            "--eval-interval", "2", "--out-dir", tmp_path / "ft", "--quiet", "--sample-tokens", "0"]
    quietly(argv)
    before = snapshot(tmp_path / "ft")
    err = fail(argv, capsys)
    assert "holds a GPT's LoRA adapters" in err and "--overwrite" in err
    assert snapshot(tmp_path / "ft") == before
    quietly([*argv, "--overwrite"])
    assert load_checkpoint(tmp_path / "ft" / "adapter").kind == "gpt-lora"
    base = tmp_path / "b" / "adapter"  # a base whose directory is where --out-dir b would put the adapter
    shutil.copytree(out / "ckpt", base)
    before = snapshot(base)
    for extra in ([], ["--overwrite"]):
        err = fail([*with_flag(with_flag(argv, "--checkpoint", base), "--out-dir", base.parent), *extra], capsys)
        assert "input checkpoint" in err
    assert snapshot(base) == before


def test_seq2seq_train_refuses_another_run(tmp_path):
    from npflux.checkpoint.outdir import OutputRefused
    from npflux.tasks import DateTask
    from npflux.train_seq2seq import Seq2SeqTrainConfig, model_config_for, train_seq2seq

    task = DateTask(seed=0, heldout_size=4)
    mc = model_config_for(task, n_embd=8, n_head=2, n_encoder_layer=1, n_decoder_layer=1)
    cfg = Seq2SeqTrainConfig(out_dir=str(tmp_path / "run"), batch_size=4, max_iters=2, eval_interval=2,
                             eval_size=4, warmup_iters=0, progress=False)
    train_seq2seq(mc, cfg, task, log=lambda *_: None)
    before = snapshot(tmp_path / "run")
    with pytest.raises(OutputRefused, match="holds a seq2seq model"):
        train_seq2seq(mc, cfg, task, log=lambda *_: None)
    assert snapshot(tmp_path / "run") == before
    train_seq2seq(mc, cfg, task, log=lambda *_: None, overwrite=True)


# ---------------------------------------------------------------------------
# case 3: the divergence guard
# ---------------------------------------------------------------------------


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(run, capsys):
    data, out = run
    before = snapshot(out / "ckpt")
    argv = with_flag(train_argv(data, out, "--resume", "--learning-rate", "1e6"), "--max-iters", "60")
    err = fail(argv, capsys)
    assert "training diverged at step" in err and "not finite" not in err
    assert "the last good checkpoint" in err and "(step 20)" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(out / "ckpt") == before  # nothing written after it: the step-20 checkpoint stays
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "diverged" in last and last["step"] > 20
    assert (out / "loss.png").is_file()
    capsys.readouterr()
    main(["sample", "--checkpoint", str(out / "ckpt"), "--max-new-tokens", "5", "--seed", "0"])  # still loads


def test_a_run_that_saves_until_it_diverges_keeps_its_last_finite_checkpoint(run, capsys):
    data, out = run
    argv = with_flag(train_argv(data, out, "--resume", "--learning-rate", "1e6", "--checkpoint-interval", "1"),
                     "--max-iters", "60")
    err = fail(argv, capsys)
    from npflux.train import model_from_checkpoint

    _, _, saved = model_from_checkpoint(out / "ckpt")  # loading into the model checks every array is finite
    assert f"diverged at step {saved.step}:" in err and f"(step {saved.step}) is kept" in err and saved.step > 20


def test_a_run_that_diverges_before_its_first_checkpoint_says_how_to_start_again(trained, tmp_path, capsys):
    data, _ = trained
    err = fail(train_argv(data, tmp_path / "o", "--learning-rate", "1e6"), capsys)
    assert "training diverged at step" in err and "no checkpoint was written" in err and "--overwrite" in err
    assert not (tmp_path / "o" / "ckpt").exists()
    assert "diverged" in json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[-1])


def test_train_step_stops_on_a_non_finite_loss_or_gradient_before_stepping():
    from npflux import optim
    from npflux.training import Diverged, train_step

    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
    x = np.random.default_rng(0).integers(0, 13, (2, 8))
    model = GPT(cfg, seed=0)
    model.params["transformer.wte.weight"][0, 0] = np.nan
    model.params["transformer.wte.weight"][x[0, 0]] = np.nan
    before = {k: v.copy() for k, v in model.params.items()}
    opt = optim.AdamW(model.params, lr=1e-2)
    with pytest.raises(Diverged, match="the loss is nan"):
        train_step(model, opt, [(x, x)])
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])  # the optimizer did not step

    model = GPT(cfg, seed=0)
    opt = optim.AdamW(model.params, lr=1e-2)

    def infinite_backward(scale):
        model.backward(loss_scale=scale)
        model.grads["lm_head.weight" if "lm_head.weight" in model.grads else "transformer.wte.weight"][0, 0] = np.inf

    with pytest.raises(Diverged, match="gradient norm is inf"):
        train_step(model, opt, [(x, x)], backward=infinite_backward)
    with pytest.raises(Diverged, match="gradient norm"):
        train_step(model, opt, [(x, x)], backward=infinite_backward, grad_clip=1.0)


def test_a_model_checkpoint_with_non_finite_values_is_never_written(tmp_path):
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
    good = GPT(cfg, seed=0)
    save_gpt(tmp_path / "ckpt", good)
    before = snapshot(tmp_path / "ckpt")
    bad = GPT(cfg, seed=1)
    bad.params["transformer.ln_f.weight"][3] = np.inf
    with pytest.raises(CheckpointError, match=r"ln_f\.weight holds values that are not finite"):
        save_gpt(tmp_path / "ckpt", bad)
    assert snapshot(tmp_path / "ckpt") == before


def test_the_loss_plot_marks_where_training_diverged():
    import matplotlib.pyplot as plt

    from npflux.training.loop import loss_figure

    history = [{"step": 0, "train_loss": 2.5, "val_loss": 2.6}, {"step": 10, "train_loss": 1.5, "val_loss": 1.7},
               {"step": 20, "train_loss": math.nan, "val_loss": math.nan}]
    fig = loss_figure(history)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    plt.close(fig)
    assert "diverged at step 20" in labels
    fig = loss_figure(history[:2] + [{"step": 13, "diverged": "the loss is nan"}])
    assert "diverged at step 13" in [line.get_label() for line in fig.axes[0].get_lines()]
    plt.close(fig)


@pytest.mark.parametrize("argv", [
    ["train", "--learning-rate", "nan"],
    ["train", "--learning-rate", "inf"],
    ["train", "--min-lr", "nan"],
    ["sae", "train", "--checkpoint", "x", "--out-dir", "y", "--lr", "nan"],
    ["finetune", "--checkpoint", "x", "--data", "y", "--learning-rate", "nan"],
    ["seq2seq", "train", "--learning-rate", "nan"],
], ids=["train", "train-inf", "train-min-lr", "sae", "finetune", "seq2seq"])
def test_nan_learning_rates_are_refused_up_front(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = fail(argv, capsys, code=2)
    assert "must be a finite number" in err
    assert not any(tmp_path.iterdir())


def test_the_library_refuses_nan_learning_rates_too():
    from npflux.finetune import FinetuneConfig
    from npflux.interp import train_sae
    from npflux.train import TrainConfig

    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="learning_rate must be a finite number"):
            TrainConfig(learning_rate=bad)  # (0 is allowed: a frozen run, as test_train's early stopping uses)
        with pytest.raises(ValueError, match="learning_rate must be a finite number"):
            FinetuneConfig(learning_rate=bad)
        with pytest.raises(ValueError, match="lr must be a finite number"):
            train_sae(SparseAutoencoder(SAEConfig(4, 8)), np.ones((16, 4), np.float32), steps=1, batch_size=4, lr=bad)
    with pytest.raises(ValueError, match="beta2"):
        TrainConfig(beta2=math.nan)


# ---------------------------------------------------------------------------
# case 4: --resume after an interrupted save recovers what sample and eval recover
# ---------------------------------------------------------------------------


def interrupt_the_swap(ckpt):
    """What a kill between atomic_directory's two renames leaves: no ckpt, the previous one in a hidden .old."""
    stranded = ckpt.with_name(f".{ckpt.name}.0123abcd.old")
    ckpt.rename(stranded)
    return stranded


def test_resume_recovers_an_interrupted_save_as_sample_and_eval_do(run, capsys):
    data, out = run
    interrupt_the_swap(out / "ckpt")
    with pytest.warns(UserWarning, match="a save was interrupted") as sample_warning:
        main(["sample", "--checkpoint", str(out / "ckpt"), "--max-new-tokens", "5", "--seed", "0"])
    with pytest.warns(UserWarning, match="a save was interrupted") as resume_warning:
        stdout = quietly(with_flag(train_argv(data, out, "--resume"), "--max-iters", "30"))
    assert str(resume_warning[0].message) == str(sample_warning[0].message)  # the same warning
    assert "resumed from" in stdout and "at step 20" in stdout
    assert load_checkpoint(out / "ckpt").step == 30
    assert not list(out.glob(".ckpt.*"))  # the stranded version was put back, then replaced


def test_after_an_interrupted_save_a_run_without_resume_refuses(run, capsys):
    data, out = run
    stranded = interrupt_the_swap(out / "ckpt")
    before = snapshot(stranded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = fail(train_argv(data, out), capsys)
    assert "holds a GPT (step 20)" in err and "--resume" in err
    assert snapshot(stranded) == before


def test_resume_refuses_another_kind(tmp_path, trained, capsys):
    data, _ = trained
    save_sae(tmp_path / "o" / "ckpt", SparseAutoencoder(SAEConfig(4, 8)), source={})
    err = fail(train_argv(data, tmp_path / "o", "--resume"), capsys)
    assert "holds a sparse autoencoder" in err and "not a GPT's training checkpoint" in err


# ---------------------------------------------------------------------------
# every refusal before the work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_refuses_a_directory_of_other_files_before_the_first_step(trained, tmp_path, capsys, monkeypatch,
                                                                         overwrite):
    import npflux.training.gpt as gpt

    data, _ = trained
    (tmp_path / "o" / "ckpt").mkdir(parents=True)
    (tmp_path / "o" / "ckpt" / "notes.txt").write_text("x")
    monkeypatch.setattr(gpt, "train_step", lambda *a, **k: pytest.fail("a step was taken before the refusal"))
    err = fail(train_argv(data, tmp_path / "o", *overwrite), capsys)
    assert "is not empty and is not an npflux checkpoint" in err and "--out-dir" in err
    assert (tmp_path / "o" / "ckpt" / "notes.txt").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ckpt"]  # no log.jsonl, no loss.png


def test_sae_train_refuses_a_non_empty_directory_before_reading_the_model(run, tmp_path, capsys, monkeypatch):
    import npflux.cli.interp as interp

    data, out = run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    monkeypatch.setattr(interp, "_load_model", lambda *a: pytest.fail("the model was read before the refusal"))
    err = fail(["sae", "train", "--checkpoint", out / "ckpt", "--text", data, "--out-dir", tmp_path / "notes", *SAE],
               capsys)
    assert "not an npflux checkpoint" in err
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


# --------------------------------------------------------------------------
# one line per bad input, never a traceback; no silent garbage (issue 17)
# --------------------------------------------------------------------------
GPT_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoints" / "gpt"


def _exit_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, err[-1] if err else ""


@pytest.mark.parametrize("flag,value,says", [("--num-samples", "0", "whole number >= 1"),
                                             ("--temperature", "nan", "finite number >= 0"),
                                             ("--temperature", "-1", "finite number >= 0"),
                                             ("--top-p", "1.5", "in (0, 1]"), ("--top-p", "nan", "in (0, 1]"),
                                             ("--top-k", "0", "whole number >= 1")])
def test_sample_refuses_bad_sampling_arguments_in_one_line(flag, value, says, capsys):
    """They used to exit 0 with empty output (--num-samples 0, --temperature nan)."""
    code, last = _exit_message(["sample", "--checkpoint", str(GPT_FIXTURE), flag, value], capsys)
    assert code == 2 and says in last and flag in last


def test_a_missing_cupy_is_one_line_not_a_traceback(capsys):
    from npflux.backend import cupy_available

    if cupy_available():
        pytest.skip("CuPy and a GPU are available here")
    code, last = _exit_message(["sample", "--checkpoint", str(GPT_FIXTURE), "--backend", "cupy"], capsys)
    assert code == 1 and last.startswith("npflux sample: error: backend 'cupy' needs CuPy")


def test_version(capsys):
    import npflux

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"npflux {npflux.__version__}"


def test_top_p_of_one_keeps_every_token():
    """The mass before a token (cumsum(p) - p) rounds to 1.0 for the least likely ones: top_p = 1 must keep them."""
    from npflux.generate import filter_logits

    logits = np.array([[0.0, -40.0, -41.0, -42.0]])
    assert np.array_equal(filter_logits(logits, top_p=1.0), logits)
    kept = filter_logits(logits, top_p=0.5)
    assert np.isfinite(kept[0, 0]) and np.isinf(kept[0, 1:]).all()  # a real nucleus still cuts


@pytest.mark.parametrize("field,value", [("n_embd", "64"), ("n_layer", 2.5), ("dropout", "0.1"), ("bias", 1)])
def test_a_meta_json_field_of_the_wrong_type_is_one_line(tmp_path, capsys, field, value):
    """A re-typed config field (n_embd "64") used to end in a TypeError traceback deep in the model."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(GPT_FIXTURE, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"][field] = value
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, last = _exit_message(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "2"], capsys)
    assert code == 1 and f"GPTConfig.{field} must be" in last


def test_a_safetensors_header_retyped_to_integers_is_refused_not_cast(tmp_path, capsys):
    """F32 -> I32 in the header (the hash updated to match) used to be cast to float32 and sample garbage."""
    import hashlib
    import struct

    ckpt = tmp_path / "ckpt"
    shutil.copytree(GPT_FIXTURE, ckpt)
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "I32"  # the same 4 bytes per value, read as integers
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the offsets stay right
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["model.safetensors"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, last = _exit_message(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "2"], capsys)
    assert code == 1 and "int32, not a floating-point array" in last, last


@pytest.mark.parametrize("damage,says", [
    (lambda m: m.__setitem__("rng_state", {"batch": "garbage"}), "batch sampler state"),
    (lambda m: m.__setitem__("extra", None), "training state"),
    (lambda m: m.__setitem__("step", -5), "has step -5"),  # used to resume silently at step 0
    (lambda m: m.__setitem__("step", "5"), "has step '5'"),
], ids=["rng-garbage", "extra-null", "step-negative", "step-string"])
def test_resume_from_a_damaged_meta_json_is_one_line(run, capsys, damage, says):
    data, out = run
    meta_path = out / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    damage(meta)
    meta_path.write_text(json.dumps(meta))
    err = fail(with_flag(train_argv(data, out, "--resume"), "--max-iters", "30"), capsys)
    assert says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra,says", [
    (["--val-fraction", "0"], "--val-fraction: must be a finite number in (0, 1)"),
    (["--vocab-size", "50"], "--vocab-size sets the BPE vocabulary"),  # was silently ignored
    (["--dtype", "int8"], "invalid choice: 'int8'"),                   # was a TypeError traceback
], ids=["val-fraction-0", "vocab-size-with-char", "dtype-int8"])
def test_train_refuses_bad_arguments_before_the_work(trained, tmp_path, capsys, extra, says):
    data, _ = trained
    err = fail(train_argv(data, tmp_path / "o", *extra), capsys, code=2 if "--vocab-size" not in extra else 1)
    assert says in err
    assert not (tmp_path / "o").exists()


def test_data_errors_name_the_file_and_what_to_do(trained, tmp_path, capsys):
    data, _ = trained
    err = fail(train_argv(data.parent, tmp_path / "o"), capsys)  # a directory, not a file
    assert "is a directory; give the text file itself" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1") * 50)
    err = fail(train_argv(latin1, tmp_path / "o"), capsys)
    assert f"{latin1} is not UTF-8 text" in err and "iconv" in err


# ---------------------------------------------------------------------------
# resume below the checkpoint's step; a model mismatch names its fields; sampling needs no optimizer
# ---------------------------------------------------------------------------


def test_resume_with_max_iters_below_the_checkpoint_refuses_and_writes_nothing(run, capsys):
    data, out = run
    before = snapshot(out)
    err = fail(with_flag(train_argv(data, out, "--resume"), "--max-iters", "5"), capsys)
    assert "is at step 20, beyond --max-iters 5" in err and len(err.strip().splitlines()) == 1
    # equal to the step: nothing to train, and nothing is written either
    stdout = quietly(with_flag(train_argv(data, out, "--resume", "--sample-tokens", "0"), "--max-iters", "20"))
    assert "nothing to train" in stdout
    assert snapshot(out) == before


def test_resume_with_another_model_names_the_fields_that_differ(run, capsys):
    data, out = run
    err = fail(train_argv(data, out, "--resume", "--n-embd", "32"), capsys)
    assert "n_embd 16 (asked: 32)" in err and "n_layer" not in err and len(err) < 300


def test_sample_loads_a_checkpoint_shipped_without_its_optimizer_state(run, capsys):
    _, out = run
    full = quietly(["sample", "--checkpoint", out / "ckpt", "--max-new-tokens", "12", "--seed", "2"])
    (out / "ckpt" / "optimizer.safetensors").unlink()
    assert quietly(["sample", "--checkpoint", out / "ckpt", "--max-new-tokens", "12", "--seed", "2"]) == full
    # resuming does need it, and says so
    assert "optimizer.safetensors" in fail(with_flag(train_argv(*run, "--resume"), "--max-iters", "30"), capsys)


def test_a_cosine_warmup_longer_than_the_run_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    """npflux train --preset nanogpt-cpu --max-iters 30 (warmup 100) failed at its first step, after claiming
    the output directory: it left an empty log.jsonl that the next run refused."""
    data, _ = trained
    out = tmp_path / "cosine"
    argv = with_flag(train_argv(data, out, "--lr-schedule", "cosine", "--warmup-iters", "100"), "--max-iters", "30")
    err = fail(argv, capsys)
    assert "warmup_iters 100" in err and "--warmup-iters" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    quietly(with_flag(train_argv(data, out, "--lr-schedule", "cosine", "--warmup-iters", "5"), "--max-iters", "30"))
    assert (out / "ckpt").is_dir()


def test_a_short_reader_run_warms_up_over_a_tenth_of_it():
    from npflux.training.reader import ReaderTrainConfig

    assert ReaderTrainConfig(steps=30).warmup_iters == 3
    assert ReaderTrainConfig(steps=3000).warmup_iters == 100
    with pytest.raises(ValueError, match="warmup_iters"):
        ReaderTrainConfig(steps=30, warmup_iters=31)

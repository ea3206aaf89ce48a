"""The ``npflux`` command line, called in-process through ``main([...])``.

One tiny model is trained once per module (20 steps, n_embd 16, one layer,
on a few hundred characters written by the test) and shared by the sample
and eval tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npflux.cli import main
from npflux.train import model_from_checkpoint

TEXT = "".join(f"the {w} sat on the mat.\n" for w in ["cat", "dog", "rat", "bat"] * 12)
TINY = ["--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--quiet", "--sample-tokens", "20"]


def fail(argv, capsys):
    """Run main(argv), expect a clean failure, return the message it printed."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work dir, text file, checkpoint dir, stdout of the train command)."""
    work = tmp_path_factory.mktemp("cli")
    data = work / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = work / "tmp"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["train", "--data", str(data), "--out-dir", str(out), *TINY])
    return work, data, out / "ckpt", buf.getvalue()


def test_train_writes_checkpoint_log_plot_and_sample(trained):
    work, data, ckpt, stdout = trained
    assert f"data: {data}" in stdout
    assert f"{len(TEXT):,} characters" in stdout
    assert "step 20:" in stdout
    log = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 10, 20]
    assert (ckpt.parent / "loss.png").is_file()
    model, tok, c = model_from_checkpoint(ckpt)
    assert c.step == 20
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer, model.config.block_size) == (16, 2, 1, 16)
    assert model.config.vocab_size == tok.vocab_size == len(set(TEXT))
    assert model.config.init == "torch"  # the shakespeare-s1 preset's: the published model's init
    assert c.config["train"]["batch_size"] == 4 and c.config["train"]["progress"] is False
    # The last lines are the 20-token sample: prompt "\n" plus 20 characters of the corpus's alphabet.
    sample = stdout.split("loss.png\n", 1)[1]
    assert sample.startswith("\n") and len(sample) == 1 + 20 + 1  # print adds the final newline
    assert set(sample) <= set(TEXT)


def test_train_resume_continues_the_run(trained, capsys):
    work, data, ckpt, _ = trained
    out = work / "resumed"
    shutil.copytree(ckpt.parent, out)
    argv = ["train", "--data", str(data), "--out-dir", str(out), *TINY]
    argv[argv.index("--max-iters") + 1] = "30"
    main([*argv, "--resume"])
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "at step 20" in stdout
    _, _, c = model_from_checkpoint(out / "ckpt")
    assert c.step == 30
    assert [e["step"] for e in c.extra["train_state"]["history"]] == [0, 10, 20, 30]


def sample(ckpt, capsys, *extra):
    main(["sample", "--checkpoint", str(ckpt), "--prompt", "the ", "--max-new-tokens", "40", *extra])
    return capsys.readouterr().out


def test_sample_is_reproducible_with_a_seed(trained, capsys):
    ckpt = trained[2]
    a = sample(ckpt, capsys, "--seed", "1")
    b = sample(ckpt, capsys, "--seed", "1")
    c = sample(ckpt, capsys, "--seed", "2")
    assert a == b
    assert a != c
    assert a.startswith("the ") and len(a) == len("the ") + 40 + 1
    assert set(a) <= set(TEXT)


def test_sample_temperature_zero_is_greedy_and_deterministic(trained, capsys):
    ckpt = trained[2]
    a = sample(ckpt, capsys, "--temperature", "0", "--seed", "1")
    b = sample(ckpt, capsys, "--temperature", "0", "--seed", "99")
    assert a == b
    # Greedy: the same text as taking the argmax by hand.
    model, tok, _ = model_from_checkpoint(ckpt)
    ids = model.generate(np.asarray([tok.encode("the ")]), 40, temperature=0)
    assert a == tok.decode(ids[0].tolist()) + "\n"


def test_sample_num_samples_and_top_k(trained, capsys):
    ckpt = trained[2]
    out = sample(ckpt, capsys, "--seed", "3", "--num-samples", "2", "--top-k", "1")
    one = len("the ") + 40 + 1
    # each sample under a header of its own: samples may hold blank lines, so nothing else tells them apart
    first, second = (f"=== sample {i} of 2 ===\n" for i in (1, 2))
    assert out.startswith(first) and len(out) == 2 * one + len(first) + len(second)
    texts = out[len(first):].split(second)
    # top-k 1 is greedy too: both samples are the greedy text.
    assert texts[0] == texts[1] == sample(ckpt, capsys, "--temperature", "0")
    # Without top-k the two samples use seeds 3 and 4: the first equals a single run with seed 3.
    two = sample(ckpt, capsys, "--seed", "3", "--num-samples", "2")[len(first):].split(second)
    assert two[0] == sample(ckpt, capsys, "--seed", "3")
    assert two[1] == sample(ckpt, capsys, "--seed", "4")


def test_eval_prints_json_metrics(trained, capsys):
    work, data, ckpt, _ = trained
    main(["eval", "--checkpoint", str(ckpt), "--text", str(data)])
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"loss", "perplexity", "bits_per_char"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["bits_per_char"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)  # one char per token
    # 20 steps do better than a uniform guess over the vocabulary.
    assert result["loss"] < math.log(len(set(TEXT)))


def test_eval_unknown_character_is_a_clear_error(trained, capsys, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("the ZEBRA sat on the mat\n", encoding="utf-8")
    err = fail(["eval", "--checkpoint", str(trained[2]), "--text", str(other)], capsys)
    assert "not in the vocabulary" in err and "'Z'" in err


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_corpus.txt"
    err = fail(["train", "--data", str(missing), "--out-dir", str(tmp_path / "o"), *TINY], capsys)
    assert str(missing) in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_preset_is_a_clear_error(trained, tmp_path, capsys):
    err = fail(["train", "--data", str(trained[1]), "--preset", "shakespeare-xl", "--out-dir", str(tmp_path), *TINY],
               capsys)
    # refused by argparse, before any data is read, with the presets there are
    assert "invalid choice: 'shakespeare-xl'" in err and "shakespeare-s1" in err
    assert "shakespeare-s1" in capsys_help(["train", "--help"], capsys)  # --help lists them too


def capsys_help(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def test_every_flag_has_help():
    """``npflux X --help`` explains every option of every command (none shows a bare FLAG FLAG line)."""
    import argparse

    from npflux.cli import build_parser

    bare = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif not action.help and action.dest != "help":
                bare.append(" ".join(prefix + [action.option_strings[0] if action.option_strings else action.dest]))

    walk(build_parser(), ["npflux"])
    assert not bare, f"options without help: {bare}"


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(trained[2], bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    err = fail(["sample", "--checkpoint", str(bad), "--seed", "1"], capsys)
    assert str(weights) in err and "damaged" in err
    err = fail(["eval", "--checkpoint", str(bad), "--text", str(trained[1])], capsys)
    assert "damaged" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    err = fail(["sample", "--checkpoint", str(tmp_path / "nowhere")], capsys)
    assert "no checkpoint" in err and str(tmp_path / "nowhere") in err


def test_resume_errors(trained, tmp_path, capsys):
    work, data, ckpt, _ = trained
    err = fail(["train", "--data", str(data), "--out-dir", str(tmp_path / "fresh"), "--resume", *TINY], capsys)
    assert "no checkpoint" in err
    shutil.copytree(ckpt.parent, tmp_path / "other")
    argv = ["train", "--data", str(data), "--out-dir", str(tmp_path / "other"), "--resume", *TINY]
    argv[argv.index("--n-embd") + 1] = "32"
    err = fail(argv, capsys)
    assert "differs" in err


def test_train_on_text_without_newline(tmp_path, capsys):
    """The end-of-training sample must not prompt with a character the text lacks."""
    data = tmp_path / "abc.txt"
    data.write_text("abcd" * 60, encoding="utf-8")
    argv = ["train", "--data", str(data), "--out-dir", str(tmp_path / "o"), *TINY]
    argv[argv.index("--max-iters") + 1] = "2"
    main(argv)
    sample_text = capsys.readouterr().out.split("loss.png\n", 1)[1]
    assert sample_text.startswith("a") and set(sample_text) <= set("abcd\n")


def test_bad_argument_is_an_argparse_error(capsys):
    err = fail(["train", "--max-iters", "many"], capsys)
    assert "invalid int value" in err
    err = fail(["frobnicate"], capsys)
    assert "invalid choice" in err


def test_debug_env_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("NPFLUX_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no_such"):
        main(["train", "--data", str(tmp_path / "no_such.txt")])


def test_module_help_in_a_subprocess():
    env = dict(os.environ)
    env.pop("NPFLUX_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "npflux.cli", "--help"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    for command in ("train", "sample", "eval", "gradcheck"):
        assert command in r.stdout
    r = subprocess.run([sys.executable, "-m", "npflux.cli", "sample", "--checkpoint", "/nonexistent/npflux-ckpt"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "/nonexistent/npflux-ckpt" in r.stderr and "Traceback" not in r.stderr


def test_train_init_option_reaches_the_model(trained, tmp_path):
    work, data, _, _ = trained
    with contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--data", str(data), "--out-dir", str(tmp_path / "o"), "--init", "normal", *TINY])
    model, _, _ = model_from_checkpoint(tmp_path / "o" / "ckpt")
    assert model.config.init == "normal"


def test_bench_outside_a_checkout_says_where_the_benchmarks_are(monkeypatch, tmp_path, capsys):
    """The benchmark code is not in the installed package: `npflux bench` says so, in one line."""
    from npflux.cli import bench

    monkeypatch.setattr(bench, "REPO_BENCHMARKS", tmp_path / "benchmarks")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-torch"])
    assert "not installed with the package" in str(exc.value.code)
    assert "benchmarks/bench_train_step.py" in str(exc.value.code)


def test_bench_runs_the_repository_harness(monkeypatch, tmp_path):
    """From a checkout, `npflux bench` runs benchmarks/bench_train_step.py in a subprocess with its flags."""
    from npflux.cli import bench

    calls = []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-torch", "--threads", "2", "--reps", "3", "--json", str(tmp_path / "r.json")])
    assert exc.value.code == 0
    cmd = calls[0]
    assert cmd[1].endswith("benchmarks/bench_train_step.py") and Path(cmd[1]).is_file()
    assert cmd[cmd.index("--threads") + 1] == "2" and cmd[cmd.index("--steps") + 1] == "3"
    assert "--no-torch" in cmd and cmd[cmd.index("--out") + 1] == str(tmp_path / "r.json")

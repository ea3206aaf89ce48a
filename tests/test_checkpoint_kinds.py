"""The registry of checkpoint kinds: old checkpoints still load, new ones say their kind, a wrong kind is one clear line.

tests/fixtures/checkpoints/ holds one small checkpoint of each kind written
before meta.json had a ``kind`` (by tests/fixtures/make_checkpoints.py at
commit 53d134e), and ``expected.safetensors``: what each model computed then.
"""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import npflux.checkpoint as ckpt_mod
from npflux.backend import to_numpy
from npflux.checkpoint import (
    GPT_KINDS, KINDS, CheckpointError, WrongKind, kind_at, load_checkpoint, load_model, save_adapter, save_checkpoint,
    save_distilled, save_gpt, save_quantized, save_reader, save_sae, save_seq2seq,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"
EXPECTED = safetensors.numpy.load_file(str(FIXTURES / "expected.safetensors"))
PROMPT = "To be, o"  # make_checkpoints.PROMPT: the GPT fixtures' outputs are their logits on it
# Kinds added after meta.json had a "kind": no checkpoint of theirs was ever written without one,
# so they have no old fixture (their own tests save and load them: tests/test_distill.py, tests/test_reader.py).
BORN_WITH_KIND = {"gpt-distilled", "reader"}
OLD_KINDS = [k for k in KINDS if k not in BORN_WITH_KIND]


def load_fixture(kind, **kw):
    """The fixture of ``kind``; the adapter's base is the gpt fixture wherever this checkout lies."""
    if kind == "gpt-lora":
        kw.setdefault("base_checkpoint", FIXTURES / "gpt")
    return load_model(FIXTURES / kind, **kw)


def outputs(kind, model, tokenizer):
    """What the fixture's expected.safetensors records for ``kind``, computed by ``model``."""
    model.eval()
    if kind in GPT_KINDS:
        return {"logits": model.forward(np.asarray([tokenizer.encode(PROMPT)]))[0]}
    if kind == "seq2seq":
        return {"logits": model.forward(EXPECTED["seq2seq.src"], EXPECTED["seq2seq.tgt"])[0]}
    x_hat = model.forward(model.backend.asarray(EXPECTED["sae.input"]))  # (float input: on the model's device)
    return {"x_hat": x_hat, "features": model.features}


def fresh_save(kind, model, tokenizer, ckpt, directory, base=FIXTURES / "gpt"):
    """Save what a fixture loaded with today's save for its kind (the function KINDS names)."""
    save = KINDS[kind].save
    if kind == "gpt":
        return save(directory, model, tokenizer, train=ckpt.config["train"])
    if kind == "gpt-int8":
        config = {k: v for k, v in ckpt.config.items() if k != "quantization"}
        return save(directory, model, config, tokenizer=ckpt.tokenizer)
    if kind == "gpt-lora":
        adapter = ckpt.config["adapter"]
        lora = {k: adapter[k] for k in ("rank", "alpha", "targets", "seed")}
        return save(directory, model, base, lora, tokenizer=ckpt.tokenizer)
    if kind == "seq2seq":
        return save(directory, model, tokenizer)
    return save(directory, model, ckpt.config["source"], ckpt.extra["metrics"])


def test_there_is_a_fixture_and_a_save_of_every_kind():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(OLD_KINDS)
    saves = {"gpt": save_gpt, "gpt-int8": save_quantized, "gpt-lora": save_adapter, "seq2seq": save_seq2seq,
             "sae": save_sae, "gpt-distilled": save_distilled, "reader": save_reader}
    assert {name: kind.save for name, kind in KINDS.items()} == saves


@pytest.mark.parametrize("kind", OLD_KINDS)
def test_a_checkpoint_written_before_kind_existed_loads_and_computes_what_it_did(kind):
    meta = json.loads((FIXTURES / kind / "meta.json").read_text())
    assert "kind" not in meta  # written by the code before the registry
    assert kind_at(FIXTURES / kind) == kind  # inferred from the config
    model, tokenizer, ckpt = load_fixture(kind)
    assert ckpt.kind == kind
    assert (tokenizer is None) == (kind == "sae")
    for name, got in outputs(kind, model, tokenizer).items():
        np.testing.assert_allclose(to_numpy(got), EXPECTED[f"{kind}.{name}"], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", OLD_KINDS)
def test_a_fresh_save_carries_its_kind_and_computes_the_same(tmp_path, kind):
    model, tokenizer, ckpt = load_fixture(kind)
    before = outputs(kind, model, tokenizer)
    directory = fresh_save(kind, model, tokenizer, ckpt, tmp_path / kind)
    assert json.loads((directory / "meta.json").read_text())["kind"] == kind
    again, tokenizer2, ckpt2 = load_model(directory)
    assert ckpt2.kind == kind and tokenizer2 == tokenizer
    for name, got in outputs(kind, again, tokenizer2).items():
        np.testing.assert_array_equal(to_numpy(got), to_numpy(before[name]), err_msg=name)


def test_a_distilled_gpt_is_a_gpt_that_names_its_teacher(tmp_path):
    model, tokenizer, ckpt = load_fixture("gpt")
    distill = {"temperature": 2.0, "alpha": 0.5, "teacher": {"model": ckpt.config["model"]}}
    directory = save_distilled(tmp_path / "student", model, distill, tokenizer=tokenizer, train=ckpt.config["train"])
    assert kind_at(directory) == "gpt-distilled"
    again, tokenizer2, ckpt2 = load_model(directory, expect=GPT_KINDS)
    assert ckpt2.config["distill"] == distill and tokenizer2 == tokenizer
    np.testing.assert_array_equal(to_numpy(outputs("gpt", again, tokenizer2)["logits"]),
                                  to_numpy(outputs("gpt", model, tokenizer)["logits"]))
    meta = json.loads((directory / "meta.json").read_text())
    del meta["kind"]  # the config alone still says what it is
    from npflux.checkpoint import infer_kind
    assert infer_kind(meta["config"]) == "gpt-distilled"


def test_train_writes_the_gpt_kind(tmp_path):
    from npflux.models import GPTConfig
    from npflux.tokenizers import CharTokenizer
    from npflux.train import TrainConfig, train

    tok = CharTokenizer.from_text("abcdefgh" * 8)
    ids = np.asarray(tok.encode("abcdefgh" * 8), dtype=np.int64)
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=2, max_iters=1, eval_interval=1, eval_iters=1, progress=False)
    train(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8), cfg, ids, ids, tok, log=lambda *_: None)
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["kind"] == "gpt"
    assert load_checkpoint(tmp_path / "ckpt").kind == "gpt"


def test_an_adapter_and_its_base_moved_together_still_load(tmp_path):
    model, tokenizer, ckpt = load_fixture("gpt-lora")
    shutil.copytree(FIXTURES / "gpt", tmp_path / "a" / "base")
    fresh_save("gpt-lora", model, tokenizer, ckpt, tmp_path / "a" / "adapter", base=tmp_path / "a" / "base")
    (tmp_path / "a").rename(tmp_path / "b")  # both moved: the absolute path is gone, the relative one holds
    moved, _, _ = load_model(tmp_path / "b" / "adapter")
    np.testing.assert_array_equal(to_numpy(outputs("gpt-lora", moved, tokenizer)["logits"]),
                                  to_numpy(outputs("gpt-lora", model, tokenizer)["logits"]))
    shutil.rmtree(tmp_path / "b" / "base")
    with pytest.raises(CheckpointError, match="not there"):
        load_model(tmp_path / "b" / "adapter")


# ---------------------------------------------------------------------------
# a wrong kind is one line naming the kind found and the command to use
# ---------------------------------------------------------------------------


def one_line_error(call, *args, **kw):
    with pytest.raises(WrongKind) as info:
        call(*args, **kw)
    message = str(info.value)
    assert "\n" not in message and str(args[0]) in message
    return message


def test_a_wrong_kind_is_a_one_line_error_naming_the_command():
    from npflux.finetune import load_adapter
    from npflux.interp import load_sae
    from npflux.train import model_from_checkpoint
    from npflux.train_seq2seq import load_seq2seq

    message = one_line_error(model_from_checkpoint, FIXTURES / "sae")
    assert "'sae'" in message and "not a GPT" in message and f"npflux sae features --sae {FIXTURES / 'sae'}" in message
    message = one_line_error(model_from_checkpoint, FIXTURES / "seq2seq")
    assert "'seq2seq'" in message and "npflux seq2seq decode --checkpoint" in message
    message = one_line_error(load_seq2seq, FIXTURES / "gpt-int8")
    assert "'gpt-int8'" in message and "not a seq2seq" in message and "npflux sample --checkpoint" in message
    assert "'gpt'" in one_line_error(load_sae, FIXTURES / "gpt")
    assert "'gpt'" in one_line_error(load_adapter, FIXTURES / "gpt")
    assert "'gpt-lora'" in one_line_error(load_model, FIXTURES / "gpt-lora", expect=("seq2seq", "sae"))
    assert issubclass(WrongKind, CheckpointError) and issubclass(WrongKind, ValueError)


def test_unknown_and_missing_kinds_are_clear_errors(tmp_path):
    state = {"w": np.zeros(2, np.float32)}
    save_checkpoint(tmp_path / "none", state, {"v": 1})
    assert json.loads((tmp_path / "none" / "meta.json").read_text())["kind"] is None  # no model kind matches
    with pytest.raises(CheckpointError, match="holds no model"):
        load_model(tmp_path / "none")
    save_checkpoint(tmp_path / "inferred", state, {"model": {}})
    assert json.loads((tmp_path / "inferred" / "meta.json").read_text())["kind"] == "gpt"  # inferred when not given
    with pytest.raises(ValueError, match="unknown checkpoint kind 'mamba'"):
        save_checkpoint(tmp_path / "bad", state, {}, kind="mamba")
    meta = json.loads((tmp_path / "none" / "meta.json").read_text())
    meta["kind"] = "mamba"  # written by a newer npflux
    (tmp_path / "none" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not know"):
        load_model(tmp_path / "none")


def test_old_names_still_work():
    import npflux.finetune as finetune
    import npflux.interp as interp
    import npflux.train_seq2seq as train_seq2seq
    from npflux.train import model_from_checkpoint

    for module, names in ((finetune, ["load_adapter", "save_adapter", "save_quantized"]),
                          (train_seq2seq, ["load_seq2seq", "save_seq2seq"]), (interp, ["load_sae", "save_sae"])):
        for name in names:
            assert getattr(module, name) is getattr(ckpt_mod, name), f"{module.__name__}.{name}"
    model, tok, ckpt = model_from_checkpoint(FIXTURES / "gpt-int8")
    assert ckpt.kind == "gpt-int8" and tok is not None
    model2, tok2 = finetune.special_from_checkpoint(load_checkpoint(FIXTURES / "gpt-int8"), FIXTURES / "gpt-int8")
    np.testing.assert_array_equal(to_numpy(outputs("gpt-int8", model, tok)["logits"]),
                                  to_numpy(outputs("gpt-int8", model2, tok2)["logits"]))
    sae, source, metrics = interp.load_sae(FIXTURES / "sae")
    assert source["point"] == "transformer.h.1" and metrics == {"train": {"steps": 3}}


# ---------------------------------------------------------------------------
# layering: the checkpoint package loads no tokenizer, and train and finetune no longer import each other
# ---------------------------------------------------------------------------


def test_importing_the_checkpoint_package_loads_no_tokenizer():
    code = ("import sys, npflux.checkpoint; "
            "print([m for m in sys.modules if m.split('.')[0] == 'tokenizers' or m.startswith('npflux.tokenizers')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def npflux_imports(path: Path):
    """Every npflux module ``path`` imports, at the top or inside a function, as dotted names."""
    package = "npflux" if path.parent.name == "npflux" else f"npflux.{path.parent.name}"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{target}.{a.name}" if not node.module else target for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t.startswith("npflux")}


def test_train_and_finetune_do_not_import_each_other_and_the_registry_imports_neither():
    def within(targets, modules):
        return {t for t in targets if any(t == m or t.startswith(m + ".") for m in modules)}

    pkg = ROOT / "npflux"
    gpt, lora = pkg / "training" / "gpt.py", pkg / "training" / "lora.py"  # (npflux.train, npflux.finetune)
    assert within(npflux_imports(gpt), ["npflux.checkpoint"])  # (the parser sees imports at all)
    assert not within(npflux_imports(gpt), ["npflux.finetune", "npflux.training.lora"])
    assert not within(npflux_imports(lora), ["npflux.train", "npflux.training.gpt"])
    above = ["npflux.train", "npflux.finetune", "npflux.train_seq2seq", "npflux.interp", "npflux.cli", "npflux.training"]
    for path in sorted((pkg / "checkpoint").glob("*.py")):
        assert not within(npflux_imports(path), above), path.name

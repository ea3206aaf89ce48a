"""Checkpoints: exact round trips, damage detection, crash safety, no pickle."""
import json
import pickle
from dataclasses import dataclass

import numpy as np
import pytest

from npflux import checkpoint as ckpt
from npflux import optim
from npflux.tokenizers import CharTokenizer


def model_state(dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4)).astype(dtype)
    w.flat[:4] = [np.inf, -0.0, np.finfo(dtype).tiny / 4, np.nan]  # odd bit patterns must survive
    return {"transformer.wte.weight": w, "transformer.h.0.ln_1.bias": rng.standard_normal(4).astype(dtype),
            "lm_head.weight": w}  # the same array twice, as a tied model lists it


def bits(a):
    return a.view(np.uint8)


@dataclass
class Config:
    vocab_size: int = 65
    n_embd: int = 4
    activation: str = "gelu"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_bitwise(tmp_path, dtype):
    state = model_state(dtype)
    params = {k: v.copy() for k, v in state.items() if k != "lm_head.weight"}
    opt = optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    opt.step({k: np.ones_like(v) for k, v in params.items()})
    rng = np.random.default_rng(123)
    rng.random(5)
    tok = CharTokenizer("hello world")
    d = ckpt.save_checkpoint(tmp_path / "ckpt", state, Config(), tokenizer=tok, optimizer_state=opt.state_dict(),
                             step=42, rng_state=ckpt.rng_state_to_json(rng), extra={"val_loss": 1.5})
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.safetensors", "optimizer.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp / .old debris
    c = ckpt.load_checkpoint(d)
    assert set(c.model_state) == set(state)
    for k, v in state.items():
        assert c.model_state[k].dtype == dtype and c.model_state[k].shape == v.shape
        assert np.array_equal(bits(c.model_state[k]), bits(v)), k
    assert c.config == {"vocab_size": 65, "n_embd": 4, "activation": "gelu"}
    assert CharTokenizer.from_dict(c.tokenizer) == tok
    assert c.step == 42 and c.extra == {"val_loss": 1.5}
    # the optimizer continues exactly as the original one
    opt2 = optim.AdamW({k: v.copy() for k, v in params.items()}, lr=1.0)
    opt2.load_state_dict(c.optimizer_state)
    assert opt2.step_count == 1 and opt2.lr == 3e-4 and opt2.betas == (0.9, 0.999)
    for k in params:
        assert c.optimizer_state[f"m.{k}"].dtype == dtype
        assert np.array_equal(opt2.m[k], opt.m[k]) and np.array_equal(opt2.v[k], opt.v[k])
    # and so does the random generator
    assert np.array_equal(ckpt.rng_from_json(c.rng_state).random(10), rng.random(10))


@pytest.mark.parametrize("bit_generator", ["PCG64", "MT19937", "Philox", "SFC64"])
def test_rng_state_json_round_trip(bit_generator):
    rng = np.random.Generator(getattr(np.random, bit_generator)(7))
    rng.standard_normal(3)
    state = json.loads(json.dumps(ckpt.rng_state_to_json(rng)))
    restored = ckpt.rng_from_json(state, backend="numpy")
    assert np.array_equal(restored.integers(0, 1 << 30, 20), rng.integers(0, 1 << 30, 20))
    with pytest.raises(ckpt.CheckpointError, match="bit generator"):
        ckpt.rng_from_json({**state, "bit_generator": "NoSuchGenerator"})


def test_overwrite_replaces_previous(tmp_path):
    d = tmp_path / "ckpt"
    ckpt.save_checkpoint(d, model_state(np.float32, 0), {"a": 1}, step=1)
    ckpt.save_checkpoint(d, model_state(np.float32, 1), {"a": 2}, step=2)
    c = ckpt.load_checkpoint(d)
    assert c.step == 2 and c.config == {"a": 2} and c.optimizer_state is None
    assert np.array_equal(bits(c.model_state["transformer.h.0.ln_1.bias"]),
                          bits(model_state(np.float32, 1)["transformer.h.0.ln_1.bias"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFound, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):  # CheckpointNotFound is also a FileNotFoundError
        ckpt.load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="meta.json"):
        ckpt.load_checkpoint(tmp_path / "empty")
    d = ckpt.save_checkpoint(tmp_path / "c", model_state(np.float32), {}, optimizer_state={"step": 1, "m.x": np.zeros(2)})
    (d / "optimizer.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing optimizer.safetensors"):
        ckpt.load_checkpoint(d)


def test_truncated_file_fails_hash(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", model_state(np.float64), {})
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_checkpoint(d)


def test_corrupt_file_with_matching_hash_is_reported(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", model_state(np.float64), {})
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["model.safetensors"]["sha256"] = ckpt._sha256(d / "model.safetensors")
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="not a readable safetensors"):
        ckpt.load_checkpoint(d)


def test_wrong_format_version_and_bad_meta(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", model_state(np.float32), {})
    meta = json.loads((d / "meta.json").read_text())
    meta["format_version"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        ckpt.load_checkpoint(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_checkpoint(d)


@pytest.mark.parametrize("fail_in", ["_write_json", "_write_safetensors"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, fail_in):
    d = tmp_path / "ckpt"
    good = model_state(np.float32, 0)
    ckpt.save_checkpoint(d, good, {"v": 1}, optimizer_state={"step": 3, "m.w": np.ones(3, np.float32)}, step=3)
    real = getattr(ckpt, fail_in)
    calls = []

    def crash(path, *args):
        calls.append(path)
        if fail_in == "_write_safetensors" and len(calls) == 1:
            return real(path, *args)  # the model file is written; the crash hits the optimizer file
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, fail_in, crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(d, model_state(np.float32, 1), {"v": 2},
                             optimizer_state={"step": 4, "m.w": np.zeros(3, np.float32)}, step=4)
    assert all(".tmp" in str(p) for p in calls)  # writes went to the temporary sibling only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # and it was removed
    c = ckpt.load_checkpoint(d)
    assert c.step == 3 and c.config == {"v": 1}
    for k, v in good.items():
        assert np.array_equal(bits(c.model_state[k]), bits(v))
    # the next save cleans up and succeeds
    monkeypatch.setattr(ckpt, fail_in, real)
    ckpt.save_checkpoint(d, model_state(np.float32, 1), {"v": 2}, step=4)
    assert ckpt.load_checkpoint(d).step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_debris_of_a_killed_save_is_ignored_and_removed(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "ckpt", model_state(np.float32), {"v": 1}, step=1)
    stale = tmp_path / "ckpt.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    assert ckpt.load_checkpoint(d).step == 1
    ckpt.save_checkpoint(d, model_state(np.float32), {"v": 2}, step=2)
    assert ckpt.load_checkpoint(d).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_crash_between_renames_recovers(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "ckpt", model_state(np.float32), {"v": 1}, step=7)
    d.rename(tmp_path / "ckpt.old")  # the state right after the first rename of a swap
    with pytest.warns(UserWarning, match="interrupted"):
        assert ckpt.load_checkpoint(d).step == 7
    ckpt.save_checkpoint(d, model_state(np.float32), {"v": 2}, step=8)
    assert ckpt.load_checkpoint(d).step == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(ckpt.CheckpointError, match="refusing"):
        ckpt.save_checkpoint(d, model_state(np.float32), {})
    assert (d / "notes.txt").read_text() == "keep me"


def test_no_pickle(tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle must not be used")

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    d = ckpt.save_checkpoint(tmp_path / "c", model_state(np.float32), {"a": 1},
                             optimizer_state={"step": 1, "m.x": np.ones(2)}, step=1)
    ckpt.load_checkpoint(d)
    for f in d.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"


def test_unserialisable_config_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="meta.json"):
        ckpt.save_checkpoint(tmp_path / "c", model_state(np.float32), {"f": object()})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("save_on,load_on", [("cupy", "numpy"), ("numpy", "cupy"), ("cupy", "cupy")])
def test_checkpoint_moves_between_backends_bit_for_bit(tmp_path, save_on, load_on):
    """A model saved from one backend loads on the other with every weight bit-identical."""
    from conftest import CUPY_SKIP_REASON, _cupy_ok
    from npflux.backend import to_numpy
    from npflux.models import GPT, GPTConfig
    from npflux.train import model_from_checkpoint

    if not _cupy_ok():
        pytest.skip(CUPY_SKIP_REASON)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    for dtype in ("float32", "float64"):
        model = GPT(cfg, seed=3, backend=save_on, dtype=dtype)
        d = ckpt.save_checkpoint(tmp_path / f"{save_on}-{dtype}", model.state_dict(),
                                 {"model": cfg.to_dict(), "train": {"dtype": dtype}})
        loaded, _, _ = model_from_checkpoint(d, backend=load_on)
        assert loaded.backend.name == load_on
        for k, v in model.params.items():
            got = to_numpy(loaded.params[k])
            assert got.dtype == np.dtype(dtype)
            assert np.array_equal(bits(got), bits(to_numpy(v))), k


# ---------------------------------------------------------------------------
# the atomic directory writer (checkpoints and retrieval indexes)
# ---------------------------------------------------------------------------


def test_crash_between_renames_recovers_from_the_hidden_sibling(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "ckpt", model_state(np.float32), {"v": 1}, step=7)
    d.rename(tmp_path / ".ckpt.0123abcd.old")  # what the writer's first rename leaves today
    with pytest.warns(UserWarning, match="interrupted"):
        assert ckpt.load_checkpoint(d).step == 7
    ckpt.save_checkpoint(d, model_state(np.float32), {"v": 2}, step=8)
    assert ckpt.load_checkpoint(d).step == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_hidden_debris_is_removed_and_neighbours_are_left_alone(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "ckpt", model_state(np.float32), {"v": 1}, step=1)
    (tmp_path / ".ckpt.deadbeef.tmp").mkdir()  # a save killed while writing
    (tmp_path / ".ckpt.deadbeef.tmp" / "model.safetensors").write_bytes(b"half a file")
    for name in ("ckpt.tmp", "ckpt.old", ".ckpt.notmine.tmp"):  # someone else's directories
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious.txt").write_text("keep me")
    ckpt.save_checkpoint(d, model_state(np.float32), {"v": 2}, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.notmine.tmp", "ckpt", "ckpt.old", "ckpt.tmp"]
    assert ckpt.load_checkpoint(d).step == 2


def test_atomic_directory_keeps_the_old_version_when_writing_fails(tmp_path):
    from npflux.checkpoint.atomic import atomic_directory

    index = tmp_path / "index"
    with atomic_directory(index, "index.json") as tmp:
        (tmp / "index.json").write_text("{}")
        (tmp / "arrays.safetensors").write_bytes(b"v1")
    with pytest.raises(OSError, match="simulated"):
        with atomic_directory(index, "index.json") as tmp:
            (tmp / "arrays.safetensors").write_bytes(b"v2")
            raise OSError("disk full (simulated)")
    assert (index / "arrays.safetensors").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        with atomic_directory(mine, "index.json"):
            pass
    assert (mine / "notes.txt").read_text() == "keep me"


def test_meta_json_says_the_kind(tmp_path):
    finite = {k: np.nan_to_num(v, posinf=1.0) for k, v in model_state(np.float32).items()}  # a model kind: no NaN/inf
    d = ckpt.save_checkpoint(tmp_path / "c", finite, {"model": {}}, kind="gpt")
    assert json.loads((d / "meta.json").read_text())["kind"] == "gpt"
    assert ckpt.load_checkpoint(d).kind == "gpt"

"""Fuzzing the checkpoint loader and the CLI: damage never loads as a different model, never ends in a traceback.

A small trained checkpoint (model, optimizer state, RNG state, history) is
written once; every example copies it, damages one thing and loads it:

- meta.json: one field anywhere in the tree deleted, set to null, or
  replaced by a value of another type or an out-of-range number;
- a safetensors header (model or optimizer): one tensor's dtype, shape or
  data offsets changed, or the header's length field, with meta.json's
  SHA-256 updated to match (so the hash check cannot be what catches it);
- the arrays' bytes truncated or extended, hash updated the same way.

Every outcome is one of two:

1. an error of npflux's own type (``CheckpointError``, a ``ValueError``),
   whose message is one line; or
2. a load that gives the original model: every parameter bit-identical to
   the one saved, and the same logits on a fixed input, unless the damage
   was to a field of the model's config, in which case the loaded config
   differs from the saved one in that field alone (an edit of meta.json is
   a user's right; it must not change anything else).

``test_cli_on_damaged_checkpoints`` runs ``npflux sample`` in-process over
the same damage: exit status 0 with text, or 1 with one line on stderr.
``test_cli_argument_fuzz`` draws flag combinations for ``sample``: argparse's
usage error (status 2), npflux's one-line error (1), or a sample (0).

Example counts: ``NPFLUX_HYPOTHESIS_EXAMPLES`` (default 25) times 40 for the
loader (1,000 in the normal run), times 4 for the CLI tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npflux import settings as npflux_settings
from npflux.checkpoint import CheckpointError, load_checkpoint, sha256_file
from npflux.checkpoint.kinds import load_model
from npflux.cli import main
from npflux.models import GPTConfig
from npflux.tokenizers import CharTokenizer
from npflux.train import TrainConfig, train

EXAMPLES = npflux_settings.get("hypothesis_examples")
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(checkpoint directory, the model trained into it, a fixed input batch)."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    tok = CharTokenizer.from_text(TEXT)
    ids = np.asarray(tok.encode(TEXT), dtype=np.int64)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    cfg = TrainConfig(out_dir=str(out), batch_size=2, max_iters=3, eval_interval=2, eval_iters=1,
                      checkpoint_interval=0, progress=False)
    model, _ = train(config, cfg, ids[:1500], ids[1500:], tokenizer=tok, log=lambda *a: None)
    batch = ids[None, :8]
    return out / "ckpt", model, batch


# ----------------------------------------------------------------------------
# damage
# ----------------------------------------------------------------------------

def _paths(node, prefix=()):
    """Every key path in a JSON tree (dict keys and list indices), the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e-300]),
)


@st.composite
def meta_damage(draw, meta):
    path = draw(st.sampled_from(sorted(_paths(meta), key=repr)))
    how = draw(st.sampled_from(["delete", "replace", "neighbour"]))
    value = draw(REPLACEMENTS)
    neighbour = draw(st.sampled_from([lambda x: x + 1, lambda x: x - 1, lambda x: -x, lambda x: x * 1000,
                                      lambda x: float(x) + 0.5, str]))
    return path, how, value, neighbour


def apply_meta_damage(meta, damage):
    path, how, value, neighbour = damage
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if how == "delete":
        del parent[key]
    elif how == "neighbour" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = neighbour(parent[key])
    else:
        parent[key] = value


def read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path, header, body, length_delta=0):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", max(len(blob) + length_delta, 0)) + blob + body)


DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3", "XYZ", ""]


@st.composite
def array_damage(draw):
    target = draw(st.sampled_from(["model.safetensors", "optimizer.safetensors"]))
    what = draw(st.sampled_from(["dtype", "shape", "offsets", "length", "truncate", "extend"]))
    pick = draw(st.integers(0, 10**6))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.one_of(st.lists(st.integers(-2, 70), max_size=4), st.just("permute"), st.just("append1")))
    shift = draw(st.sampled_from([-8, -4, -1, 1, 4, 8, 2**40]))
    end = draw(st.sampled_from(["start", "end", "swap"]))
    n_bytes = draw(st.integers(1, 64))
    return target, what, pick, dtype, shape, shift, end, n_bytes


def apply_array_damage(ckpt, meta, damage):
    target, what, pick, dtype, shape, shift, end, n_bytes = damage
    path = ckpt / target
    header, body = read_header(path)
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[names[pick % len(names)]]
    if what == "dtype":
        entry["dtype"] = dtype
    elif what == "shape":
        if shape == "permute":
            entry["shape"] = entry["shape"][::-1]
        elif shape == "append1":
            entry["shape"] = entry["shape"] + [1]
        else:
            entry["shape"] = shape
    elif what == "offsets":
        lo, hi = entry["data_offsets"]
        entry["data_offsets"] = [hi, lo] if end == "swap" else [lo + shift, hi] if end == "start" else [lo, hi + shift]
    if what == "length":
        write_header(path, header, body, length_delta=shift)
    elif what == "truncate":
        write_header(path, header, body[:-n_bytes])
    elif what == "extend":
        write_header(path, header, body + b"\0" * n_bytes)
    else:
        write_header(path, header, body)
    meta["files"][target]["sha256"] = sha256_file(path)  # the hash matches: something else must catch it


def damaged_copy(pristine_dir, tmp_path, meta_dmg=None, array_dmg=None):
    ckpt = tmp_path / "ckpt"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(pristine_dir, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    if array_dmg is not None:
        apply_array_damage(ckpt, meta, array_dmg)
    if meta_dmg is not None:
        apply_meta_damage(meta, meta_dmg)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


# ----------------------------------------------------------------------------
# outcomes
# ----------------------------------------------------------------------------

def assert_one_line_error(exc):
    assert isinstance(exc, ValueError), f"{type(exc).__name__} is not one of npflux's errors: {exc}"
    message = str(exc)
    assert message and "\n" not in message, f"not one line: {message!r}"


def assert_same_model(loaded, original, batch, meta_dmg):
    """The loaded model is the saved one: parameters bit for bit, and (config unchanged) the same logits."""
    saved = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(np.asarray(got[name], dtype=np.float64), np.asarray(value, dtype=np.float64),
                                      err_msg=name)
    edited_model_field = meta_dmg is not None and meta_dmg[0][:2] == ("config", "model")
    if edited_model_field:
        changed = {k for k, v in loaded.config.to_dict().items() if v != original.config.to_dict()[k]}
        assert changed <= {meta_dmg[0][2]}, f"a load changed {changed}, not only the edited {meta_dmg[0][2]}"
        return
    assert loaded.config == original.config
    if loaded.dtype == original.dtype:  # (an edited train dtype builds the same weights in another precision)
        with loaded.evaluating(), original.evaluating():
            np.testing.assert_array_equal(loaded.forward(batch)[0], original.forward(batch)[0])


def check_load(ckpt, original, batch, meta_dmg=None):
    try:
        model, _, _ = load_model(ckpt)
    except ValueError as exc:  # CheckpointError is a ValueError
        assert_one_line_error(exc)
        return "refused"
    assert_same_model(model, original, batch, meta_dmg)
    return "loaded"


FUZZ = settings(max_examples=40 * EXAMPLES, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_loader_on_damaged_meta(pristine, tmp_path_factory, data):
    pristine_dir, original, batch = pristine
    meta = json.loads((pristine_dir / "meta.json").read_text())
    dmg = data.draw(meta_damage(meta))
    ckpt = damaged_copy(pristine_dir, tmp_path_factory.mktemp("m"), meta_dmg=dmg)
    check_load(ckpt, original, batch, dmg)
    # what --resume reads beyond the model: a damaged field is one line too
    try:
        load_checkpoint(ckpt)
    except ValueError as exc:
        assert_one_line_error(exc)


@FUZZ
@given(dmg=array_damage())
def test_loader_on_damaged_arrays(pristine, tmp_path_factory, dmg):
    pristine_dir, original, batch = pristine
    ckpt = damaged_copy(pristine_dir, tmp_path_factory.mktemp("a"), array_dmg=dmg)
    check_load(ckpt, original, batch)  # a layout change that still loads must load the same numbers


def _run_cli(argv):
    """(exit status, stdout, stderr) of ``npflux`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int) and exc.code is not None:
                err.write(str(exc.code) + "\n")
    return status, out.getvalue(), err.getvalue()


def assert_clean_exit(status, out, err):
    assert "Traceback" not in err
    if status == 0:
        return
    lines = [line for line in err.splitlines() if line.strip()]
    if status == 2:  # argparse: usage lines, then one error line
        assert lines[-1].startswith("npflux sample: error:"), err
    else:
        assert status == 1 and len(lines) == 1, (status, err)


CLI_FUZZ = settings(max_examples=4 * EXAMPLES, suppress_health_check=list(HealthCheck))


@CLI_FUZZ
@given(meta_dmg=st.none() | st.data(), array_dmg=st.none() | array_damage())
def test_cli_on_damaged_checkpoints(pristine, tmp_path_factory, meta_dmg, array_dmg):
    pristine_dir, _, _ = pristine
    if meta_dmg is not None:
        meta_dmg = meta_dmg.draw(meta_damage(json.loads((pristine_dir / "meta.json").read_text())))
    ckpt = damaged_copy(pristine_dir, tmp_path_factory.mktemp("c"), meta_dmg, array_dmg)
    assert_clean_exit(*_run_cli(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "--seed", "0"]))


NUMBERS = st.sampled_from(["0", "1", "-1", "3", "nan", "inf", "-inf", "1e309", "0.5", "x", "", "2.5", "40"])
FLAGS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--num-samples", "--beam",
         "--length-penalty"]


@CLI_FUZZ
@given(flags=st.dictionaries(st.sampled_from(FLAGS), NUMBERS, max_size=4), prompt=st.none() | st.text(max_size=4),
       ignore_eos=st.booleans())
def test_cli_argument_fuzz(pristine, flags, prompt, ignore_eos):
    pristine_dir, _, _ = pristine
    flags.setdefault("--max-new-tokens", "3")
    if flags["--max-new-tokens"] in ("40", "1e309"):
        flags["--max-new-tokens"] = "3"  # (a long sample is fine, just slow)
    argv = ["sample", "--checkpoint", str(pristine_dir)] + [x for kv in flags.items() for x in kv]
    argv += [] if prompt is None else ["--prompt", prompt]
    argv += ["--ignore-eos"] if ignore_eos else []
    status, out, err = _run_cli(argv)
    assert_clean_exit(status, out, err)
    if status == 0 and "--temperature" in flags:
        assert math.isfinite(float(flags["--temperature"]))  # a NaN or infinite temperature must be refused


@pytest.mark.parametrize("field", ["n_layer", "n_embd", "vocab_size", "block_size"])
def test_a_huge_size_in_the_config_is_refused_before_anything_is_allocated(pristine, tmp_path, field):
    """Found by the fuzz at 100x examples: an n_layer of 2**31 once built set(range(n_layer)) and the run
    was killed for memory; every size is now checked against the arrays without allocating by it."""
    pristine_dir, _, _ = pristine
    dmg = (("config", "model", field), "replace", 10**12, None)
    ckpt = damaged_copy(pristine_dir, tmp_path, meta_dmg=dmg)
    with pytest.raises(CheckpointError, match=field if field == "n_layer" else "the arrays hold"):
        load_model(ckpt)


@pytest.mark.parametrize("dtype", ["01", "(2,)f", "float128x", "int8", ""])
def test_a_damaged_dtype_is_one_line(pristine, tmp_path, dtype):
    """Found by the fuzz: config.train.dtype "01" made numpy.dtype raise a SyntaxError (it parses the string)."""
    pristine_dir, _, _ = pristine
    ckpt = damaged_copy(pristine_dir, tmp_path, meta_dmg=(("config", "train", "dtype"), "replace", dtype, None))
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    assert_one_line_error(info.value)


def test_a_damaged_hash_is_quoted_not_echoed(pristine, tmp_path):
    """Found by the fuzz at 100x: a sha256 edited to hold a newline was echoed raw, and the error took two lines."""
    pristine_dir, _, _ = pristine
    ckpt = damaged_copy(pristine_dir, tmp_path,
                        meta_dmg=(("files", "model.safetensors", "sha256"), "replace", "\n", None))
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    assert_one_line_error(info.value)

"""Checkpoints: safetensors for arrays, JSON for everything else, never pickle.

Where things are::

    npflux/checkpoint/__init__.py   the container (this module): save_checkpoint / load_checkpoint
    npflux/checkpoint/atomic.py     the atomic directory writer (checkpoints and retrieval indexes)
    npflux/checkpoint/kinds.py      what a checkpoint holds: the registry of kinds (gpt, gpt-int8,
                                    gpt-lora, seq2seq, sae), each one's save and load, load_model(path)
    npflux/checkpoint/outdir.py     may a run write its checkpoint here? claim_output, used by every
                                    workflow that saves a model (--resume / --overwrite / refuse)

    model, tokenizer, ckpt = npflux.checkpoint.load_model("out/ckpt")   # a checkpoint of any kind

A checkpoint is a directory::

    model.safetensors       the model's state dict (exact bits, any dtype)
    optimizer.safetensors   the optimizer's moment/momentum arrays (when saved)
    meta.json               format version, kind, step, model config, tokenizer,
                            optimizer scalars (lr, betas, step...), RNG state,
                            anything extra, and the SHA-256 of each file above

Neither format can run code when loaded (unlike ``torch.save`` / pickle), and
the hashes catch a truncated or damaged file with a clear message instead of
a confusing failure deep inside training.

``kind`` says which model the checkpoint holds (``kinds.KINDS``).
Checkpoints written before it existed have none; their kind is inferred from
their config, by the rules the loaders of that time used. Adding the field
did not change the format version: older npflux reads these checkpoints too.

Saving is atomic from the reader's side (``atomic.atomic_directory``):
everything is written and fsynced into a hidden sibling, then swapped in by
renames. A crash while writing leaves the previous checkpoint untouched; a
crash between the swap's two renames leaves it in a hidden ``.old`` sibling,
which ``load_checkpoint`` reads (with a warning) and the next
``save_checkpoint`` puts back first. One process saves to a given directory
at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from ..backend import get_array_module, get_backend, to_numpy
from .atomic import atomic_directory, fsync_dir, fsync_file, previous_version

FORMAT = "npflux-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, META_FILE)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or in a format this version cannot read."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the given path."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns. Arrays are host NumPy arrays."""

    model_state: dict
    config: dict
    tokenizer: dict | None = None
    optimizer_state: dict | None = None  # arrays and scalars merged: ready for optimizer.load_state_dict
    step: int = 0
    rng_state: dict | None = None
    extra: dict | None = None
    format_version: int = FORMAT_VERSION
    kind: str | None = None  # meta.json's "kind", or inferred from the config for older checkpoints


# ---------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------


def _to_jsonable(obj):
    """Turn configs and states into plain JSON values (used as json's ``default``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.dtype):
        return obj.name
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint's meta.json "
                    f"(only JSON values, dataclasses and NumPy scalars); arrays belong in the state dicts")


def rng_state_to_json(rng) -> dict:
    """The state of a ``numpy.random.Generator`` as a JSON-able dict.

    ``bit_generator.state`` is already a dict of ints for PCG64 (NumPy's
    default); other bit generators (MT19937, Philox, SFC64) hold small
    arrays, which are stored as ``{"__ndarray__": [...], "dtype": ...}``.
    """
    def encode(x):
        if isinstance(x, dict):
            return {k: encode(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": x.dtype.name}
        if isinstance(x, np.generic):
            return x.item()
        return x

    return encode(rng.bit_generator.state)


def rng_from_json(state: dict, backend=None):
    """A ``numpy.random.Generator`` that continues exactly where the saved one was.

    ``backend`` may be given for symmetry with ``Backend.rng``; only the NumPy
    backend's generators have a state that can be saved and restored.
    """
    if backend is not None and get_backend(backend).name != "numpy":
        raise ValueError(f"cannot restore a random generator on backend {get_backend(backend).name!r}; "
                         f"only NumPy generator states are saved (keep batch sampling on the host)")
    def decode(x):
        if isinstance(x, dict):
            if "__ndarray__" in x:
                return np.asarray(x["__ndarray__"], dtype=x["dtype"])
            return {k: decode(v) for k, v in x.items()}
        return x

    name = state.get("bit_generator")
    bit_generator_cls = getattr(np.random, str(name), None)
    if bit_generator_cls is None or not isinstance(bit_generator_cls, type):
        raise CheckpointError(f"unknown NumPy bit generator {name!r} in saved RNG state")
    bit_generator = bit_generator_cls()
    bit_generator.state = decode(state)
    return np.random.Generator(bit_generator)


# ---------------------------------------------------------------------------
# low-level writing (small functions, so tests can make one fail on purpose)
# ---------------------------------------------------------------------------


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints, adapters' bases, corpora)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_sha256 = sha256_file
_fsync_file, _fsync_dir = fsync_file, fsync_dir  # (their home is atomic.py)


def _write_safetensors(path: Path, arrays: dict) -> str:
    """Write arrays to ``path`` (host, C-contiguous), return the file's SHA-256 (the writer fsyncs it)."""
    host = {}
    for name, a in arrays.items():
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            raise TypeError(f"state entry {name!r} is a {type(a).__name__}, not an array")
        host[name] = np.ascontiguousarray(to_numpy(a))
    safetensors.numpy.save_file(host, str(path), metadata={"format": "np"})
    return _sha256(path)


def _write_json(path: Path, obj: dict):
    text = json.dumps(obj, indent=2, default=_to_jsonable)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# ---------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------


def _write_all(tmp: Path, model_state, config, tokenizer, optimizer_state, step, rng_state, extra, kind):
    """Write every file of a checkpoint into ``tmp`` (meta.json last: it names the others' hashes)."""
    files = {MODEL_FILE: {"sha256": _write_safetensors(tmp / MODEL_FILE, model_state)}}
    optimizer_scalars = None
    if optimizer_state is not None:
        arrays = {k: v for k, v in optimizer_state.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
        optimizer_scalars = {k: v for k, v in optimizer_state.items() if k not in arrays}
        files[OPTIMIZER_FILE] = {"sha256": _write_safetensors(tmp / OPTIMIZER_FILE, arrays)}
    if tokenizer is not None and hasattr(tokenizer, "to_dict"):
        tokenizer = tokenizer.to_dict()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "step": int(step),
        "config": config,
        "tokenizer": tokenizer,
        "optimizer": optimizer_scalars,
        "rng_state": rng_state,
        "extra": extra,
        "files": files,
    }
    _write_json(tmp / META_FILE, meta)


def _check_finite(directory, arrays: dict):
    """Refuse (CheckpointError) a model checkpoint whose arrays hold NaN or inf: the one on disk stays."""
    for name, a in arrays.items():
        if getattr(a, "dtype", None) is not None and a.dtype.kind in "fc":
            xp = get_array_module(a)
            if not bool(xp.isfinite(a).all()):
                raise CheckpointError(f"refusing to write {directory}: {name} holds values that are not finite "
                                      f"(NaN or inf; did training diverge?); the checkpoint already there is kept")


def save_checkpoint(directory, model_state: dict, config, tokenizer=None, optimizer_state: dict | None = None,
                    step: int = 0, rng_state: dict | None = None, extra: dict | None = None,
                    kind: str | None = None) -> Path:
    """Write a checkpoint to ``directory``, replacing any previous one atomically.

    ``model_state`` maps names to arrays (NumPy or CuPy; copied to the host).
    ``config`` is a dict or a dataclass (e.g. GPTConfig); ``tokenizer`` a
    dict or anything with ``to_dict()``. ``optimizer_state`` is an
    optimizer's ``state_dict()``: its arrays go to ``optimizer.safetensors``,
    its scalars to ``meta.json``. ``rng_state`` is a JSON-able dict (see
    ``rng_state_to_json``). ``extra`` is any JSON-able dict (losses, args...).
    ``kind`` names what the checkpoint holds (a key of ``kinds.KINDS``); when
    not given it is inferred from ``config`` as for an old checkpoint, and
    stays null when nothing matches (a checkpoint of no model kind). A
    checkpoint of a model kind is refused (CheckpointError) when an array
    holds NaN or inf: no loader would accept it. Returns the checkpoint directory.
    """
    from .kinds import KINDS, infer_kind

    if kind is None:
        kind = infer_kind(config) if isinstance(config, dict) else None
    elif kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    if kind is not None:  # a model no loader would accept (load_state_dict refuses NaN/inf) is never written
        _check_finite(directory, {**model_state, **{k: v for k, v in (optimizer_state or {}).items()
                                                  if hasattr(v, "dtype")}})
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not (directory / META_FILE).is_file():
        # The swap would move the whole directory away; never do that to a directory
        # that holds something other than a checkpoint.
        raise CheckpointError(f"{directory} exists, is not empty and is not an npflux checkpoint; "
                              f"refusing to replace it")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    with atomic_directory(directory, META_FILE, FILES) as tmp:
        _write_all(tmp, model_state, config, tokenizer, optimizer_state, step, rng_state, extra, kind)
    return directory


def _read_safetensors(directory: Path, name: str, expected_sha: str | None) -> dict:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing {name}")
    actual = _sha256(path)
    if expected_sha is not None and actual != expected_sha:
        raise CheckpointError(f"{path} is damaged or was changed after saving: SHA-256 {actual}, "
                              f"meta.json records {expected_sha[:80]!r} (truncated copy or interrupted transfer?)")
    try:
        return safetensors.numpy.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


# meta.json's top-level fields and the JSON types each may hold (None: may be null or absent).
_META_TYPES = {"files": (dict,), "config": (dict,), "tokenizer": (dict, None), "optimizer": (dict, None),
               "rng_state": (dict, None), "extra": (dict, None), "kind": (str, None)}


def _check_meta_types(meta, meta_path):
    """Each field of meta.json has its JSON type, and each listed file a SHA-256 (checked before any use,
    so a damaged field is one line naming it, not a TypeError deep in a loader)."""
    for name, types in _META_TYPES.items():
        value = meta.get(name)
        if value is None and None in types:
            continue
        if not isinstance(value, tuple(t for t in types if t is not None)):
            wanted = " or ".join("null" if t is None else "an object" if t is dict else "a string" for t in types)
            raise CheckpointError(f"{meta_path}: {name!r} must be {wanted}, got {json.dumps(value)[:60]}")
    for name, entry in meta["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{meta_path}: files[{name!r}] must be an object with a \"sha256\" string")


def read_meta(directory) -> tuple[Path, dict]:
    """(the directory that holds the checkpoint, its meta.json as a dict), checked but no arrays read.

    The directory is ``directory`` itself, or the previous checkpoint a crash
    left in a hidden sibling (with a warning). Cheap: what ``kinds.kind_at``
    reads to say what a checkpoint is before loading it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        previous = previous_version(directory, META_FILE, FILES)
        if previous is None:
            raise CheckpointNotFound(f"no checkpoint directory at {directory}")
        warnings.warn(f"{directory} is missing but {previous} holds the previous checkpoint "
                      f"(a save was interrupted); loading that one")
        directory = previous
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} does not describe an npflux checkpoint")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format version {version!r}; "
                              f"this npflux reads version {FORMAT_VERSION}")
    _check_meta_types(meta, meta_path)
    return directory, meta


def _step_of(meta, directory):
    """meta.json's step: a whole number >= 0 (a "5" or a -5 there is damage, not a step to resume from)."""
    step = meta.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{directory}/meta.json has step {step!r}; a step is a whole number >= 0")
    return step


def load_checkpoint(directory, optimizer: bool = True) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``, checking every file's hash.

    Raises CheckpointNotFound when there is no checkpoint at ``directory``,
    and CheckpointError for a missing or damaged file or an unknown format
    version. Arrays come back as host NumPy arrays with the dtypes they were
    saved in. ``kind`` is meta.json's, or inferred from the config when the
    checkpoint predates the field. ``optimizer=False`` leaves the optimizer
    state unread (``optimizer_state`` None): sampling needs only the model, and
    a checkpoint shipped without ``optimizer.safetensors`` still loads.
    """
    from .kinds import infer_kind

    directory, meta = read_meta(directory)
    meta_path = directory / META_FILE
    files = meta["files"]
    if MODEL_FILE not in files:
        raise CheckpointError(f"{meta_path} lists no {MODEL_FILE}")
    model_state = _read_safetensors(directory, MODEL_FILE, files[MODEL_FILE].get("sha256"))
    optimizer_state = None
    if optimizer and meta.get("optimizer") is not None:
        if OPTIMIZER_FILE not in files:
            raise CheckpointError(f"{meta_path} has optimizer scalars but lists no {OPTIMIZER_FILE}")
        arrays = _read_safetensors(directory, OPTIMIZER_FILE, files[OPTIMIZER_FILE].get("sha256"))
        optimizer_state = {**meta["optimizer"], **arrays}
    config = meta.get("config")
    return Checkpoint(
        model_state=model_state,
        config=config,
        tokenizer=meta.get("tokenizer"),
        optimizer_state=optimizer_state,
        step=_step_of(meta, directory),
        rng_state=meta.get("rng_state"),
        extra=meta.get("extra"),
        format_version=meta["format_version"],
        kind=meta.get("kind") or infer_kind(config),
    )


# The registry of kinds sits on the container (it imports the names above).
from .kinds import (  # noqa: E402
    GPT_KINDS, KINDS, Kind, WrongKind, infer_kind, kind_at, load_adapter, load_model, load_reader, load_sae,
    load_seq2seq, model_from, save_adapter, save_distilled, save_gpt, save_quantized, save_reader, save_sae,
    save_seq2seq,
)

"""Corpora, train/validation splits and random batches.

Everything here lives on the host: token ids are NumPy arrays (uint16 on
disk, as nanoGPT's ``train.bin``), and ``get_batch`` returns int64 NumPy
arrays that the training loop moves to its backend. Only the model math
has to run through the backend's array module; this is bookkeeping.

The standard corpus is Tiny Shakespeare (Karpathy's char-rnn copy, 1,115,394
characters). ``find_corpus`` looks for a local copy, ``download_tinyshakespeare``
fetches one, and both check its SHA-256 so a damaged or different file is
caught before anyone trains on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from .tokenizers import CharTokenizer, load_tokenizer

TINYSHAKESPEARE_NAME = "tinyshakespeare.txt"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_SHAKESPEARE = REPO_ROOT / "data" / "shakespeare_char" / "input.txt"


class ChecksumError(ValueError):
    """A corpus file is not the one expected (its SHA-256 differs)."""


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path, expected: str = TINYSHAKESPEARE_SHA256):
    """Raise ChecksumError unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: SHA-256 is {actual}, expected {expected}. The file is damaged or is not "
            f"the standard corpus; delete it and download again, or pass verify=False for a custom corpus.")


# ---------------------------------------------------------------------------
# finding and downloading a corpus
# ---------------------------------------------------------------------------


def find_corpus(name: str = TINYSHAKESPEARE_NAME, path=None, verify=None) -> Path:
    """Locate a corpus file on this machine.

    Looks, in order, at:

    1. ``path``, when given (it must exist);
    2. ``$NPFLUX_DATA_DIR/<name>``;
    3. for Tiny Shakespeare only, the repository's ``data/shakespeare_char/input.txt``
       (where ``data/shakespeare_char/prepare.py --download`` puts it).

    ``verify=None`` checks the SHA-256 only when the file is the standard
    corpus (named ``tinyshakespeare.txt``, or found at step 3); ``True``
    always checks it against the Tiny Shakespeare hash, ``False`` never.
    Raises FileNotFoundError listing the places it looked.
    """
    standard = name == TINYSHAKESPEARE_NAME
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise FileNotFoundError(f"corpus file {found} does not exist")
        is_standard = found.name == TINYSHAKESPEARE_NAME
    else:
        looked = []
        found = None
        data_dir = os.environ.get("NPFLUX_DATA_DIR")
        if data_dir:
            looked.append(Path(data_dir) / name)
        else:
            looked.append("$NPFLUX_DATA_DIR (not set)")
        if standard:
            looked.append(REPO_SHAKESPEARE)
        for candidate in looked:
            if isinstance(candidate, Path) and candidate.is_file():
                found = candidate
                break
        if found is None:
            hint = (" Run `python data/shakespeare_char/prepare.py --download`, or call "
                    "npflux.data.download_tinyshakespeare(dest).") if standard else ""
            raise FileNotFoundError(f"corpus {name!r} not found; looked at: "
                                    f"{', '.join(str(c) for c in looked)}.{hint}")
        is_standard = standard
    if verify or (verify is None and is_standard):
        verify_sha256(found, TINYSHAKESPEARE_SHA256)
    return found


def download_tinyshakespeare(dest=None, url: str = TINYSHAKESPEARE_URL,
                             sha256: str = TINYSHAKESPEARE_SHA256, timeout: float = 60.0) -> Path:
    """Download Tiny Shakespeare to ``dest`` and check its SHA-256.

    ``dest`` is a file path, or an existing directory (the file is then
    ``dest/tinyshakespeare.txt``); by default the repository's
    ``data/shakespeare_char/input.txt``. An existing file with the right hash
    is kept as it is. The download goes to a temporary file in the same
    directory and is moved into place with ``os.replace`` only once its hash
    is right, so an interrupted or corrupted download never leaves a bad
    ``dest`` behind.
    """
    dest = Path(dest) if dest is not None else REPO_SHAKESPEARE
    if dest.is_dir():
        dest = dest / TINYSHAKESPEARE_NAME
    if dest.exists():
        verify_sha256(dest, sha256)  # keep a good copy; refuse to silently overwrite a different file
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256:
            raise ChecksumError(f"download from {url}: SHA-256 is {h.hexdigest()}, expected {sha256}; "
                                f"nothing was written to {dest}")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def load_text(path) -> str:
    """A corpus file as text (UTF-8)."""
    return Path(path).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (uint16 as nanoGPT, when it fits)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_char_dataset(text: str, val_fraction: float = 0.1):
    """Character-level tokenizer and train/validation ids, as nanoGPT's shakespeare_char.

    The vocabulary comes from the whole text; the first ``1 - val_fraction``
    of the characters are the training set and the rest the validation set
    (a contiguous split, so validation text is unseen text, not shuffled
    lines). Returns ``(tokenizer, train_ids, val_ids)`` as host uint16 arrays
    (uint32 for a vocabulary over 65,536).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not text:
        raise ValueError("cannot build a dataset from empty text")
    tok = CharTokenizer(text)
    ids = tok.encode_array(text, dtype=ids_dtype(tok.vocab_size))
    n_train = int(len(ids) * (1.0 - val_fraction))
    return tok, ids[:n_train].copy(), ids[n_train:].copy()


def write_prepared_dataset(out_dir, tokenizer, train_ids, val_ids, extra: dict | None = None) -> dict:
    """Write ``train.bin``, ``val.bin`` (raw ids) and ``meta.json`` as nanoGPT does.

    ``meta.json`` holds the tokenizer description (instead of nanoGPT's
    pickled itos/stoi), the vocabulary size, the id dtype and the sizes.
    Returns the meta dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = ids_dtype(tokenizer.vocab_size)
    np.asarray(train_ids, dtype=dtype).tofile(out_dir / "train.bin")
    np.asarray(val_ids, dtype=dtype).tofile(out_dir / "val.bin")
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.to_dict(),
        "dtype": dtype.name,
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        **(extra or {}),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def load_prepared_dataset(out_dir):
    """Read what ``write_prepared_dataset`` wrote: ``(tokenizer, train, val, meta)``.

    ``train`` and ``val`` are read-only memory maps, so a large corpus is
    not loaded into memory; ``get_batch`` reads only the windows it needs.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; run the dataset's prepare.py first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    splits = []
    for split in ("train", "val"):
        path = out_dir / f"{split}.bin"
        expected = meta[f"{split}_tokens"]
        if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
            raise ValueError(f"{path} is missing or does not hold {expected} {dtype.name} ids; prepare again")
        # np.memmap cannot map an empty file.
        splits.append(np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype))
    return load_tokenizer(meta["tokenizer"]), splits[0], splits[1], meta


def get_batch(data, batch_size: int, block_size: int, rng):
    """A random batch of ``batch_size`` windows of ``block_size`` tokens.

    ``x[b] = data[i:i+block_size]`` and ``y[b] = data[i+1:i+1+block_size]``
    (the next token at every position) for a random offset ``i`` drawn from
    ``rng`` (a ``numpy.random.Generator``), uniformly over every window that
    fits, like nanoGPT. Returns host int64 arrays of shape (batch_size, block_size).
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    n = len(data)
    if n < block_size + 1:
        raise ValueError(f"data has {n} tokens; a batch with block_size={block_size} needs at least "
                         f"{block_size + 1} (inputs plus one target)")
    offsets = rng.integers(0, n - block_size, size=batch_size)
    # One gather of (block_size + 1)-token windows gives both x and the shifted y.
    windows = np.asarray(data)[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
    x = np.ascontiguousarray(windows[:, :-1])
    y = np.ascontiguousarray(windows[:, 1:])
    return x, y

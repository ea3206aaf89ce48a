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
import http.client
import json
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from . import settings
from .checkpoint import sha256_file  # noqa: F401  (data.sha256_file, as before)
from .tokenizers import CharTokenizer, load_tokenizer

TINYSHAKESPEARE_NAME = "tinyshakespeare.txt"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_SHAKESPEARE = REPO_ROOT / "data" / "shakespeare_char" / "input.txt"


class ChecksumError(ValueError):
    """A corpus file is not the one expected (its SHA-256 differs)."""


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
    2. ``<data_dir>/<name>``, the ``data_dir`` setting (``$NPFLUX_DATA_DIR``);
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
        if found.is_dir():
            raise FileNotFoundError(f"{found} is a directory; give the text file itself (e.g. {found}/{name})")
        if not found.is_file():
            raise FileNotFoundError(f"corpus file {found} does not exist")
        is_standard = found.name == TINYSHAKESPEARE_NAME
    else:
        looked = []
        found = None
        data_dir = settings.get("data_dir")
        if data_dir is not None:
            looked.append(data_dir / name)
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


class DownloadError(OSError):
    """A corpus could not be fetched (no network, an HTTP error, a cut connection)."""


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
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        h.update(chunk)
                        out.write(chunk)
            except (OSError, http.client.HTTPException) as exc:  # offline, DNS, timeout, HTTP error, cut short
                reason = getattr(exc, "reason", None) or exc
                raise DownloadError(f"could not download {url} ({reason}); nothing was written to {dest}. "
                                    f"Copy the file there yourself, or point NPFLUX_DATA_DIR at a folder "
                                    f"holding {TINYSHAKESPEARE_NAME}") from None
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
    """A corpus file as text (UTF-8); a file in another encoding is an error that names it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8") from None


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


def has_document_marks(tokenizer) -> bool:
    """Whether the tokenizer has [BOS] and [EOS] (BPE does, the char tokenizer does not)."""
    return getattr(tokenizer, "bos_id", None) is not None and getattr(tokenizer, "eos_id", None) is not None


def split_documents(text: str, doc_sep: str | None = None) -> list:
    """``text.split(doc_sep)`` (the whole text when doc_sep is None or empty), so ``doc_sep.join`` gives it back."""
    return text.split(doc_sep) if doc_sep else [text]


def pack_documents(tokenizer, text: str, doc_sep: str | None = None, dtype=None) -> np.ndarray:
    """The corpus as one id stream: ``[BOS] doc [EOS]`` for each document, back to back.

    Documents are the pieces of ``text`` between occurrences of ``doc_sep``
    (the separator itself is not encoded: ``[EOS] [BOS]`` stands for it, so
    the stream still holds the whole text and nothing else). A tokenizer
    without [BOS]/[EOS] (char) encodes the text as it is, and ``doc_sep``
    must then be None. Returns a host array of ``ids_dtype(vocab_size)``.
    """
    dtype = np.dtype(dtype or ids_dtype(tokenizer.vocab_size))
    if not has_document_marks(tokenizer):
        if doc_sep:
            raise ValueError(f"{type(tokenizer).__name__} has no [BOS]/[EOS] tokens to separate documents with; "
                             f"use a BPE tokenizer or no document separator")
        return np.asarray(tokenizer.encode_array(text), dtype=dtype)
    docs = split_documents(text, doc_sep)
    encoded = tokenizer.encode_batch(docs) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(d) for d in docs]
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    out = np.empty(sum(len(ids) + 2 for ids in encoded), dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos] = bos
        out[pos + 1 : pos + 1 + len(ids)] = ids
        out[pos + 1 + len(ids)] = eos
        pos += len(ids) + 2
    return out


def count_chars(tokenizer, ids, doc_sep: str | None = None) -> int:
    """How many characters of the original text the token ids stand for.

    Ordinary tokens count the characters they decode to; each [EOS] counts
    as the separator it replaced (``len(doc_sep)``), [BOS] and [PAD] as
    nothing. (The [EOS] ending the last document replaced nothing; callers
    covering it subtract ``len(doc_sep)``.) Bits per character divide by
    this, so models with different tokenizers are compared on the same text.
    """
    ids = np.asarray(ids).reshape(-1)
    special = getattr(tokenizer, "special_ids", None)
    if not special:
        return len(tokenizer.decode(ids.tolist()))
    is_special = np.isin(ids, list(special))
    chars = 0
    # decode each run between special tokens on its own (a run never crosses a document boundary)
    bounds = np.flatnonzero(np.diff(np.concatenate([[True], is_special, [True]]).astype(np.int8)))
    for start, stop in zip(bounds[::2], bounds[1::2]):
        chars += len(tokenizer.decode(ids[start:stop].tolist()))
    return chars + len(doc_sep or "") * int((ids == tokenizer.eos_id).sum())


def prepare_dataset(text: str, tokenizer="char", val_fraction: float = 0.1, vocab_size: int = 10_000,
                    doc_sep: str | None = None, show_progress: bool = False):
    """Tokenizer and train/validation ids for either tokenizer.

    ``tokenizer`` is "char", "bpe", or a tokenizer to reuse (a resumed run
    must encode with the tokenizer its checkpoint holds). The split is by
    characters, as ``prepare_char_dataset``: the first ``1 - val_fraction``
    of the text trains, the rest validates, so char and BPE models are judged
    on the same validation text. A BPE tokenizer is trained on the training
    text only (``vocab_size`` tokens at most), so validation text is unseen
    by it too; each split is packed with ``pack_documents``.
    Returns ``(tokenizer, train_ids, val_ids)``.
    """
    if tokenizer == "char":
        if doc_sep:
            raise ValueError("the char tokenizer has no [BOS]/[EOS]; a document separator needs --tokenizer bpe")
        return prepare_char_dataset(text, val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not text:
        raise ValueError("cannot build a dataset from empty text")
    n_train = int(len(text) * (1.0 - val_fraction))
    train_text, val_text = text[:n_train], text[n_train:]
    if tokenizer == "bpe":
        from .tokenizers import BPETokenizer

        tokenizer = BPETokenizer.train(split_documents(train_text, doc_sep), vocab_size=vocab_size,
                                       show_progress=show_progress)
    elif isinstance(tokenizer, str):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose 'char' or 'bpe'")
    train_ids = pack_documents(tokenizer, train_text, doc_sep)
    val_ids = pack_documents(tokenizer, val_text, doc_sep) if val_text else np.zeros(0, train_ids.dtype)
    return tokenizer, train_ids, val_ids


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


def get_batch(data, batch_size: int, block_size: int, rng, rows=None):
    """A random batch of ``batch_size`` windows of ``block_size`` tokens.

    ``x[b] = data[i:i+block_size]`` and ``y[b] = data[i+1:i+1+block_size]``
    (the next token at every position) for a random offset ``i`` drawn from
    ``rng`` (a ``numpy.random.Generator``), uniformly over every window that
    fits, like nanoGPT. Returns host int64 arrays of shape (batch_size, block_size).

    ``rows=(start, stop)``: only those rows of the batch (a data-parallel
    rank's share, ``distributed.shard_range``). Every offset of the whole
    batch is still drawn, so the generator moves on exactly as for the whole
    batch: N ranks with the same generator state together hold exactly the
    batch one process draws, and the state a checkpoint stores is that of the
    global batch, whatever the number of ranks.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    n = len(data)
    if n < block_size + 1:
        raise ValueError(f"data has {n} tokens; a batch with block_size={block_size} needs at least "
                         f"{block_size + 1} (inputs plus one target)")
    offsets = rng.integers(0, n - block_size, size=batch_size)
    if rows is not None:
        offsets = offsets[rows[0]: rows[1]]
    # One gather of (block_size + 1)-token windows gives both x and the shifted y.
    windows = np.asarray(data)[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
    x = np.ascontiguousarray(windows[:, :-1])
    y = np.ascontiguousarray(windows[:, 1:])
    return x, y

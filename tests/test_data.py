"""Corpus lookup, download (offline, via a fake urlopen), splits, batches, prepare.py."""
import hashlib
import importlib.util
import io
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from npflux import data
from npflux.tokenizers import CharTokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


def shakespeare_path():
    env = os.environ.get("NPFLUX_DATA_DIR")
    for d in ([Path(env)] if env else []) + [SHARED]:
        p = d / data.TINYSHAKESPEARE_NAME
        if p.is_file():
            return p
    pytest.skip("tinyshakespeare.txt not available (set NPFLUX_DATA_DIR)")


@pytest.fixture
def no_repo_copy(monkeypatch, tmp_path):
    """Make sure a real data/shakespeare_char/input.txt does not answer for the test."""
    monkeypatch.setattr(data, "REPO_SHAKESPEARE", tmp_path / "absent" / "input.txt")
    monkeypatch.delenv("NPFLUX_DATA_DIR", raising=False)


# --- find_corpus ------------------------------------------------------------

def test_find_corpus_explicit_and_env(tmp_path, monkeypatch, no_repo_copy):
    custom = tmp_path / "mine.txt"
    custom.write_text("hello")
    assert data.find_corpus(path=custom) == custom  # custom corpus: no hash check
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.find_corpus(path=tmp_path / "nope.txt")
    monkeypatch.setenv("NPFLUX_DATA_DIR", str(tmp_path))
    assert data.find_corpus("mine.txt") == custom


def test_find_corpus_not_found_lists_places(no_repo_copy):
    with pytest.raises(FileNotFoundError) as info:
        data.find_corpus()
    assert "NPFLUX_DATA_DIR" in str(info.value) and "download" in str(info.value)


def test_find_corpus_checks_standard_hash(tmp_path, monkeypatch, no_repo_copy):
    bad = tmp_path / data.TINYSHAKESPEARE_NAME
    bad.write_text("not shakespeare")
    monkeypatch.setenv("NPFLUX_DATA_DIR", str(tmp_path))
    with pytest.raises(data.ChecksumError, match="SHA-256"):
        data.find_corpus()
    with pytest.raises(data.ChecksumError):
        data.find_corpus(path=bad)
    assert data.find_corpus(verify=False) == bad
    other = tmp_path / "other.txt"
    other.write_text("x")
    with pytest.raises(data.ChecksumError):
        data.find_corpus(path=other, verify=True)


@pytest.fixture
def shakespeare():
    """The corpus file, found before ``no_repo_copy`` unsets NPFLUX_DATA_DIR (fixtures run in argument order)."""
    return shakespeare_path()


def test_find_corpus_repo_fallback(tmp_path, monkeypatch, shakespeare, no_repo_copy):
    src = shakespeare
    fallback = tmp_path / "input.txt"
    fallback.write_bytes(src.read_bytes())
    monkeypatch.setattr(data, "REPO_SHAKESPEARE", fallback)
    assert data.find_corpus() == fallback


# --- download ---------------------------------------------------------------

def fake_urlopen(payload: bytes, calls: list):
    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)
    return urlopen


def test_download_verifies_and_writes_atomically(tmp_path, monkeypatch):
    payload = b"pretend corpus\n" * 1000
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payload, calls))
    digest = hashlib.sha256(payload).hexdigest()
    out = data.download_tinyshakespeare(tmp_path, sha256=digest)
    assert out == tmp_path / data.TINYSHAKESPEARE_NAME
    assert out.read_bytes() == payload and calls == [data.TINYSHAKESPEARE_URL]
    # a good existing copy is kept without downloading again
    assert data.download_tinyshakespeare(out, sha256=digest) == out and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.TINYSHAKESPEARE_NAME]


def test_download_hash_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(b"tampered", []))
    dest = tmp_path / "sub" / "input.txt"
    with pytest.raises(data.ChecksumError, match="expected"):
        data.download_tinyshakespeare(dest)  # checked against the real Tiny Shakespeare hash
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # the temporary file is gone too


def test_download_serves_real_corpus(tmp_path, monkeypatch):
    src = shakespeare_path()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: open(src, "rb"))
    out = data.download_tinyshakespeare(tmp_path / "input.txt")
    assert data.sha256_file(out) == data.TINYSHAKESPEARE_SHA256


def test_download_refuses_to_overwrite_a_different_file(tmp_path, monkeypatch):
    dest = tmp_path / "input.txt"
    dest.write_text("my own notes")
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(b"x", []))
    with pytest.raises(data.ChecksumError):
        data.download_tinyshakespeare(dest)
    assert dest.read_text() == "my own notes"


# --- datasets and batches ---------------------------------------------------

def test_prepare_char_dataset_split():
    tok, train, val = data.prepare_char_dataset(TEXT, val_fraction=0.1)
    n_train = int(len(TEXT) * 0.9)
    assert len(train) == n_train and len(val) == len(TEXT) - n_train
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert tok.decode(train) == TEXT[:n_train] and tok.decode(val) == TEXT[n_train:]
    with pytest.raises(ValueError):
        data.prepare_char_dataset(TEXT, val_fraction=1.0)


def test_tiny_shakespeare_matches_nanogpt():
    text = data.load_text(data.find_corpus(path=shakespeare_path()))
    tok, train, val = data.prepare_char_dataset(text)
    # the sizes nanoGPT's shakespeare_char/prepare.py prints
    assert tok.vocab_size == 65
    assert (len(train), len(val)) == (1003854, 111540)


def test_get_batch_shapes_and_shift():
    ids = np.arange(1000, dtype=np.uint16)
    rng = np.random.default_rng(0)
    x, y = data.get_batch(ids, batch_size=8, block_size=16, rng=rng)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == np.int64 and x.flags.c_contiguous and y.flags.c_contiguous
    assert np.array_equal(y[:, :-1], x[:, 1:])
    assert np.array_equal(x, x[:, :1] + np.arange(16))  # contiguous windows of the data
    assert np.array_equal(y, x + 1)
    # same seed, same batch; different seed, different batch
    x2, _ = data.get_batch(ids, 8, 16, np.random.default_rng(0))
    x3, _ = data.get_batch(ids, 8, 16, np.random.default_rng(1))
    assert np.array_equal(x, x2) and not np.array_equal(x, x3)


def test_get_batch_covers_every_offset():
    ids = np.arange(6, dtype=np.uint16)  # block 4: offsets 0 and 1 only
    x, y = data.get_batch(ids, batch_size=200, block_size=4, rng=np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == {0, 1}
    assert y.max() == 5


def test_get_batch_too_short():
    with pytest.raises(ValueError, match="at least 9"):
        data.get_batch(np.arange(8), 2, 8, np.random.default_rng(0))


# --- prepare.py --------------------------------------------------------------

def load_prepare_script():
    path = Path(__file__).resolve().parents[1] / "data" / "shakespeare_char" / "prepare.py"
    spec = importlib.util.spec_from_file_location("prepare_shakespeare_char", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_script_round_trip(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    load_prepare_script().main(["--input", str(corpus), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == len(set(TEXT)) and meta["dtype"] == "uint16"
    assert f"train has {meta['train_tokens']:,} tokens" in printed
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) + len(val) == len(TEXT) == meta["train_tokens"] + meta["val_tokens"]
    tok, mtrain, mval, meta2 = data.load_prepared_dataset(out)
    assert isinstance(tok, CharTokenizer) and tok.decode(mtrain) + tok.decode(mval) == TEXT
    assert meta2 == meta
    (out / "val.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="val.bin"):
        data.load_prepared_dataset(out)

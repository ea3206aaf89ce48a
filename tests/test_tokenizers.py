"""Character tokenizer: round trips, errors, serialisation."""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npflux.tokenizers import CharTokenizer, load_tokenizer, register_tokenizer

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_vocab_is_sorted_unique_chars():
    tok = CharTokenizer(SAMPLE)
    assert tok.chars == "".join(sorted(set(SAMPLE)))
    assert tok.vocab_size == len(set(SAMPLE))
    assert tok.encode("\n") == [0]  # '\n' sorts first, as in nanoGPT
    assert CharTokenizer.from_text(SAMPLE) == tok


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_round_trip(data):
    vocab = data.draw(st.text(min_size=1, max_size=30))
    tok = CharTokenizer(vocab)
    text = data.draw(st.text(alphabet=st.sampled_from(sorted(set(vocab))), max_size=200))
    ids = tok.encode(text)
    assert isinstance(ids, list) and len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    arr = tok.encode_array(text, dtype=np.int32)
    assert arr.dtype == np.int32 and arr.tolist() == ids
    assert tok.decode(arr) == text


def test_ids_follow_given_order():
    tok = CharTokenizer.from_chars("zyx")
    assert tok.encode("xyz") == [2, 1, 0]
    assert tok.decode([0, 0, 1]) == "zzy"


def test_unknown_character_is_named():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError) as info:
        tok.encode("abXcY\u00e9")
    msg = str(info.value)
    assert "'X'" in msg and "'Y'" in msg and "'\u00e9'" in msg and "3 character" in msg


def test_decode_out_of_range():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.array([-1]))
    assert tok.decode([]) == ""


def test_to_dict_from_dict_identity():
    tok = CharTokenizer.from_chars("q\n !a")  # a non-sorted order must survive too
    d = tok.to_dict()
    assert d == {"type": "char", "chars": "q\n !a"}
    back = load_tokenizer(json.loads(json.dumps(d)))
    assert isinstance(back, CharTokenizer) and back == tok
    assert back.encode("a q!") == tok.encode("a q!")
    assert CharTokenizer.from_dict(d).chars == tok.chars


def test_load_tokenizer_errors_and_registry():
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer({"type": "nope"})
    with pytest.raises(ValueError):
        load_tokenizer({"chars": "abc"})

    class Dummy:
        @classmethod
        def from_dict(cls, d):
            return ("dummy", d["x"])

    from npflux import tokenizers
    register_tokenizer("dummy-test", Dummy)
    try:
        assert load_tokenizer({"type": "dummy-test", "x": 3}) == ("dummy", 3)
    finally:
        tokenizers.TOKENIZERS.pop("dummy-test")


def _shakespeare():
    import os
    candidates = [Path(os.environ["NPFLUX_DATA_DIR"]) / "tinyshakespeare.txt"] if os.environ.get("NPFLUX_DATA_DIR") else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8")
    pytest.skip("tinyshakespeare.txt not available")


def test_tiny_shakespeare_vocab_65():
    text = _shakespeare()
    tok = CharTokenizer(text)
    assert tok.vocab_size == 65
    ids = tok.encode_array(text[:10000])
    assert tok.decode(ids) == text[:10000]

"""Byte-level BPE tokenizer: round trips over arbitrary Unicode, special tokens, save/load, checkpoints."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux.checkpoint import load_checkpoint, save_checkpoint
from npflux.tokenizers import (TOKENIZERS, BPETokenizer, CharTokenizer, decode_text, encode_prompt,
                               load_tokenizer)
from npflux.tokenizers.bpe import SPECIAL_TOKENS

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "Ünïcödé text — naïve café, 東京, Ελληνικά, emoji 🎉🎉, tabs\tand\r\nCRLF.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CORPUS, vocab_size=400)


def test_special_tokens_take_the_first_ids(tok):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id] == [0, 1, 2, 3]
    assert [tok.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert tok.special_ids == {0, 1, 2, 3}


def test_training_learns_merges_up_to_the_vocab_size(tok):
    assert 4 + 256 < tok.vocab_size <= 400
    # merges make the corpus shorter than its UTF-8 bytes
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2
    big = BPETokenizer.train(CORPUS, vocab_size=100_000)
    assert big.vocab_size < 100_000  # a small corpus runs out of pairs: the size says how many there are
    with pytest.raises(ValueError, match="at least 260"):
        BPETokenizer.train(CORPUS, vocab_size=100)


@given(st.text(max_size=300))
def test_any_unicode_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # byte level: no unknowns, and no special id unless asked for
    assert not set(ids) & tok.special_ids
    assert tok.decode(tok.encode(text, allow_special=True)) == text
    assert tok.encode_array(text, dtype=np.int32).tolist() == ids


# Lone surrogates (category Cs) are not text (no UTF-8 encoding; the tokenizer refuses them, tested
# below); st.characters leaves them out by default, but not once any exclusion is given.
pieces = st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS),
                            st.text(alphabet=st.characters(exclude_characters="[]", exclude_categories=("Cs",)),
                                    max_size=20)), max_size=8)


@given(pieces)
def test_special_tokens_are_never_split(tok, parts):
    """With allow_special, each "[EOS]" etc. is one id, and the text around it encodes as it would alone."""
    text = "".join(parts)
    # the text between two special tokens is encoded as one piece
    pieces, current = [], ""
    for p in parts:
        if p in SPECIAL_TOKENS:
            pieces += [current, p] if current else [p]
            current = ""
        else:
            current += p
    pieces += [current] if current else []
    expected = []
    for p in pieces:
        expected += [SPECIAL_TOKENS.index(p)] if p in SPECIAL_TOKENS else tok.encode(p)
    assert tok.encode(text, allow_special=True) == expected
    assert tok.decode(expected) == text
    # without allow_special the same characters are plain text: no special id appears
    assert not set(tok.encode(text)) & tok.special_ids
    assert tok.decode(tok.encode(text)) == text


def test_decode_can_skip_special_tokens(tok):
    ids = [tok.bos_id] + tok.encode("hear me") + [tok.eos_id]
    assert tok.decode(ids) == "[BOS]hear me[EOS]"
    assert tok.decode(ids, skip_special_tokens=True) == "hear me"
    assert decode_text(tok, ids) == "hear me"
    assert encode_prompt(tok, "hear") == [tok.bos_id] + tok.encode("hear")
    assert encode_prompt(tok, "") == [tok.bos_id]


def test_bad_input_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode(np.array([1.5]))
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a\ud800b")


def test_save_and_load_give_identical_ids(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    assert path.is_file()
    json.loads(path.read_text(encoding="utf-8"))  # one plain JSON file
    loaded = BPETokenizer.load(path)
    assert loaded == tok and loaded.vocab_size == tok.vocab_size
    text = "".join(CORPUS[:4]) + " [EOS] unseen wörds ∮"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    # Hugging Face reads the same file
    import tokenizers

    assert tokenizers.Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids == \
        tok.encode(text, allow_special=True)
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer"):
        BPETokenizer.load(tmp_path / "bad.json")


def test_loading_needs_the_special_tokens(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    with pytest.raises(ValueError, match="special token"):
        BPETokenizer(hf)
    # the four special tokens, but not byte level: unseen characters would become [UNK], silently
    wordlevel = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    wordlevel.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                                                      show_progress=False))
    wordlevel.save(str(tmp_path / "not-byte-level.json"))
    with pytest.raises(ValueError, match="not byte-level"):
        BPETokenizer.load(tmp_path / "not-byte-level.json")


def test_registered_and_restored_from_a_checkpoint(tok, tmp_path):
    assert TOKENIZERS["bpe"] is BPETokenizer
    d = tok.to_dict()
    assert d["type"] == "bpe" and json.loads(json.dumps(d)) == d
    assert load_tokenizer(d) == tok
    save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)}, {"model": {}}, tokenizer=tok)
    restored = load_tokenizer(load_checkpoint(tmp_path / "ckpt").tokenizer)
    assert restored.encode(CORPUS[3]) == tok.encode(CORPUS[3])
    with pytest.raises(ValueError, match="not a BPE"):
        BPETokenizer.from_dict({"type": "char", "chars": "ab"})
    # the char tokenizer is untouched by all this
    assert load_tokenizer(CharTokenizer("ab").to_dict()) == CharTokenizer("ab")


def test_same_corpus_trains_the_same_tokenizer():
    assert BPETokenizer.train(CORPUS, vocab_size=350) == BPETokenizer.train(CORPUS, vocab_size=350)


def test_tinyshakespeare_compresses(shared_data_dir):
    path = shared_data_dir / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("tinyshakespeare.txt not available")
    text = path.read_text(encoding="utf-8")[:200_000]
    tok = BPETokenizer.train(text, vocab_size=2000)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text) / len(ids) > 2.5  # characters per token

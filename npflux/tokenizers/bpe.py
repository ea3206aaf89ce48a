"""A byte-level BPE tokenizer with special tokens, on Hugging Face ``tokenizers``.

The BPE machinery (training the merges, applying them) is Hugging Face's
Rust library; this class puts it behind npflux's tokenizer interface
(``encode``, ``decode``, ``vocab_size``, ``to_dict`` / ``from_dict``), so
the char tokenizer and BPE are interchangeable in training, sampling and
checkpoints.

Byte level, as GPT-2: text is cut into words by GPT-2's pre-tokenizing
regex, each word's UTF-8 bytes are mapped to 256 printable stand-ins, and
merges are learned over those. Every byte is in the base alphabet, so any
Unicode string encodes (no unknown tokens) and decodes back exactly.

Special tokens take the first ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2,
``[EOS]`` 3. ``[BOS]`` and ``[EOS]`` mark document boundaries
(``npflux.data.pack_documents``); ``[PAD]`` fills batches of unequal
length; ``[UNK]`` is kept for interfaces that expect one, but byte-level
encoding never produces it. ``encode(text)`` treats text that happens to
spell ``"[EOS]"`` as ordinary characters (user text cannot inject a control
token); ``encode(text, allow_special=True)`` turns such spellings into the
single special id, never splitting one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import Tokenizer

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
_PROBE = "Tab\there, nul \x00, é, 東京, 🎉"  # characters a byte-level tokenizer encodes whether or not it saw them


def _check_utf8(text: str):
    """ValueError naming the position of a lone surrogate (it has no UTF-8 bytes, so no byte-level ids)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: a lone surrogate {text[exc.start]!r} at position {exc.start}") from None


def _hf():
    try:
        import tokenizers
    except ImportError as exc:  # a core dependency; this only happens in a broken install
        raise ImportError("the BPE tokenizer needs Hugging Face `tokenizers` (pip install tokenizers)") from exc
    return tokenizers


class BPETokenizer(Tokenizer):
    """Byte-level BPE with ``[PAD] [UNK] [BOS] [EOS]``.

    Build one with ``BPETokenizer.train(texts, vocab_size)``, or load one
    with ``BPETokenizer.load(path)`` / ``from_dict``. ``bos_id``, ``eos_id``,
    ``pad_id``, ``unk_id`` are the special ids; ``special_ids`` all four.
    """

    type = "bpe"

    def __init__(self, hf_tokenizer):
        """Wrap a ``tokenizers.Tokenizer`` that holds the four special tokens."""
        self._set(hf_tokenizer.to_str())

    def _set(self, json_str: str):
        tokenizers = _hf()
        self._json = json_str
        # Two copies of one tokenizer: one reads "[EOS]" in text as the special token, the
        # other as five ordinary characters (the flag lives on the tokenizer, not the call).
        self._with_special = tokenizers.Tokenizer.from_str(json_str)
        self._plain = tokenizers.Tokenizer.from_str(json_str)
        self._with_special.encode_special_tokens = False
        self._plain.encode_special_tokens = True
        ids = {t: self._plain.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"BPE tokenizer lacks the special token(s) {missing}; train it with BPETokenizer.train")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (ids[t] for t in SPECIAL_TOKENS)
        self.special_ids = frozenset(ids.values())
        # Everything here assumes lossless byte-level encoding; a loaded file that is not (WordPiece,
        # a character-level BPE with [UNK]) would silently turn unseen characters into [UNK].
        if self._plain.decode(self._plain.encode(_PROBE, add_special_tokens=False).ids) != _PROBE:
            raise ValueError(f"this tokenizer is not byte-level: {_PROBE!r} does not survive encode and decode "
                             f"(unseen characters would be lost); train one with BPETokenizer.train")

    # -- training --------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int = 10_000, min_frequency: int = 2, show_progress: bool = False):
        """Learn merges from ``texts`` (a str, or an iterable of str: one per document).

        ``vocab_size`` counts everything: the 4 special tokens, the 256 bytes
        and the merges. A small corpus may run out of pairs worth merging
        (seen at least ``min_frequency`` times) first; the vocabulary is
        then smaller, and ``vocab_size`` of the result says how large.
        """
        tokenizers = _hf()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        base = len(SPECIAL_TOKENS) + 256
        if int(vocab_size) < base:
            raise ValueError(f"vocab_size must be at least {base} (4 special tokens + 256 bytes), got {vocab_size}")
        if isinstance(texts, str):
            texts = [texts]
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    # -- the tokenizer interface ----------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size(with_added_tokens=True)

    def _identity(self):
        return self._json

    def encode(self, text: str, allow_special: bool = False) -> list:
        """Ids of ``text``; with ``allow_special``, "[BOS]" etc. in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode needs a str, got {type(text).__name__}")
        hf = self._with_special if allow_special else self._plain
        try:
            return hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_utf8(text)
            raise

    def encode_array(self, text: str, dtype=np.int64, allow_special: bool = False) -> np.ndarray:
        """Ids of ``text`` as a host NumPy array."""
        return np.asarray(self.encode(text, allow_special=allow_special), dtype=dtype)

    def encode_batch(self, texts, allow_special: bool = False) -> list:
        """Ids of each text (Hugging Face encodes them on all cores)."""
        hf = self._with_special if allow_special else self._plain
        texts = list(texts)
        try:
            return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"BPETokenizer.encode_batch needs str items, got {type(text).__name__}") from None
                _check_utf8(text)
            raise

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; special ids appear as "[EOS]" etc. unless skipped.

        A slice of ids that cuts a multi-byte character shows U+FFFD for the
        partial character (whole encodings always decode exactly).
        """
        ids = self._checked_ids(ids)
        return self._plain.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (byte-level: bytes shown as GPT-2's stand-in characters)."""
        return self._plain.id_to_token(int(i))

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"type": "bpe", "tokenizer": <the Hugging Face tokenizer JSON as a str>}``."""
        return {"type": self.type, "tokenizer": self._json}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        if d.get("type") != cls.type or not isinstance(d.get("tokenizer"), str):
            raise ValueError(f"not a BPE tokenizer description (type {d.get('type')!r})")
        tok = cls.__new__(cls)
        tok._set(d["tokenizer"])
        return tok

    def save(self, path) -> Path:
        """Write the tokenizer as one JSON file (Hugging Face's tokenizer.json format)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Pretty-printed like Hugging Face's own files; from_str reads it back to the same tokenizer.
        path.write_text(json.dumps(json.loads(self._json), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        """Read a file written by ``save`` (or any byte-level tokenizer.json with the four special tokens)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            canonical = _hf().Tokenizer.from_str(text).to_str()
        except Exception as exc:  # tokenizers raises its own exception type
            raise ValueError(f"{path} is not a Hugging Face tokenizer JSON file: {exc}") from exc
        tok = cls.__new__(cls)
        tok._set(canonical)
        return tok

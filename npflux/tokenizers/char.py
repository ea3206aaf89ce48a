"""A character-level tokenizer, as nanoGPT's shakespeare_char.

The vocabulary is the sorted set of characters of a text; a character's id
is its position in that list. Tiny Shakespeare has 65 distinct characters,
so its vocabulary size is 65 and its ids fit in uint16.
"""
from __future__ import annotations

import numpy as np

from .base import Tokenizer


class CharTokenizer(Tokenizer):
    """Maps each character of a fixed vocabulary to an integer and back.

    ``CharTokenizer(text)`` builds the vocabulary from ``text`` (its sorted
    unique characters). ``CharTokenizer.from_chars(chars)`` uses ``chars``
    in the given order, which is what ``from_dict`` needs to give back the
    exact same ids.
    """

    type = "char"

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer needs a str, got {type(text).__name__}")
        self._set_chars("".join(sorted(set(text))))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of ``text``: its sorted unique characters."""
        return cls(text)

    @classmethod
    def from_chars(cls, chars) -> "CharTokenizer":
        """A vocabulary given explicitly; id i is ``chars[i]``."""
        tok = cls.__new__(cls)
        tok._set_chars("".join(chars))
        return tok

    def _set_chars(self, chars: str):
        if not chars:
            raise ValueError("a character vocabulary needs at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary characters must be unique")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.itos = list(chars)
        # For vectorised encoding: code points sorted, and the id of each.
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[self._order]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _identity(self):
        return self.chars

    def encode_array(self, text: str, dtype=np.int64) -> np.ndarray:
        """Ids of ``text`` as a host NumPy array (fast: no Python loop per character)."""
        # UTF-32 gives exactly one 4-byte code point per Python character.
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_codes, codes)
        pos = np.minimum(pos, len(self._sorted_codes) - 1)
        unknown = self._sorted_codes[pos] != codes
        if unknown.any():
            bad = sorted({chr(c) for c in codes[unknown]})
            shown = ", ".join(repr(c) for c in bad[:20]) + (", ..." if len(bad) > 20 else "")
            raise ValueError(
                f"{int(unknown.sum())} character(s) not in the vocabulary "
                f"({len(bad)} distinct: {shown}); the tokenizer knows {self.vocab_size} characters")
        return self._order[pos].astype(dtype, copy=False)

    def encode(self, text: str) -> list:
        """Ids of ``text`` as a list of ints; ValueError names unknown characters."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """The text of ``ids`` (a list, or a NumPy/CuPy integer array)."""
        ids = self._checked_ids(ids)
        return "".join([self.itos[i] for i in ids.tolist()])

    def to_dict(self) -> dict:
        """JSON-serialisable description: ``{"type": "char", "chars": ...}``."""
        return {"type": self.type, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        """Inverse of ``to_dict``."""
        if d.get("type") != cls.type:
            raise ValueError(f"not a char tokenizer description (type {d.get('type')!r})")
        return cls.from_chars(d["chars"])

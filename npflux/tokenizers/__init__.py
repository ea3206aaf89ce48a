"""Tokenizers: text <-> integer ids.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, and ``to_dict()`` giving a JSON-serialisable dict with a
``"type"`` key; ``load_tokenizer(d)`` turns such a dict back into a
tokenizer. A new kind registers itself in ``TOKENIZERS`` (or with
``register_tokenizer``) under its type name.
"""
from __future__ import annotations

from .char import CharTokenizer

TOKENIZERS = {"char": CharTokenizer}


def register_tokenizer(type_name: str, cls):
    """Make ``load_tokenizer`` build ``cls.from_dict(d)`` for ``d["type"] == type_name``."""
    TOKENIZERS[type_name] = cls
    return cls


def load_tokenizer(d: dict):
    """Rebuild a tokenizer from its ``to_dict()`` description."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError("a tokenizer description is a dict with a 'type' key")
    cls = TOKENIZERS.get(d["type"])
    if cls is None:
        raise ValueError(f"unknown tokenizer type {d['type']!r}; known: {', '.join(sorted(TOKENIZERS))}")
    return cls.from_dict(d)


__all__ = ["CharTokenizer", "TOKENIZERS", "load_tokenizer", "register_tokenizer"]

"""Tokenizers: text <-> integer ids.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, and ``to_dict()`` giving a JSON-serialisable dict with a
``"type"`` key; ``load_tokenizer(d)`` turns such a dict back into a
tokenizer. A new kind subclasses ``Tokenizer`` (equality, hashing, id checks)
and registers itself in ``TOKENIZERS`` (or with ``register_tokenizer``) under
its type name.
"""
from __future__ import annotations

from .base import Tokenizer
from .bpe import BPETokenizer
from .char import CharTokenizer

TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


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


def encode_prompt(tokenizer, text: str) -> list:
    """Ids to start generation from: ``[BOS]`` then the text, for tokenizers that mark documents.

    A model trained on ``[BOS] doc [EOS]`` documents expects ``[BOS]`` at a
    document's start; a char tokenizer has none and needs some text.
    """
    bos = getattr(tokenizer, "bos_id", None)
    ids = ([] if bos is None else [bos]) + tokenizer.encode(text)
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no [BOS] token to start from")
    return ids


def decode_text(tokenizer, ids) -> str:
    """The text of ``ids`` without special tokens (what to show a reader)."""
    special = getattr(tokenizer, "special_ids", None)
    if not special:
        return tokenizer.decode(ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


__all__ = ["BPETokenizer", "CharTokenizer", "TOKENIZERS", "Tokenizer", "decode_text", "encode_prompt", "load_tokenizer",
           "register_tokenizer"]

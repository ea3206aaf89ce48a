"""The extractive reader's words: a vocabulary with hash buckets, DrQA's match feature, and the model's inputs.

    vocab = ReaderVocab.build(texts)                      # the words the texts repeat; the rest hashed
    windows = vocab.encode(question, passage, block_size) # ids, segment, match, shape, allowed, offsets
    batch = collate(windows)                              # padded (B, T) arrays for npflux.models.Reader

See ``npflux.models.reader`` for what each input means to the model.
"""
from __future__ import annotations

import re
import zlib
from collections import Counter

import numpy as np

from ..models.reader import CLS, PAD, SEP, SPECIALS

_SUFFIXES = ("ing", "ed", "es", "s")
_WORD = re.compile(r"\d+(?:[.,]\d+)*|\w+|[^\w\s]")


def word_spans(text: str) -> list:
    """[(word, start, end)] of ``text``: words (the digits of "299,792" or "1.45" kept in one) and single
    punctuation marks, with their character offsets, so a span of words is a span of the original text."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def stem(word: str) -> str:
    """A crude English stem: lower case, one suffix of ing/ed/es/s cut, then a final e (at least 3 letters kept)."""
    w = word.lower()
    for suffix in _SUFFIXES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    return w[:-1] if w.endswith("e") and len(w) > 3 else w


def _shape(word: str) -> int:
    if word[0].isdigit():
        return 2
    if not (word[0].isalnum() or word[0] == "_"):
        return 3
    return 1 if word[0].isupper() else 0


class ReaderVocab:
    """Words to ids: the known words, and hash buckets for the rest (see the module docstring)."""

    def __init__(self, words, n_buckets: int = 1024):
        self.words = list(words)
        self.n_buckets = int(n_buckets)
        self.index = {w: SPECIALS + i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts, min_count: int = 20, n_buckets: int = 1024) -> "ReaderVocab":
        """The lower-cased words that occur at least ``min_count`` times in ``texts``, most frequent first."""
        counts = Counter(w.lower() for t in texts for w, _, _ in word_spans(t))
        return cls(sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)), n_buckets)

    @property
    def size(self) -> int:
        return SPECIALS + len(self.words) + self.n_buckets

    def id(self, word: str) -> int:
        w = word.lower()
        known = self.index.get(w)
        return known if known is not None else SPECIALS + len(self.words) + zlib.crc32(w.encode()) % self.n_buckets

    def to_dict(self) -> dict:
        return {"type": "reader-words", "words": self.words, "n_buckets": self.n_buckets}

    @classmethod
    def from_dict(cls, d: dict) -> "ReaderVocab":
        if d.get("type") != "reader-words":
            raise ValueError(f"not a reader vocabulary: type {d.get('type')!r}")
        return cls(d["words"], d["n_buckets"])

    def __eq__(self, other):
        return isinstance(other, ReaderVocab) and self.to_dict() == other.to_dict()

    # -- one question and passage -> the model's inputs --------------------------------------
    def encode(self, question: str, passage: str, block_size: int, stride: int | None = None) -> list:
        """The inputs for ``question`` over ``passage``: one dict per window of the passage that fits.

        Each dict: ``ids``, ``segment``, ``match``, ``shape`` (T,) int arrays,
        ``allowed`` (T,) bool (the passage's words and [CLS]), and
        ``offsets``: (start, end) characters in the passage of each position
        (None for [CLS], the question and [SEP]). A passage longer than the
        room left by the question is cut into windows ``stride`` words apart
        (default: half the room), so every word is in some window.
        """
        q = word_spans(question)[: block_size // 2]
        p = word_spans(passage)
        room = block_size - len(q) - 2
        stride = stride or max(room // 2, 1)
        q_exact = {w.lower() for w, _, _ in q}
        q_stems = {stem(w) for w, _, _ in q}
        p_exact = {w.lower() for w, _, _ in p}
        p_stems = {stem(w) for w, _, _ in p}

        def match(word, exact, stems):
            return 2 if word.lower() in exact else 1 if stem(word) in stems else 0

        head = {"ids": [CLS] + [self.id(w) for w, _, _ in q] + [SEP],
                "segment": [0] * (len(q) + 2),
                "match": [0] + [match(w, p_exact, p_stems) for w, _, _ in q] + [0],
                "shape": [4] + [_shape(w) for w, _, _ in q] + [4]}
        windows, start = [], 0
        while True:
            chunk = p[start: start + room]
            window = {"ids": head["ids"] + [self.id(w) for w, _, _ in chunk],
                      "segment": head["segment"] + [1] * len(chunk),
                      "match": head["match"] + [match(w, q_exact, q_stems) for w, _, _ in chunk],
                      "shape": head["shape"] + [_shape(w) for w, _, _ in chunk]}
            window = {k: np.asarray(v, dtype=np.int64) for k, v in window.items()}
            window["allowed"] = np.zeros(len(window["ids"]), dtype=bool)
            window["allowed"][0] = True
            window["allowed"][len(q) + 2:] = True
            window["offsets"] = [None] * (len(q) + 2) + [(a, b) for _, a, b in chunk]
            windows.append(window)
            if start + room >= len(p):
                return windows
            start += stride


def collate(windows, starts=None, ends=None) -> dict:
    """Windows of ``ReaderVocab.encode`` padded into one batch: (B, T) arrays (T the longest), PAD = 0."""
    T = max(len(w["ids"]) for w in windows)
    batch = {}
    for key, fill in (("ids", PAD), ("segment", 0), ("match", 0), ("shape", 4), ("allowed", False)):
        arr = np.full((len(windows), T), fill, dtype=bool if key == "allowed" else np.int64)
        for i, w in enumerate(windows):
            arr[i, : len(w[key])] = w[key]
        batch[key] = arr
    if starts is not None:
        batch["starts"] = np.asarray(starts, dtype=np.int64)
        batch["ends"] = np.asarray(ends, dtype=np.int64)
    return batch

"""An extractive reader: an encoder over ``[CLS] question [SEP] passage`` that points at the answer's span.

    words -> ids, segment, match, shape (ReaderVocab.encode)
          -> wte[id] + wpe[position] + seg[segment] + match[match] + shape[shape]     (B, T, C)
          -> TransformerEncoder (non-causal Blocks, padding masked, final LayerNorm)
          -> span head Linear(C, 2) -> start logits, end logits (B, T)
          -> loss = CE(start) + CE(end) over the passage's positions and [CLS]     (npflux.ops.span)

The inputs, word by word (``npflux.tasks.qa.word_spans``):

- ``id``: the word, lower-cased, if the vocabulary knows it (the words the
  training data repeats: the grammar of questions and facts); any other word
  goes to one of ``n_buckets`` ids by a hash of its lower-cased form (the
  hashing trick), so an unseen name still has an id, the same in the
  question as in the passage, and attention can match the two.
- ``segment``: 0 for [CLS], the question and [SEP]; 1 for the passage.
- ``match``: whether the word also occurs in the other segment: 2 exactly
  (lower-cased), 1 by its stem ("boils" / "boil", "created" / "create": a
  few English suffixes cut), 0 not at all. This is DrQA's exact-match
  feature (Chen et al., 2017); it tells the reader which passage words the
  question is about.
- ``shape``: lower-case word, Capitalised word, number, punctuation, special.

[CLS] is the span "no answer" (SQuAD 2.0's convention, Devlin et al. 2019):
a passage that does not answer the question is trained to point both ends
at it, so a span's score can be set against the passage's no-answer score.
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..backend import check_int, get_backend, to_numpy
from ..nn import Embedding, Linear, Module, PositionalEmbedding, TransformerEncoder
from .config import ConfigDict

PAD, CLS, SEP = 0, 1, 2
SPECIALS = 3
SHAPES = ("lower", "capitalised", "number", "punctuation", "special")
_SUFFIXES = ("ing", "ed", "es", "s")


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


@dataclass
class ReaderConfig(ConfigDict):
    vocab_size: int              # specials + known words + hash buckets
    block_size: int = 96         # words per input: [CLS] question [SEP] passage
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    max_answer_words: int = 12   # the longest span the reader answers with

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "max_answer_words"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ReaderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


class ReaderVocab:
    """Words to ids: the known words, and hash buckets for the rest (see the module docstring)."""

    def __init__(self, words, n_buckets: int = 1024):
        self.words = list(words)
        self.n_buckets = int(n_buckets)
        self.index = {w: SPECIALS + i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts, min_count: int = 20, n_buckets: int = 1024) -> "ReaderVocab":
        """The lower-cased words that occur at least ``min_count`` times in ``texts``, most frequent first."""
        from ..tasks.qa import word_spans  # here: npflux.tasks loads a tokenizer, which npflux.checkpoint must not
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
        from ..tasks.qa import word_spans

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


class Reader(Module):
    def __init__(self, config: ReaderConfig, seed: int = 0, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.config = c = config
        rng = get_backend("numpy").rng(seed)
        kw = dict(backend=self.backend, dtype=self.dtype)
        self.wte = Embedding(c.vocab_size, c.n_embd, rng=rng, **kw)
        self.wpe = PositionalEmbedding(c.block_size, c.n_embd, rng=rng, **kw)
        self.seg = Embedding(2, c.n_embd, rng=rng, **kw)
        self.match = Embedding(3, c.n_embd, rng=rng, **kw)
        self.shape = Embedding(len(SHAPES), c.n_embd, rng=rng, **kw)
        self.encoder = TransformerEncoder(c.n_embd, c.n_head, c.n_layer, activation="gelu", dropout=c.dropout,
                                          rng=rng, dropout_rng=self.backend.rng(seed + 1), **kw)
        self.span_head = Linear(c.n_embd, 2, rng=rng, **kw)
        self.flatten_parameters()
        self.loss_cache = None

    def forward(self, batch):
        """(start logits (B, T), end logits (B, T)) and the span loss (None without ``starts`` / ``ends``).

        ``batch`` is ``collate``'s dict: ids, segment, match, shape, allowed
        (B, T); starts and ends (B,) word positions to train on ([CLS], 0,
        for "no answer"). The logits of positions outside ``allowed`` are
        left as computed (the loss and ``best_spans`` ignore them).
        """
        xp = self.xp
        ids = xp.asarray(batch["ids"])
        check_int(ids, "Reader: ids")
        if ids.ndim != 2 or ids.shape[1] > self.config.block_size:
            raise ValueError(f"Reader: ids must be (B, T) with T <= {self.config.block_size}, got {ids.shape}")
        x = self.wte.forward(ids) + self.seg.forward(xp.asarray(batch["segment"])) + \
            self.match.forward(xp.asarray(batch["match"])) + self.shape.forward(xp.asarray(batch["shape"]))
        x = self.wpe.forward(x)
        pad = ids != PAD
        h = self.encoder.forward(x, None if bool(pad.all()) else pad)
        logits = self.span_head.forward(h)
        start, end = logits[..., 0], logits[..., 1]
        if batch.get("starts") is None:
            self.loss_cache = None
            return (start, end), None
        loss, self.loss_cache = ops.span_loss_forward(start, end, xp.asarray(batch["starts"]),
                                                      xp.asarray(batch["ends"]), xp.asarray(batch["allowed"]))
        return (start, end), loss

    def backward(self, loss_scale=1.0):
        """Gradients of ``loss_scale * loss`` of the last forward, ADDED into ``grads``: the forward in reverse."""
        if self.loss_cache is None:
            raise RuntimeError("Reader.backward: call forward(batch) with starts and ends first")
        dstart, dend = ops.span_loss_backward(loss_scale, self.loss_cache)
        dx = self.encoder.backward(self.span_head.backward(self.xp.stack([dstart, dend], axis=-1)))
        dx = self.wpe.backward(dx)
        for embedding in (self.wte, self.seg, self.match, self.shape):
            embedding.backward(dx)
        self.loss_cache = None


def best_spans(start, end, allowed, max_words: int):
    """Per row: (i, j, score) of the best span i <= j < i + max_words over the allowed positions but [CLS],
    with score = start[i] + end[j] - (start[0] + end[0]): how far the span beats "no answer".

    Host arrays in, host values out (a row with no passage word gets (0, 0, -inf)).
    """
    start, end, allowed = to_numpy(start).astype(np.float64), to_numpy(end).astype(np.float64), to_numpy(allowed)
    B, T = start.shape
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    band = (j >= i) & (j < i + max_words)
    out = []
    for b in range(B):
        ok = allowed[b].copy()
        ok[0] = False
        valid = band & ok[:, None] & ok[None, :]
        if not valid.any():
            out.append((0, 0, -np.inf))
            continue
        scores = np.where(valid, start[b][:, None] + end[b][None, :], -np.inf)
        k = int(np.argmax(scores))
        out.append((k // T, k % T, float(scores.flat[k] - (start[b, 0] + end[b, 0]))))
    return out


@dataclass
class Span:
    """An answer read from a passage: its text, characters [start, end) in the passage, and its score."""
    text: str
    start: int
    end: int
    score: float


def read_pairs(reader, vocab: ReaderVocab, pairs, batch_size: int = 64) -> list:
    """The best span (a ``Span``) of each (question, passage) pair, over the passage's windows when long; eval mode."""
    windows, owner = [], []
    for n, (question, passage) in enumerate(pairs):
        for w in vocab.encode(question, passage, reader.config.block_size):
            windows.append(w)
            owner.append(n)
    best = [Span("", 0, 0, -np.inf) for _ in pairs]
    with reader.evaluating():
        for lo in range(0, len(windows), batch_size):
            chunk, owners = windows[lo: lo + batch_size], owner[lo: lo + batch_size]
            batch = collate(chunk)
            (start, end), _ = reader.forward(batch)
            spans = best_spans(start, end, batch["allowed"], reader.config.max_answer_words)
            for w, n, (i, j, score) in zip(chunk, owners, spans):
                if score > best[n].score:
                    a, b = w["offsets"][i][0], w["offsets"][j][1]
                    best[n] = Span(pairs[n][1][a:b], a, b, score)
    reader.loss_cache = None
    return best


def read(reader, vocab: ReaderVocab, question: str, passages, batch_size: int = 64) -> list:
    """The best span of each passage for ``question``: ``read_pairs`` with one question."""
    return read_pairs(reader, vocab, [(question, p) for p in passages], batch_size)

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

Host-side, around the model: the vocabulary and the inputs in
``npflux.tokenizers.words`` (``ReaderVocab``, ``collate``); the best span and
reading passages in ``npflux.tasks.qa`` (``best_spans``, ``read``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..backend import check_int, get_backend
from ..nn import Embedding, Linear, Module, PositionalEmbedding, TransformerEncoder
from .config import ConfigDict

# The ids and features the word vocabulary (npflux.tokenizers.words) gives the model.
PAD, CLS, SEP = 0, 1, 2
SPECIALS = 3
SHAPES = ("lower", "capitalised", "number", "punctuation", "special")


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

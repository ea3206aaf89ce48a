"""An encoder-decoder transformer (Vaswani et al., 2017, pre-LayerNorm), forward and backward by hand.

    src (B, S) -> wte * sqrt(C) + positions -> dropout -> encoder (Block x N, ln_f) -> memory
    tgt (B, T) -> wte * sqrt(C) + positions -> dropout -> decoder (causal Block with
                  cross-attention to memory, x M, ln_f) -> lm_head -> logits (B, T, V_tgt)

The stacks are ``npflux.nn.EncoderDecoder`` (``torch.nn.Transformer`` with
``norm_first=True``). Embeddings are shared between source and target or
separate; positions are sinusoidal (fixed) or learned; the output head is
tied to the target embedding or its own matrix. Padding masks come from the
ids (``pad_id``) unless given: the encoder's keys and the cross-attention's
keys skip padded source positions, the decoder's keys skip padded target
positions, and its self-attention is causal.

Decoding is greedy or beam search, step by step with a key/value cache of
the decoder's self-attention, and one of the memory's keys and values for
each cross-attention (projected at the first step, not at every step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import ops
from ..backend import check_int, get_backend, to_numpy
from ..nn import Dropout, Embedding, KVCache, Module, PositionalEmbedding, SinusoidalPositionalEncoding
from ..nn.encoder_decoder import EncoderDecoder
from .config import ConfigDict

MODEL_TYPE = "seq2seq"


@dataclass
class Seq2SeqConfig(ConfigDict):
    src_vocab_size: int
    tgt_vocab_size: int
    src_block_size: int          # longest source the positions cover
    tgt_block_size: int          # longest decoder input (BOS + output)
    n_encoder_layer: int = 2
    n_decoder_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    ffn_hidden: int | None = None  # 4 * n_embd when None
    dropout: float = 0.0
    bias: bool = True
    qkv_bias: bool = True
    activation: str = "relu"     # "relu" (the original transformer) or "gelu" (tanh form)
    positions: str = "sinusoidal"  # "sinusoidal" (fixed) or "learned"
    shared_embeddings: bool = False  # one table for source and target (needs one vocabulary)
    tie_weights: bool = True     # lm_head reads the target embedding
    scale_embeddings: bool = True  # embeddings times sqrt(n_embd), as the paper
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "src_block_size", "tgt_block_size", "n_head", "n_embd"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Seq2SeqConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_encoder_layer", "n_decoder_layer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Seq2SeqConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {self.positions!r}")
        if self.shared_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"shared embeddings need one vocabulary, got sizes {self.src_vocab_size} "
                             f"and {self.tgt_vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        if len(set(ids.values())) != 3:
            raise ValueError(f"pad, bos and eos ids must differ, got {ids}")
        for name, value in ids.items():
            if not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"{name} {value} is outside the vocabulary")



class Seq2SeqTransformer(Module):
    def __init__(self, config: Seq2SeqConfig, seed: int = 0, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.config = c = config
        init_rng = get_backend("numpy").rng(seed)
        self.dropout_rng = self.backend.rng(seed + 1)
        kw = dict(backend=self.backend, dtype=self.dtype)
        # Scaled by sqrt(C) in the forward, embeddings drawn with std 1/sqrt(C) start at unit
        # scale, the scale of the sinusoids they are added to.
        emb_std = 1.0 / math.sqrt(c.n_embd) if c.scale_embeddings else 0.02
        if c.shared_embeddings:
            self.wte = Embedding(c.src_vocab_size, c.n_embd, std=emb_std, rng=init_rng, **kw)
        else:
            self.src_wte = Embedding(c.src_vocab_size, c.n_embd, std=emb_std, rng=init_rng, **kw)
            self.tgt_wte = Embedding(c.tgt_vocab_size, c.n_embd, std=emb_std, rng=init_rng, **kw)
        if c.positions == "learned":
            self.src_wpe = PositionalEmbedding(c.src_block_size, c.n_embd, rng=init_rng, **kw)
            self.tgt_wpe = PositionalEmbedding(c.tgt_block_size, c.n_embd, rng=init_rng, **kw)
        else:
            self.src_wpe = SinusoidalPositionalEncoding(c.src_block_size, c.n_embd, **kw)
            self.tgt_wpe = SinusoidalPositionalEncoding(c.tgt_block_size, c.n_embd, **kw)
        self.src_drop = Dropout(c.dropout, rng=self.dropout_rng, **kw)
        self.tgt_drop = Dropout(c.dropout, rng=self.dropout_rng, **kw)
        self.transformer = EncoderDecoder(
            c.n_embd, c.n_head, c.n_encoder_layer, c.n_decoder_layer, activation=c.activation, bias=c.bias,
            qkv_bias=c.qkv_bias, dropout=c.dropout, eps=c.layer_norm_eps, hidden=c.ffn_hidden, rng=init_rng,
            dropout_rng=self.dropout_rng, **kw)
        self.lm_head = Module(**kw)
        if not c.tie_weights:
            self.lm_head.add_param("weight", init_rng.normal(0.0, 0.02, (c.tgt_vocab_size, c.n_embd)))
        self.flatten_parameters()
        self.loss_cache = None
        self._cache = None

    # -- embeddings ------------------------------------------------------------------
    def _table(self, side):
        """The (weight, grad) of the source or target embedding (one pair when shared)."""
        owner = self.wte if self.config.shared_embeddings else getattr(self, f"{side}_wte")
        return owner.p["weight"], owner.g["weight"]

    def _head_weight(self):
        return self._table("tgt") if self.config.tie_weights else (self.lm_head.p["weight"], self.lm_head.g["weight"])

    def _scale(self):
        return math.sqrt(self.config.n_embd) if self.config.scale_embeddings else 1.0

    def _embed(self, side, ids, offset=0):
        """x = drop(table[ids] * scale + positions[offset:offset+T]); returns x and the lookup's cache."""
        x, cache = ops.embedding_forward(ids, self._table(side)[0])
        if self.config.scale_embeddings:
            x = x * self._scale()
        x = getattr(self, f"{side}_wpe").forward(x, offset=offset)
        return getattr(self, f"{side}_drop").forward(x), cache

    def _embed_backward(self, side, dx, cache):
        dx = getattr(self, f"{side}_wpe").backward(getattr(self, f"{side}_drop").backward(dx))
        if self.config.scale_embeddings:
            dx = dx * self._scale()
        self._table(side)[1][...] += ops.embedding_backward(dx, cache)

    # -- inputs -------------------------------------------------------------------------
    def _ids(self, ids, name, block):
        check_int(ids, f"Seq2SeqTransformer: {name}")
        ids = self.backend.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"Seq2SeqTransformer: {name} must be (B, T) token ids with T >= 1, got shape {ids.shape}")
        if ids.shape[1] > block:
            raise ValueError(f"Seq2SeqTransformer: {name} has length {ids.shape[1]}, more than the "
                             f"{block} positions of the model")
        return ids

    def _mask(self, mask, ids, name):
        """The (B, T) padding mask (True = real token): given, or ids != pad_id; None when nothing is padded."""
        if mask is None:
            mask = ids != self.config.pad_id
        else:
            mask = self.backend.asarray(mask)
            if mask.dtype != bool or mask.shape != ids.shape:
                raise ValueError(f"Seq2SeqTransformer: {name} must be boolean of shape {ids.shape} "
                                 f"(True = real token), got {mask.dtype} {mask.shape}")
        if name == "src_mask" and not bool(mask.any(axis=1).all()):
            # the cross-attention would see no key at all: every output would be read from nothing
            empty = [int(i) for i in to_numpy(~mask.any(axis=1)).nonzero()[0]]
            raise ValueError(f"Seq2SeqTransformer: source row(s) {empty} hold no real token (all padding, "
                             f"pad_id {self.config.pad_id})")
        return None if bool(mask.all()) else mask

    # -- forward and backward --------------------------------------------------------------
    def forward(self, src, tgt, targets=None, src_mask=None, tgt_mask=None):
        """logits (B, T, V_tgt) of the next target token at every position, and the mean loss.

        src (B, S) and tgt (B, T) are token ids; tgt is the decoder input
        (BOS followed by the output, teacher forcing). ``targets`` (B, T)
        holds the tokens to predict, -100 where there is nothing to predict
        (padding). Masks are (B, S) / (B, T) booleans, True = real token; by
        default every id other than ``pad_id``.
        """
        c = self.config
        src = self._ids(src, "src", c.src_block_size)
        tgt = self._ids(tgt, "tgt", c.tgt_block_size)
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"Seq2SeqTransformer: src has {src.shape[0]} rows, tgt {tgt.shape[0]}")
        src_mask, tgt_mask = self._mask(src_mask, src, "src_mask"), self._mask(tgt_mask, tgt, "tgt_mask")
        x_src, src_cache = self._embed("src", src)
        x_tgt, tgt_cache = self._embed("tgt", tgt)
        y = self.transformer.forward(x_src, x_tgt, src_mask=src_mask, tgt_mask=tgt_mask)
        weight, _ = self._head_weight()
        logits, head_cache = ops.linear_forward(y, weight.T)
        self._cache = (src_cache, tgt_cache, head_cache)
        if targets is None:
            self.loss_cache = None
            return logits, None
        loss, self.loss_cache = ops.cross_entropy_forward(logits, self.backend.asarray(targets))
        return logits, loss

    def backward(self, loss_scale=1.0):
        """Gradients of ``loss_scale * loss`` of the last forward, ADDED into ``grads``.

        The forward read backwards: head, decoder (whose cross-attentions send
        gradient to the memory), encoder, then the two embeddings (into one
        table when shared, and into the head's matrix when tied).
        """
        if self.loss_cache is None:
            raise RuntimeError("Seq2SeqTransformer.backward: call forward(src, tgt, targets) first")
        src_cache, tgt_cache, head_cache = self._cache
        dlogits = ops.cross_entropy_backward(loss_scale, self.loss_cache)
        dy, dw_t, _ = ops.linear_backward(dlogits, head_cache)
        self._head_weight()[1][...] += dw_t.T
        dsrc, dtgt = self.transformer.backward(dy)
        self._embed_backward("tgt", dtgt, tgt_cache)
        self._embed_backward("src", dsrc, src_cache)
        self.loss_cache = None

    @property
    def cross_attention_weights(self):
        """Per decoder layer, the (B, H, T, S) cross-attention weights of the last forward."""
        return self.transformer.decoder.cross_attention_weights

    # -- decoding ------------------------------------------------------------------------------
    def encode(self, src, src_mask=None):
        """(memory (B, S, C), src_mask or None) for decoding."""
        self.loss_cache = None  # the layers' caches are about to hold this pass: no backward of an earlier loss
        src = self._ids(src, "src", self.config.src_block_size)
        src_mask = self._mask(src_mask, src, "src_mask")
        x, _ = self._embed("src", src)
        return self.transformer.encoder.forward(x, src_mask), src_mask

    def new_kv_caches(self, batch, length=None):
        """One KVCache per decoder layer, of ``length`` positions (default tgt_block_size: the self-attention's;
        a memory's length S for the cross-attention's)."""
        c = self.config
        return [KVCache(self.xp, batch, c.n_head, length or c.tgt_block_size, c.n_embd // c.n_head, self.dtype)
                for _ in range(c.n_decoder_layer)]

    def _step(self, tokens, memory, src_mask, caches, memory_caches=None):
        """Log-probabilities (B, V) of the token after ``tokens`` (B,), the newest decoder input.

        ``caches`` hold the decoder's own keys and values; ``memory_caches`` (optional) the memory's,
        projected at the first step only.
        """
        self.loss_cache = None
        x, _ = self._embed("tgt", tokens[:, None], offset=caches[0].length)
        y = self.transformer.decoder.forward(x, memory, memory_mask=src_mask, kv_caches=caches,
                                             memory_kv_caches=memory_caches)
        logits, _ = ops.linear_forward(y[:, -1], self._head_weight()[0].T)
        logits = logits - logits.max(axis=-1, keepdims=True)
        return logits - self.xp.log(self.xp.exp(logits).sum(axis=-1, keepdims=True))

    def _max_len(self, max_len):
        """Output tokens (EOS included) a decode may produce: one per decoder position, or fewer."""
        limit = self.config.tgt_block_size
        if max_len is None:
            return limit
        if not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be in [1, {limit}] (the decoder's positions), got {max_len}")
        return max_len

    def greedy_decode(self, src, max_len=None, src_mask=None):
        """The most likely token at every step, until EOS; a list of id lists (no BOS, no EOS)."""
        return self.beam_decode(src, beam_size=1, max_len=max_len, src_mask=src_mask)

    def beam_decode(self, src, beam_size=4, max_len=None, src_mask=None, length_penalty=1.0, return_scores=False):
        """Beam search: a list (one per source) of the best hypothesis' ids, without BOS and EOS.

        ``beam_size`` hypotheses per source are extended by every token and
        the ``beam_size`` best sums of log-probabilities kept (padding and BOS
        are never proposed); a hypothesis that emitted EOS stays as it is. At the end the finished hypotheses are
        ranked by score / length**length_penalty (1.0: the mean log-probability
        per token, so longer outputs are not penalised for their length).
        ``beam_size=1`` is greedy decoding. With ``return_scores`` the result
        is (outputs, the winners' normalised scores as a host array). Up to ``max_len`` tokens
        (EOS included; default tgt_block_size, one per decoder position).
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        c, xp = self.config, self.xp
        max_len = self._max_len(max_len)
        with self.evaluating():
            memory, src_mask = self.encode(src, src_mask)
            B, K = memory.shape[0], beam_size
            rows = xp.repeat(xp.arange(B), K)
            memory = memory[rows]
            src_mask = None if src_mask is None else src_mask[rows]
            caches = self.new_kv_caches(B * K)
            # the memory's keys and values, once per source: the beams of a source share its rows, so
            # reordering the beams (below) leaves them as they are
            memory_caches = self.new_kv_caches(B * K, length=memory.shape[1])
            tokens = xp.full(B * K, c.bos_id, dtype="int64")
            history = xp.zeros((B * K, 0), dtype="int64")
            # only the first copy of each source is live at the start, so the beams do not repeat it
            scores = xp.zeros((B, K), dtype="float64")
            scores[:, 1:] = -xp.inf
            finished = xp.zeros(B * K, dtype=bool)
            lengths = xp.zeros(B * K, dtype="int64")
            for _ in range(max_len):
                logp = self._step(tokens, memory, src_mask, caches, memory_caches).astype("float64")
                # padding and BOS are never outputs; a finished hypothesis continues with padding at no cost
                logp[:, [c.pad_id, c.bos_id]] = -xp.inf
                logp = xp.where(finished[:, None], -xp.inf, logp)
                logp[:, c.pad_id] = xp.where(finished, 0.0, logp[:, c.pad_id])
                V = logp.shape[-1]
                total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
                best = xp.argsort(-total, axis=-1)[:, :K]
                scores = xp.take_along_axis(total, best, axis=-1)
                parent = (xp.arange(B)[:, None] * K + best // V).reshape(-1)
                tokens = (best % V).reshape(-1)
                history = xp.concatenate([history[parent], tokens[:, None]], axis=1)
                lengths = lengths[parent] + ~finished[parent]
                finished = finished[parent] | (tokens == c.eos_id)
                for cache in caches:
                    n = cache.length
                    cache.k[:, :, :n] = cache.k[parent, :, :n]
                    cache.v[:, :, :n] = cache.v[parent, :, :n]
                if bool(finished.all()):
                    break
            normalised = scores / xp.maximum(lengths.reshape(B, K), 1) ** length_penalty
            winner = xp.arange(B) * K + xp.argmax(normalised, axis=-1)
            out = to_numpy(history[winner])
            best_scores = to_numpy(normalised.reshape(-1)[winner])
        result = []
        for row in out.tolist():
            ids = []
            for t in row:
                if t == c.eos_id:
                    break
                ids.append(t)
            result.append(ids)
        return (result, best_scores) if return_scores else result

    def size_mb(self) -> float:
        return self.num_parameters() * self.dtype.itemsize / 1e6

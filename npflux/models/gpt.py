"""A decoder-only transformer language model (GPT), forward and backward by hand.

    idx (B, T) -> wte + wpe -> dropout -> Block x n_layer -> ln_f -> lm_head -> logits (B, T, V)

Parameter names and layouts are GPT-2's as Hugging Face stores them, so a
GPT-2 state dict loads as it is (see ``load_gpt2_state_dict``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import ops
from ..backend import check_int, get_backend, to_numpy
from ..nn import Block, Dropout, Embedding, KVCache, LayerNorm, Module, ModuleList, PositionalEmbedding, RowLayout
from .config import ConfigDict

np = get_backend("numpy").xp  # the host's array module: a right-padded batch's lengths and offsets live there


@dataclass
class GPTConfig(ConfigDict):
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True            # biases in c_proj, c_fc and the layer norms' shift
    qkv_bias: bool = True        # bias of the fused q/k/v projection
    activation: str = "gelu"     # "gelu" (tanh form, GPT-2) or "relu" (the char-level gpt.py)
    tie_weights: bool = True     # lm_head shares wte's matrix
    lm_head_bias: bool = False
    layer_norm_eps: float = 1e-5
    scaled_proj_init: bool = False  # GPT-2's std 0.02/sqrt(2 n_layer) for the residual projections
    init: str = "normal"         # "normal": N(0, 0.02) as GPT-2; "torch": PyTorch's layer defaults (see below)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("normal", "torch"):
            raise ValueError(f"init must be 'normal' or 'torch', got {self.init!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})



# The char-level models of the published gpt.py: ReLU MLP, no q/k/v bias,
# an untied lm_head with a bias, 65-character vocabulary. The two small ones
# come from the version of gpt.py without _init_weights, so they train from
# PyTorch's default initialisation (init="torch"); measured, that is worth
# 0.1 nats of val loss for s2 at 5000 steps (benchmarks/README.md).
_CHAR = dict(vocab_size=65, activation="relu", qkv_bias=False, tie_weights=False, lm_head_bias=True)
PRESETS = {
    "shakespeare-s1": dict(_CHAR, block_size=32, n_layer=4, n_head=4, n_embd=64, dropout=0.0, init="torch"),
    "shakespeare-s2": dict(_CHAR, block_size=32, n_layer=6, n_head=6, n_embd=192, dropout=0.0, init="torch"),
    "shakespeare-n": dict(_CHAR, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # nanoGPT's "baby GPT" of its README's CPU command (shakespeare_char with --block_size=64 --batch_size=12
    # --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0): nanoGPT's architecture, GELU, no biases, tied head,
    # GPT-2 initialisation with the scaled residual projections.
    "nanogpt-cpu": dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
                        qkv_bias=False, scaled_proj_init=True),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, scaled_proj_init=True),
    # NeuraFlux: 6 layers, 6 heads, a 10,000-token byte-level BPE vocabulary (npflux.tokenizers.BPETokenizer),
    # GPT-2 blocks with learned positions and a tied head. Its "1.45 million parameters" fit a width of 90
    # (1,501,920 at block 128); the width of 384 its README also names would give 14.5 million.
    "neuraflux": dict(vocab_size=10_000, block_size=128, n_layer=6, n_head=6, n_embd=90, dropout=0.1),
}


class GPT(Module):
    def __init__(self, config: GPTConfig, seed: int = 0, backend=None, dtype=None):
        super().__init__(backend, dtype)
        self.config = c = config
        init_rng = get_backend("numpy").rng(seed)       # weights: same for every backend
        self.dropout_rng = self.backend.rng(seed + 1)   # dropout masks: on the device
        kw = dict(backend=self.backend, dtype=self.dtype)
        proj_std = 0.02 / math.sqrt(2 * c.n_layer) if c.scaled_proj_init else 0.02

        self.transformer = Module(**kw)
        t = self.transformer
        t.wte = Embedding(c.vocab_size, c.n_embd, rng=init_rng, **kw)
        t.wpe = PositionalEmbedding(c.block_size, c.n_embd, rng=init_rng, **kw)
        t.drop = Dropout(c.dropout, rng=self.dropout_rng, **kw)
        t.h = ModuleList([
            Block(c.n_embd, c.n_head, causal=True, activation=c.activation, bias=c.bias, qkv_bias=c.qkv_bias,
                  dropout=c.dropout, eps=c.layer_norm_eps, proj_std=proj_std, rng=init_rng,
                  dropout_rng=self.dropout_rng, **kw)
            for _ in range(c.n_layer)
        ], **kw)
        t.ln_f = LayerNorm(c.n_embd, c.layer_norm_eps, **kw)
        self.lm_head = Module(**kw)
        if not c.tie_weights:
            self.lm_head.add_param("weight", init_rng.normal(0.0, 0.02, (c.vocab_size, c.n_embd)))
        if c.lm_head_bias:
            self.lm_head.add_param("bias", self.xp.zeros(c.vocab_size))
        if c.init == "torch":
            self._torch_default_init(init_rng)
        self.flatten_parameters()  # one buffer for all weights, one for all gradients
        self.loss_cache = None

    def _torch_default_init(self, rng):
        """Re-draw the weights as PyTorch's layers initialise themselves.

        The small published char model (the lecture's gpt.py before it gained
        _init_weights) never re-initialises, so it trains from these defaults:
        nn.Embedding ~ N(0, 1); nn.Linear weight and bias ~ U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)); LayerNorm ones and
        zeros. npflux's Linear stores (in, out), so fan_in is weight.shape[0];
        the lm_head stores (vocab, C), so its fan_in is C.
        """
        C = self.config.n_embd
        for name, p in self.params.items():
            owner, _, kind = name.rpartition(".")
            if owner.startswith("transformer.w"):        # wte, wpe
                new = rng.standard_normal(p.shape)
            elif owner.rpartition(".")[2].startswith("ln"):  # ln_1, ln_2, ln_f keep ones and zeros
                continue
            else:
                fan_in = C if owner == "lm_head" else self.params[f"{owner}.weight"].shape[0]
                bound = 1.0 / math.sqrt(fan_in)
                new = rng.uniform(-bound, bound, p.shape)
            p[...] = self.backend.asarray(new, dtype=p.dtype)

    # -- the lm_head reads wte's matrix when tied --------------------------------
    def _head_weight(self):
        owner = self.transformer.wte if self.config.tie_weights else self.lm_head
        return owner.p["weight"], owner.g["weight"]

    def size_mb(self) -> float:
        """Parameter memory in MB (10^6 bytes) at the model's dtype."""
        return self.num_parameters() * self.dtype.itemsize / 1e6

    # -- forward and backward --------------------------------------------------------
    def forward(self, idx, targets=None, kv_caches=None, lengths=None, cache_rows=None):
        """logits (B, T, V) and the mean cross-entropy loss (None without targets).

        ``lengths`` (B,): the rows are sequences of different lengths, right-padded;
        row b holds ``lengths[b]`` real tokens (see ``nn.RowLayout``). Its positions
        count from its own start, it sees none of its padding, and with
        ``kv_caches`` its tokens go after what ITS cache row holds (``lengths`` of
        the caches). The logits at padding positions are meaningless.
        ``cache_rows`` (B,): which rows of the caches the rows of idx are (default
        0..B-1), to feed some of a batch's sequences and not the others.
        """
        check_int(idx, "GPT: idx")
        idx = self.backend.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be (B, T) token ids, got shape {idx.shape}")
        rows = None if lengths is None else self._row_layout(idx, kv_caches, lengths, cache_rows)
        offset = kv_caches[0].length if kv_caches and rows is None else 0
        if rows is None and offset is None:
            raise ValueError("GPT: these caches hold rows of different lengths; pass lengths= to feed them")
        if offset + idx.shape[1] > self.config.block_size:
            raise ValueError(f"GPT: sequence length {offset + idx.shape[1]} exceeds block_size {self.config.block_size}")
        t = self.transformer
        positions = None if rows is None else rows.positions
        x = t.drop.forward(t.wpe.forward(t.wte.forward(idx), offset=offset, positions=positions))
        for i, block in enumerate(t.h.items):
            x = block.forward(x, kv_cache=kv_caches[i] if kv_caches else None, rows=rows)
        x = t.ln_f.forward(x)
        weight, _ = self._head_weight()
        logits, self.head_cache = ops.linear_forward(x, weight.T, self.lm_head.p.get("bias"))
        if targets is None:
            self.loss_cache = None
            return logits, None
        loss, self.loss_cache = ops.cross_entropy_forward(logits, self.backend.asarray(targets))
        return logits, loss

    def _row_layout(self, idx, kv_caches, lengths, cache_rows=None):
        """The RowLayout of a right-padded batch: offsets from the caches' per-row lengths (0 without)."""
        B, T = idx.shape
        counts = np.asarray(to_numpy(lengths)).reshape(-1)
        check_int(counts, "GPT: lengths")
        if counts.shape != (B,):
            raise ValueError(f"GPT: lengths must hold one count per row ({B}), got shape {counts.shape}")
        held = kv_caches[0].lengths.shape[0] if kv_caches else B
        rows = np.arange(B) if cache_rows is None else np.asarray(to_numpy(cache_rows)).reshape(-1)
        if rows.shape != (B,) or (B and (rows.min() < 0 or rows.max() >= held)) or len(set(rows.tolist())) != B:
            raise ValueError(f"GPT: cache_rows must name {B} distinct rows of the caches' {held}, got {rows.tolist()}")
        offsets = kv_caches[0].lengths[rows].copy() if kv_caches else np.zeros(B, dtype=np.int64)
        ends = offsets + counts
        if (counts < 0).any() or (counts > T).any():
            raise ValueError(f"GPT: lengths must lie in [0, {T}], got {counts.tolist()}")
        if ends.max(initial=0) > self.config.block_size:
            raise ValueError(f"GPT: sequence length {int(ends.max())} exceeds block_size {self.config.block_size}")
        return RowLayout(self.xp, offsets, counts, T, n_keys=None if kv_caches else T,
                         max_position=self.config.block_size - 1, cache_rows=rows if kv_caches else None)

    def backward(self, loss_scale=1.0):
        """Gradients of ``loss_scale * loss`` of the last forward, ADDED into ``grads``.

        With gradient accumulation over n micro-batches, pass loss_scale=1/n.
        The walk is the forward read backwards: head, ln_f, blocks in reverse,
        positions, token embedding.
        """
        if self.loss_cache is None:
            raise RuntimeError("GPT.backward: call forward(idx, targets) first")
        self.backward_from_logits(ops.cross_entropy_backward(loss_scale, self.loss_cache))
        self.loss_cache = None

    def backward_from_logits(self, dlogits):
        """Gradients of any loss of the last forward's logits, given ``dlogits`` (B, T, V), ADDED into ``grads``.

        ``backward`` is this with the cross-entropy's gradient; a loss computed
        outside the model (distillation's, ``npflux.ops.distillation``) passes its own.
        """
        dx, dw_t, db = ops.linear_backward(dlogits, self.head_cache)
        _, head_grad = self._head_weight()
        head_grad += dw_t.T
        if db is not None:
            self.lm_head.g["bias"] += db
        t = self.transformer
        dx = t.ln_f.backward(dx)
        for block in reversed(t.h.items):
            dx = block.backward(dx)
        t.wte.backward(t.wpe.backward(t.drop.backward(dx)))

    # -- generation --------------------------------------------------------------------
    def new_kv_caches(self, batch):
        c = self.config
        return [KVCache(self.xp, batch, c.n_head, c.block_size, c.n_embd // c.n_head, self.dtype) for _ in range(c.n_layer)]

    # model.generate(...) and model.beam_search(...) are npflux.generate's functions, attached
    # to the class there: decoding sits above the models and imports them, never the reverse.

    # -- loading -------------------------------------------------------------------------
    def load_state_dict(self, state, strict=True):
        """Load a state dict in GPT-2's Hugging Face layout (see ``normalize_gpt2_state_dict``)."""
        return super().load_state_dict(normalize_gpt2_state_dict(state, self.config), strict=strict)


def normalize_gpt2_state_dict(state, config: GPTConfig):
    """Hugging Face GPT-2 names -> npflux's (they are the same, less a few differences).

    - ``model.safetensors`` of GPT2LMHeadModel may omit the "transformer."
      prefix; it is added.
    - the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are dropped
      (they are not parameters: npflux builds the mask itself).
    - a tied model has one matrix; ``lm_head.weight`` is accepted when it
      equals the embedding, and an error otherwise.
    """
    from ..backend import to_numpy

    out = {}
    for name, value in state.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith((".attn.bias", ".attn.masked_bias")) and value.ndim != 1:
            continue
        out[name] = value
    if config.tie_weights and "lm_head.weight" in out:
        head = to_numpy(out.pop("lm_head.weight"))
        wte = to_numpy(out.get("transformer.wte.weight", head))  # a missing wte is reported by the load
        if head.shape != wte.shape or not (head == wte).all():
            raise ValueError("lm_head.weight differs from transformer.wte.weight but the model ties them")
    return out


def load_gpt2_safetensors(path, config: GPTConfig = None, n_head: int = None, seed: int = 0,
                          backend=None, dtype=None) -> GPT:
    """A GPT with the weights of a GPT-2 ``model.safetensors`` in the Hugging Face layout.

    Keys may carry the "transformer." prefix or not, and may include the
    ``attn.bias`` mask buffers and a tied ``lm_head.weight`` (see
    ``normalize_gpt2_state_dict``). Without ``config``, a GPT-2 style config
    (GELU, all biases, tied lm_head) is inferred from the shapes: vocab_size
    and n_embd from wte (V, C), block_size from wpe (T, C), n_layer from the
    number of blocks. The head count cannot be read from the shapes: it is
    ``n_head``, by default n_embd // 64 (GPT-2's head width).
    """
    from safetensors.numpy import load_file

    state = load_file(str(path))
    if config is None:
        norm = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in state.items()}
        for key in ("transformer.wte.weight", "transformer.wpe.weight"):
            if key not in norm or norm[key].ndim != 2:
                raise ValueError(f"load_gpt2_safetensors: {path} has no 2-d {key} (is it a GPT-2 checkpoint?)")
        vocab_size, n_embd = norm["transformer.wte.weight"].shape
        block_size = norm["transformer.wpe.weight"].shape[0]
        n_layer = len({k.split(".")[2] for k in norm if k.startswith("transformer.h.")})
        if n_head is None:
            n_head = max(n_embd // 64, 1)
        config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT(config, seed=seed, backend=backend, dtype=dtype)
    model.load_state_dict(state)
    return model

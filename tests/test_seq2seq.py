"""The encoder-decoder transformer, checked three ways, plus its decoding and the dates task.

(a) float64 numerical gradients of the encoder, the decoder (input and memory),
    the whole EncoderDecoder and the whole Seq2SeqTransformer's loss, with
    padding masks, over shapes drawn by hypothesis;
(b) torch.nn.Transformer (norm_first, weights copied) forward and backward in
    float64 and float32, with all three padding masks and the causal mask,
    alone and inside the whole model (embeddings, positions, head, loss);
(c) decoding (cached steps = full forward; greedy = argmax loop; beam search
    exhaustive on a tiny vocabulary = the best sequence), checkpoints, the task.
"""
import datetime as dt
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npflux.backend import to_numpy
from npflux.gradcheck import check_module
from npflux.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from npflux.nn.encoder_decoder import EncoderDecoder, TransformerDecoder, TransformerEncoder
from npflux.tasks.dates import FORMATS, DateTask, format_date, ordinal
from npflux.train_seq2seq import (
    Seq2SeqTrainConfig, exact_match, load_seq2seq, model_config_for, save_seq2seq, train_seq2seq,
)

from conftest import dev, host
from test_nn import GRAD_SETTINGS, assert_close, assert_grads_ok, randomize, rel

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the test oracle) is not installed")

# widths >= 4: the stacks chain LayerNorms, and over 2 or 3 features their gradients are near rounding noise
heads_dims = st.sampled_from([(1, 4), (2, 2), (4, 1), (2, 3)])
# a whole stack has many parameters, each checked element by element: few examples keep the file fast
small_heads_dims = st.sampled_from([(1, 4), (2, 2), (4, 1)])
STACK_SETTINGS = settings(GRAD_SETTINGS, max_examples=4)
# The whole stacks' directional checks step 1e-5, not 1e-6. The cross-attention's query path (q_proj.bias,
# ln_cross.bias) can have gradients 1e-4..1e-3 of the others (a source row of one key gives its query no
# gradient; near-equal keys little), and the central difference's rounding, ~1e-9 absolute at step 1e-6,
# reached 4e-7..2e-6 of them in deep searches (10x more at 1e-7; at 1e-5 the same draws gave <= 1.5e-7,
# at 3e-5 < 3e-8: rounding, not a wrong gradient). Rare draws still exceed 1e-7 at 1e-5 (searches of
# 80-100 draws per test found one): the noise floor of npflux.gradcheck undercounts this rounding.
STACK_EPS = 1e-5
lengths = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)


def right_padded(rng, B, T):
    """(B, T) True = real token: each row a random length >= 1, padding at the end (as the task pads)."""
    n = rng.integers(1, T + 1, B)
    n[rng.integers(B)] = T  # the longest row sets the width
    return np.arange(T)[None, :] < n[:, None]


# --------------------------------------------------------------------------
# (a) numerical gradients
# --------------------------------------------------------------------------
@STACK_SETTINGS
@given(B=st.integers(1, 2), S=lengths, hd=small_heads_dims, masked=st.booleans(), seed=seeds)
def test_gradcheck_encoder(B, S, hd, masked, seed):
    """One layer, element by element (stacking is checked by the EncoderDecoder test below)."""
    H, D = hd
    rng = np.random.default_rng(seed)
    m = randomize(TransformerEncoder(H * D, H, 1, dtype="float64"), rng).eval()
    kwargs = {"mask": right_padded(rng, B, S)} if masked else {}
    errors = check_module(m, {"x": dev(rng.standard_normal((B, S, H * D)), like=m)}, kwargs=kwargs, seed=seed)
    assert len(errors) == len(m.params) + 1
    assert_grads_ok(errors)


@STACK_SETTINGS
@given(B=st.integers(1, 2), T=lengths, S=lengths, hd=small_heads_dims, masked=st.booleans(), seed=seeds)
def test_gradcheck_decoder(B, T, S, hd, masked, seed):
    """Gradients of the decoder input AND of the memory its cross-attention reads, element by element."""
    H, D = hd
    rng = np.random.default_rng(seed)
    m = randomize(TransformerDecoder(H * D, H, 1, dtype="float64"), rng).eval()
    inputs = {"y": dev(rng.standard_normal((B, T, H * D)), like=m),
              "memory": dev(rng.standard_normal((B, S, H * D)), like=m)}
    kwargs = {"mask": right_padded(rng, B, T), "memory_mask": right_padded(rng, B, S)} if masked else {}
    errors = check_module(m, inputs, kwargs=kwargs, seed=seed)
    assert {"y", "memory"} <= set(errors) and len(errors) == len(m.params) + 2
    assert_grads_ok(errors)


@STACK_SETTINGS
@given(B=st.integers(1, 2), T=lengths, S=lengths, hd=heads_dims, activation=st.sampled_from(["relu", "gelu"]),
       seed=seeds)
def test_gradcheck_encoder_decoder(B, T, S, hd, activation, seed):
    H, D = hd
    rng = np.random.default_rng(seed)
    # two decoder layers: both cross-attentions send gradient into the one memory, and it must add up
    m = randomize(EncoderDecoder(H * D, H, 1, 2, activation=activation, dtype="float64"), rng).eval()
    inputs = {"src": dev(rng.standard_normal((B, S, H * D)), like=m),
              "tgt": dev(rng.standard_normal((B, T, H * D)), like=m)}
    kwargs = {"src_mask": right_padded(rng, B, S), "tgt_mask": right_padded(rng, B, T)}
    # directional: the parts are checked element by element above; this checks how they are wired
    errors = check_module(m, inputs, kwargs=kwargs, seed=seed, eps=STACK_EPS, directional=True)
    assert {"src", "tgt"} <= set(errors) and len(errors) == len(m.params) + 2
    assert_grads_ok(errors)


class LossOf:
    """The model's loss as a module with a scalar output, for check_module: every parameter is checked."""

    def __init__(self, model, targets):
        self.model, self.targets = model, targets
        self.params, self.grads = model.params, model.grads

    def zero_grad(self):
        self.model.zero_grad()

    def forward(self, src, tgt):
        return self.model.forward(src, tgt, self.targets)[1]

    def backward(self, dloss):
        self.model.backward(loss_scale=float(dloss))
        return None  # token ids have no gradient


def tiny_batch(rng, c, B, S, T):
    src = rng.integers(3, c.src_vocab_size, (B, S))
    src[~right_padded(rng, B, S)] = c.pad_id
    tgt_mask = right_padded(rng, B, T)
    tgt = rng.integers(3, c.tgt_vocab_size, (B, T))
    tgt[:, 0] = c.bos_id
    tgt[~tgt_mask] = c.pad_id
    targets = rng.integers(0, c.tgt_vocab_size, (B, T))
    targets[~tgt_mask] = -100
    return src, tgt, targets


@STACK_SETTINGS
@given(positions=st.sampled_from(["sinusoidal", "learned"]), shared=st.booleans(), tied=st.booleans(),
       scaled=st.booleans(), seed=seeds)
def test_gradcheck_seq2seq_model(positions, shared, tied, scaled, seed):
    """Every parameter of the whole model (embeddings shared/separate, head tied/untied, positions)."""
    rng = np.random.default_rng(seed)
    c = Seq2SeqConfig(src_vocab_size=7, tgt_vocab_size=7 if shared else 6, src_block_size=5, tgt_block_size=4,
                      n_encoder_layer=1, n_decoder_layer=1, n_head=2, n_embd=4, ffn_hidden=6, positions=positions,
                      shared_embeddings=shared, tie_weights=tied, scale_embeddings=scaled)
    m = randomize(Seq2SeqTransformer(c, seed=seed % 1000, dtype="float64"), rng).eval()
    src, tgt, targets = tiny_batch(rng, c, 2, 5, 4)
    errors = check_module(LossOf(m, targets), {"src": src, "tgt": tgt}, seed=seed, eps=STACK_EPS, directional=True)
    assert set(errors) == set(m.params)
    assert ("wte.weight" in errors) == shared and ("lm_head.weight" in errors) == (not tied)
    assert ("src_wpe.weight" in errors) == (positions == "learned")
    assert_grads_ok(errors)


# --------------------------------------------------------------------------
# (b) torch.nn.Transformer, weights copied
# --------------------------------------------------------------------------
DTYPES = [pytest.param(np.float64, 1e-10, id="float64"), pytest.param(np.float32, 1e-5, id="float32")]


def torch_transformer(m, C, H, n_enc, n_dec, hidden, activation, dtype):
    """torch.nn.Transformer(norm_first=True) holding EncoderDecoder ``m``'s weights, and the name map.

    torch's in_proj_weight (3C, C) stacks the q, k, v rows: npflux's fused
    c_attn (C, 3C) is its transpose; for cross-attention, q_proj and kv_proj
    side by side are. norm1/norm2/norm3 of a decoder layer are ln_1/ln_cross/ln_2.
    Returns (module, {npflux name: function of the torch module -> that tensor in npflux's layout}).
    """
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    act = "relu" if activation == "relu" else (lambda x: torch.nn.functional.gelu(x, approximate="tanh"))
    ref = torch.nn.Transformer(C, H, n_enc, n_dec, hidden, dropout=0.0, activation=act, batch_first=True,
                               norm_first=True, dtype=tdt)
    names = {}

    def linear(ours, get):  # npflux (in, out) = torch (out, in) transposed
        names[f"{ours}.weight"] = lambda r: get(r).weight.T
        names[f"{ours}.bias"] = lambda r: get(r).bias

    def norm(ours, get):
        names[f"{ours}.weight"] = lambda r: get(r).weight
        names[f"{ours}.bias"] = lambda r: get(r).bias

    def in_proj(ours_weight, ours_bias, get):
        names[ours_weight] = lambda r: get(r).in_proj_weight.T
        names[ours_bias] = lambda r: get(r).in_proj_bias

    for i in range(n_enc):
        p, g = f"encoder.layers.{i}.", (lambda r, i=i: r.encoder.layers[i])
        in_proj(p + "attn.c_attn.weight", p + "attn.c_attn.bias", lambda r, g=g: g(r).self_attn)
        linear(p + "attn.c_proj", lambda r, g=g: g(r).self_attn.out_proj)
        linear(p + "mlp.c_fc", lambda r, g=g: g(r).linear1)
        linear(p + "mlp.c_proj", lambda r, g=g: g(r).linear2)
        norm(p + "ln_1", lambda r, g=g: g(r).norm1)
        norm(p + "ln_2", lambda r, g=g: g(r).norm2)
    for i in range(n_dec):
        p, g = f"decoder.layers.{i}.", (lambda r, i=i: r.decoder.layers[i])
        in_proj(p + "attn.c_attn.weight", p + "attn.c_attn.bias", lambda r, g=g: g(r).self_attn)
        linear(p + "attn.c_proj", lambda r, g=g: g(r).self_attn.out_proj)
        linear(p + "cross_attn.c_proj", lambda r, g=g: g(r).multihead_attn.out_proj)
        linear(p + "mlp.c_fc", lambda r, g=g: g(r).linear1)
        linear(p + "mlp.c_proj", lambda r, g=g: g(r).linear2)
        norm(p + "ln_1", lambda r, g=g: g(r).norm1)
        norm(p + "ln_cross", lambda r, g=g: g(r).norm2)
        norm(p + "ln_2", lambda r, g=g: g(r).norm3)
    norm("encoder.ln_f", lambda r: r.encoder.norm)
    norm("decoder.ln_f", lambda r: r.decoder.norm)

    for i in range(n_dec):  # cross-attention: q_proj | kv_proj side by side = in_proj transposed
        p, get = f"decoder.layers.{i}.cross_attn.", (lambda r, i=i: r.decoder.layers[i].multihead_attn)
        names[p + "q_proj.weight"] = lambda r, get=get: get(r).in_proj_weight[:C].T
        names[p + "kv_proj.weight"] = lambda r, get=get: get(r).in_proj_weight[C:].T
        names[p + "q_proj.bias"] = lambda r, get=get: get(r).in_proj_bias[:C]
        names[p + "kv_proj.bias"] = lambda r, get=get: get(r).in_proj_bias[C:]
    with torch.no_grad():
        for k, get in names.items():  # each name is a view of a torch parameter in npflux's layout
            get(ref).copy_(torch.tensor(to_numpy(m.params[k]), dtype=tdt))
    return ref, names


def torch_grads(ref, names):
    """npflux name -> the gradient torch computed, in npflux's layout (via the same name map)."""
    out = {}
    for k, get in names.items():
        # the name map gives views of parameters; take the same view of the parameter's .grad
        param_view = get(ref)
        base = param_view._base if param_view._base is not None else param_view
        grad_full = base.grad
        out[k] = grad_full.as_strided(param_view.shape, param_view.stride(), param_view.storage_offset()
                                      - base.storage_offset())
    return out


def torch_masks(src_mask, tgt_mask, T):
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = may NOT attend, torch's convention
    kw = dict(tgt_mask=causal)
    if src_mask is not None:
        kw["src_key_padding_mask"] = torch.as_tensor(~src_mask)
        kw["memory_key_padding_mask"] = torch.as_tensor(~src_mask)
    if tgt_mask is not None:
        kw["tgt_key_padding_mask"] = torch.as_tensor(~tgt_mask)
    return kw


@needs_torch
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: nested tensors off with norm_first
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("activation,masked", [("relu", True), ("gelu", True), ("relu", False)])
def test_encoder_decoder_vs_torch_transformer(dtype, tol, activation, masked):
    """Outputs, both input gradients and every parameter gradient against torch.nn.Transformer.

    Padded positions are compared too: every padded query still has a real key
    to attend to (the encoder's keys include real tokens; the decoder's first
    position is real), so torch gives finite values there, as npflux does.
    """
    rng = np.random.default_rng(11)
    B, S, T, C, H, hidden = 3, 6, 5, 12, 3, 20
    m = randomize(EncoderDecoder(C, H, 2, 2, activation=activation, hidden=hidden, dtype=dtype), rng)
    ref, names = torch_transformer(m, C, H, 2, 2, hidden, activation, dtype)
    assert set(names) == set(m.params)
    src_mask = right_padded(rng, B, S) if masked else None
    tgt_mask = right_padded(rng, B, T) if masked else None
    if masked:
        assert not src_mask.all() and not tgt_mask.all()
    src, tgt = rng.standard_normal((B, S, C)), rng.standard_normal((B, T, C))
    dout = rng.standard_normal((B, T, C))

    tdt = torch.float64 if dtype == np.float64 else torch.float32
    t_src = torch.tensor(src, dtype=tdt, requires_grad=True)
    t_tgt = torch.tensor(tgt, dtype=tdt, requires_grad=True)
    t_out = ref(t_src, t_tgt, **torch_masks(src_mask, tgt_mask, T))
    assert torch.isfinite(t_out).all()
    t_out.backward(torch.tensor(dout, dtype=tdt))

    m.zero_grad()
    out = m.forward(dev(src.astype(dtype), like=m), dev(tgt.astype(dtype), like=m),
                    src_mask=src_mask, tgt_mask=tgt_mask)
    dsrc, dtgt = m.backward(dev(dout.astype(dtype), like=m))
    assert out.dtype == dsrc.dtype == dtgt.dtype == dtype
    diffs = {"out": rel(out, t_out.detach().numpy()), "dsrc": rel(dsrc, t_src.grad.numpy()),
             "dtgt": rel(dtgt, t_tgt.grad.numpy())}
    for name, g in torch_grads(ref, names).items():
        assert m.grads[name].dtype == dtype
        diffs[name] = rel(m.grads[name], g.numpy())
    assert len(diffs) == 3 + len(m.params)
    assert_close(diffs, tol)


@needs_torch
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("positions,shared,tied", [("sinusoidal", False, True), ("learned", True, True),
                                                  ("sinusoidal", True, False), ("learned", False, False)])
def test_seq2seq_model_vs_torch(dtype, tol, positions, shared, tied):
    """The whole model: embeddings * sqrt(C) + positions -> torch.nn.Transformer -> head -> cross-entropy."""
    rng = np.random.default_rng(12)
    B, S, T = 3, 7, 5
    c = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=13 if shared else 11, src_block_size=9, tgt_block_size=6,
                      n_encoder_layer=2, n_decoder_layer=1, n_head=2, n_embd=8, positions=positions,
                      shared_embeddings=shared, tie_weights=tied)
    m = randomize(Seq2SeqTransformer(c, dtype=dtype), rng)
    ref, names = torch_transformer(m.transformer, c.n_embd, c.n_head, 2, 1, 4 * c.n_embd, "relu", dtype)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    P = {k: torch.tensor(to_numpy(v), dtype=tdt, requires_grad=True) for k, v in m.params.items()
         if not k.startswith("transformer.")}
    src, tgt, targets = tiny_batch(rng, c, B, S, T)
    src_mask, tgt_mask = src != c.pad_id, tgt != c.pad_id

    def embed(side, ids):
        table = P["wte.weight"] if shared else P[f"{side}_wte.weight"]
        x = table[torch.as_tensor(ids)] * math.sqrt(c.n_embd)
        n = ids.shape[1]
        if positions == "learned":
            return x + P[f"{side}_wpe.weight"][:n]
        return x + torch.tensor(to_numpy(getattr(m, f"{side}_wpe").table[:n]), dtype=tdt)

    y = ref(embed("src", src), embed("tgt", tgt), **torch_masks(src_mask, tgt_mask, T))
    head = (P["wte.weight"] if shared else P["tgt_wte.weight"]) if tied else P["lm_head.weight"]
    t_logits = y @ head.T
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, t_logits.shape[-1]),
                                               torch.as_tensor(targets.reshape(-1)), ignore_index=-100)
    t_loss.backward()

    m.zero_grad()
    logits, loss = m.forward(src, tgt, targets)
    m.backward()
    assert logits.dtype == loss.dtype == dtype
    diffs = {"logits": rel(logits, t_logits.detach().numpy()), "loss": rel(loss, t_loss.detach().numpy())}
    for k, t in P.items():
        diffs[k] = rel(m.grads[k], t.grad.numpy())
    for name, g in torch_grads(ref, names).items():
        diffs["transformer." + name] = rel(m.grads["transformer." + name], g.numpy())
    assert set(diffs) == set(m.params) | {"logits", "loss"}
    assert_close(diffs, tol)


# --------------------------------------------------------------------------
# (c) decoding
# --------------------------------------------------------------------------
def small_model(seed=0, V=9, positions="sinusoidal", **kw):
    c = Seq2SeqConfig(src_vocab_size=V, tgt_vocab_size=V, src_block_size=8, tgt_block_size=6, n_encoder_layer=2,
                      n_decoder_layer=2, n_head=2, n_embd=8, positions=positions, **kw)
    return randomize(Seq2SeqTransformer(c, seed=seed, dtype="float64"), np.random.default_rng(seed))


def sources(rng, c, B=3, S=6):
    src = rng.integers(3, c.src_vocab_size, (B, S))
    src[~right_padded(rng, B, S)] = c.pad_id
    return src


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("memory_cache", [False, True])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_cached_decoding_steps_equal_the_full_forward(positions, memory_cache):
    """Each step with the key/value cache (and the memory's, projected once) gives the full
    teacher-forced forward's log-probabilities."""
    rng = np.random.default_rng(0)
    m = small_model(positions=positions).eval()
    c = m.config
    src = sources(rng, c)
    tgt = rng.integers(3, c.tgt_vocab_size, (3, c.tgt_block_size))
    tgt[:, 0] = c.bos_id
    full, _ = m.forward(src, tgt)
    memory, src_mask = m.encode(src)
    caches = m.new_kv_caches(3)
    memory_caches = m.new_kv_caches(3, length=memory.shape[1]) if memory_cache else None
    for t in range(c.tgt_block_size):
        step = m._step(m.backend.asarray(tgt[:, t]), memory, src_mask, caches, memory_caches)
        np.testing.assert_allclose(host(step), log_softmax(host(full[:, t])), rtol=0, atol=1e-12)


def test_decoding_projects_the_memory_once_per_source():
    """The cross-attentions' key/value projection runs once per decode, not once per step; the beams
    still equal decoding that projects the memory at every step."""
    rng = np.random.default_rng(5)
    m = small_model(seed=5, V=7).eval()
    src = sources(rng, m.config, B=4)
    calls = []
    kv_projs = [layer.cross_attn.kv_proj for layer in m.transformer.decoder.layers.items]
    for proj in kv_projs:
        proj.forward = lambda x, proj=proj: calls.append(x.shape) or type(proj).forward(proj, x)
    try:
        beams = m.beam_decode(src, beam_size=3, max_len=5)
    finally:
        for proj in kv_projs:
            del proj.forward
    assert calls == [(4 * 3, 6, m.config.n_embd)] * m.config.n_decoder_layer
    step = m._step  # the same search, projecting the memory at every step (no memory caches)
    m._step = lambda tokens, memory, src_mask, caches, memory_caches=None: step(tokens, memory, src_mask, caches)
    try:
        assert m.beam_decode(src, beam_size=3, max_len=5) == beams
    finally:
        del m._step


def test_cross_attention_cache_holds_one_context():
    """A cross-attention cache is filled by the first call and read back; a context of another shape is refused."""
    from npflux.nn import KVCache, MultiHeadAttention

    rng = np.random.default_rng(2)
    attn = randomize(MultiHeadAttention(6, 2, cross=True, dtype="float64"), rng).eval()
    x, context = dev(rng.standard_normal((2, 4, 6)), like=attn), dev(rng.standard_normal((2, 5, 6)), like=attn)
    full = attn.forward(x, context=context)
    cache = KVCache(attn.xp, 2, 2, 5, 3, np.float64)
    for t in range(4):
        np.testing.assert_allclose(host(attn.forward(x[:, t : t + 1], context=context, kv_cache=cache)),
                                   host(full[:, t : t + 1]), rtol=1e-13, atol=1e-14)
    assert cache.length == 5
    with pytest.raises(ValueError, match="holds a context of"):
        attn.forward(x[:, :1], context=context[:, :4], kv_cache=cache)


def test_greedy_is_the_argmax_loop():
    """Greedy decoding = re-running the whole decoder and taking the argmax (never pad or BOS), until EOS."""
    rng = np.random.default_rng(1)
    m = small_model(seed=1, V=5).eval()  # few tokens: EOS comes up often
    c = m.config
    src = sources(rng, c, B=6)
    for b, out in enumerate(m.greedy_decode(src)):
        tgt = [c.bos_id]
        while len(tgt) <= c.tgt_block_size:
            logits, _ = m.forward(src[b : b + 1], np.array([tgt]))
            logits[..., [c.pad_id, c.bos_id]] = -np.inf
            nxt = int(np.argmax(logits[0, -1]))
            if nxt == c.eos_id:
                break
            tgt.append(nxt)
        assert out == tgt[1:]


def test_beam_search_with_a_full_beam_finds_the_best_sequence():
    """With beam_size >= (V-2)^(max_len-1) nothing is pruned: beam search is exhaustive.

    Brute force: every sequence of output tokens (neither pad nor BOS) of
    max_len tokens or ending in EOS earlier, scored by its log-probability /
    length (length_penalty 1). Beam search must find the best score, and
    no beam can score below greedy decoding's hypothesis.
    """
    rng = np.random.default_rng(8)
    m = small_model(seed=8, V=5).eval()  # a model where greedy misses the best sequence on every source
    c = m.config
    max_len = 3
    outputs = [t for t in range(c.tgt_vocab_size) if t not in (c.pad_id, c.bos_id)]
    src = sources(rng, c, B=3)
    beams, beam_scores = m.beam_decode(src, beam_size=len(outputs) ** (max_len - 1), max_len=max_len,
                                       return_scores=True)
    _, greedy_scores = m.beam_decode(src, beam_size=1, max_len=max_len, return_scores=True)
    for b in range(len(src)):
        scored = {}
        for n in range(1, max_len + 1):
            for seq in itertools.product(outputs, repeat=n):
                if (n < max_len and seq[-1] != c.eos_id) or c.eos_id in seq[:-1]:
                    continue
                logits, _ = m.forward(src[b : b + 1], np.array([[c.bos_id, *seq[:-1]]]))
                scored[seq] = log_softmax(host(logits[0]))[np.arange(n), list(seq)].sum() / n
        best = max(scored, key=scored.get)
        assert beam_scores[b] == pytest.approx(scored[best], abs=1e-10)
        assert beams[b] == [t for t in best if t != c.eos_id]
        assert beam_scores[b] >= greedy_scores[b] - 1e-12
    assert np.all(beam_scores > greedy_scores + 0.1)


def test_beam_of_one_is_greedy_and_finished_rows_stop():
    rng = np.random.default_rng(3)
    m = small_model(seed=3, V=6).eval()
    src = sources(rng, m.config, B=5)
    assert m.beam_decode(src, beam_size=1) == m.greedy_decode(src)
    for out in m.beam_decode(src, beam_size=3):
        assert m.config.eos_id not in out and m.config.pad_id not in out and len(out) <= m.config.tgt_block_size


def test_decode_leaves_training_mode_and_errors():
    m = small_model()
    m.train()
    m.greedy_decode(np.array([[3, 4, 5]]))
    assert m.training
    with pytest.raises(ValueError, match="beam_size"):
        m.beam_decode(np.array([[3, 4]]), beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        m.greedy_decode(np.array([[3, 4]]), max_len=m.config.tgt_block_size + 1)
    with pytest.raises(ValueError, match="positions"):
        m.forward(np.ones((1, m.config.src_block_size + 1), dtype=np.int64), np.array([[1]]))
    with pytest.raises(ValueError, match="boolean"):
        m.forward(np.array([[3, 4]]), np.array([[1]]), src_mask=np.array([[1, 0]]))
    with pytest.raises(TypeError):
        m.forward(np.array([[3.0, 4.0]]), np.array([[1]]))
    with pytest.raises(ValueError, match="one vocabulary"):
        Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=6, src_block_size=3, tgt_block_size=3, shared_embeddings=True)
    with pytest.raises(ValueError, match="must differ"):
        Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=5, src_block_size=3, tgt_block_size=3, eos_id=0)


def test_a_source_of_nothing_but_padding_is_an_error():
    """No real source token leaves the cross-attention nothing to read: an error, not a made-up output."""
    m = small_model()
    pad = m.config.pad_id
    for call in (lambda src: m.greedy_decode(src), lambda src: m.beam_decode(src, beam_size=2),
                 lambda src: m.forward(src, np.array([[1], [1]]))):
        with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold no real token"):
            call(np.array([[3, 4, pad], [pad, pad, pad]]))
    with pytest.raises(ValueError, match="no real token"):
        m.forward(np.array([[3, 4]]), np.array([[1]]), src_mask=np.array([[False, False]]))
    task = DateTask(heldout_size=1)
    model = Seq2SeqTransformer(model_config_for(task, n_embd=8, n_head=2, n_encoder_layer=1, n_decoder_layer=1))
    with pytest.raises(ValueError, match="holds the padding token"):
        exact_match(model, task.tokenizer, [("\0\0", "1998-03-03")])
    with pytest.raises(ValueError, match="holds the padding token"):  # one inside a source: silently skipped before
        exact_match(model, task.tokenizer, [("3 Mar\0 1998", "1998-03-03")])


def test_decoding_between_forward_and_backward_is_an_error():
    """Decoding overwrites the layers' caches: a backward of the earlier loss must refuse, not use them.
    (Batch 1, one target position, one decoding step: every cache has the forward's shapes.)"""
    m = small_model()
    src, tgt, targets = np.array([[3, 4, 5]]), np.array([[1]]), np.array([[4]])
    m.forward(src, tgt, targets)
    m.greedy_decode(src, max_len=1)
    with pytest.raises(RuntimeError, match="call forward"):
        m.backward()
    m.forward(src, tgt, targets)
    m.encode(src)
    with pytest.raises(RuntimeError, match="call forward"):
        m.backward()


def test_float32_stays_float32_and_masks_come_from_padding():
    rng = np.random.default_rng(4)
    c = small_model().config
    m = Seq2SeqTransformer(c, dtype="float32")
    src, tgt, targets = tiny_batch(rng, c, 3, 6, 5)
    logits, loss = m.forward(src, tgt, targets)
    m.backward()
    assert logits.dtype == loss.dtype == np.float32
    assert all(g.dtype == np.float32 for g in m.grads.values())
    # the default masks are ids != pad: the same as passing them
    explicit, _ = m.forward(src, tgt, src_mask=src != c.pad_id, tgt_mask=tgt != c.pad_id)
    np.testing.assert_array_equal(host(logits), host(explicit))
    # what sits at a masked source position is never seen: other ids there change no logit
    src_mask = src != c.pad_id
    noise = np.where(src_mask, src, rng.integers(3, c.src_vocab_size, src.shape))
    assert (noise != src).any()
    np.testing.assert_array_equal(host(m.forward(noise, tgt, src_mask=src_mask)[0]), host(logits))
    weights = to_numpy(m.cross_attention_weights[0])
    assert weights.shape == (3, c.n_head, 5, 6)
    assert np.all(weights.transpose(0, 3, 1, 2)[~src_mask] == 0)  # no query attends to a padded key


# --------------------------------------------------------------------------
# the dates task
# --------------------------------------------------------------------------
def test_date_formats_read_as_documented():
    d = dt.date(1998, 3, 3)  # a Tuesday
    assert format_date(d, "ordinal_of_month_year") == "3rd of March 1998"
    assert format_date(d, "abbr_day_short_year") == "Mar 3, 98"
    assert format_date(d, "us_numeric") == "03/03/1998"
    assert format_date(d, "weekday_month_day_year") == "Tuesday, March 3, 1998"
    assert format_date(dt.date(2011, 12, 1), "us_short") == "12/1/11"
    assert format_date(dt.date(2011, 12, 1), "eu_dots") == "01.12.2011"
    assert format_date(d, "month_ordinal_year", "upper") == "MARCH 3RD, 1998"
    assert format_date(d, "the_ordinal_of_month", "lower") == "the 3rd of march, 1998"
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]
    with pytest.raises(ValueError, match="two-digit"):
        format_date(dt.date(1920, 1, 1), "us_short")
    with pytest.raises(KeyError):
        format_date(d, "nope")


def test_numeric_formats_parse_back_with_strptime():
    """An independent reading of the formats strptime knows: Python's own parser gives the target date.

    (Two-digit years are left out: strptime's %y pivots at 69, the task's at 50.)
    """
    patterns = {"us_numeric": "%m/%d/%Y", "eu_dots": "%d.%m.%Y", "year_slashes": "%Y/%m/%d", "compact": "%Y%m%d",
                "day_abbr_year_dashes": "%d-%b-%Y", "month_day_year": "%B %d, %Y",
                "weekday_month_day_year": "%A, %B %d, %Y", "weekday_abbr_day_month": "%a, %d %b %Y"}
    task = DateTask(seed=5, heldout_size=10)
    rng = np.random.default_rng(0)
    for _ in range(200):
        src, iso = task.sample(rng, 1)[0]
        d = dt.date.fromisoformat(iso)
        for name, pattern in patterns.items():
            assert dt.datetime.strptime(format_date(d, name), pattern).date() == d


def test_heldout_days_never_appear_in_training():
    task = DateTask(seed=0, heldout_size=300)
    assert set(task.days["train"]).isdisjoint(task.days["heldout"])
    assert len(task.days["train"]) + len(task.days["heldout"]) == (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days + 1
    heldout_days = {dt.date.fromisoformat(t).toordinal() for _, t in task.heldout()}
    assert heldout_days <= set(task.days["heldout"].tolist())
    train_days = {dt.date.fromisoformat(t).toordinal() for _, t in task.sample(np.random.default_rng(1), 3000)}
    assert train_days.isdisjoint(task.days["heldout"].tolist())
    assert DateTask(seed=0, heldout_size=300).heldout() == task.heldout()  # fixed by the seed
    assert DateTask(seed=1, heldout_size=300).heldout() != task.heldout()
    assert max(len(s) for s, _ in task.sample(np.random.default_rng(2), 3000)) <= task.src_block_size


def test_encode_batch_teacher_forcing_layout():
    task = DateTask(seed=0, heldout_size=10)
    pairs = [("3/3/98", "1998-03-03"), ("Tuesday, March 3, 1998", "1998-03-03")]
    src, tgt_in, targets = task.encode_batch(pairs)
    assert src.shape == (2, 22) and (src[0, 6:] == task.pad_id).all() and (src[1] != task.pad_id).all()
    assert task.decode(src[0, :6]) == "3/3/98"
    assert tgt_in.shape == targets.shape == (2, 11)
    assert (tgt_in[:, 0] == task.bos_id).all() and (targets[:, -1] == task.eos_id).all()
    np.testing.assert_array_equal(tgt_in[:, 1:], targets[:, :-1])  # shifted by one
    assert task.decode(targets[0, :-1]) == "1998-03-03"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        task.encode_sources(["3 März 1998"])


def test_training_learns_and_the_checkpoint_round_trips(tmp_path):
    """A tiny model on the dates task: the loss falls, and a saved model decodes the same after loading."""
    task = DateTask(seed=0, heldout_size=40)
    mc = model_config_for(task, n_embd=16, n_head=2, n_encoder_layer=1, n_decoder_layer=1)
    cfg = Seq2SeqTrainConfig(out_dir=str(tmp_path / "run"), batch_size=16, max_iters=60, eval_interval=30,
                             eval_size=20, warmup_iters=5, learning_rate=3e-3, progress=False)
    model, history = train_seq2seq(mc, cfg, task, log=lambda *_: None)
    assert [h["step"] for h in history] == [30, 60]
    assert history[-1]["loss"] < 0.6 * math.log(task.vocab_size)  # from ~log V at the start
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 2
    loaded, tokenizer, ckpt = load_seq2seq(tmp_path / "run" / "ckpt")
    assert ckpt.config["model_type"] == "seq2seq" and tokenizer == task.tokenizer
    pairs = task.heldout()[:20]
    assert exact_match(loaded, tokenizer, pairs)[1] == exact_match(model, task.tokenizer, pairs)[1]
    save_seq2seq(tmp_path / "again", loaded, tokenizer)
    assert load_seq2seq(tmp_path / "again")[0].config == model.config


def test_a_stopped_training_keeps_its_last_evaluations_checkpoint(tmp_path):
    """The checkpoint is written at every evaluation, not only at the end: a run that stops keeps it."""
    task = DateTask(seed=0, heldout_size=4)
    draws = []

    class StopsAtStep4(DateTask):  # the batch of step 4 (after its evaluation) is never drawn: Ctrl-C
        def sample(self, rng, n, split="train"):
            if split == "train":
                draws.append(n)
                if len(draws) > 4:
                    raise KeyboardInterrupt
            return task.sample(rng, n, split)

    stopping = StopsAtStep4(seed=0, heldout_size=4)
    mc = model_config_for(task, n_embd=8, n_head=2, n_encoder_layer=1, n_decoder_layer=1)
    cfg = Seq2SeqTrainConfig(out_dir=str(tmp_path / "run"), batch_size=4, max_iters=10, eval_interval=4,
                             eval_size=4, warmup_iters=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_seq2seq(mc, cfg, stopping, log=lambda *_: None)
    loaded, _, ckpt = load_seq2seq(tmp_path / "run" / "ckpt")
    assert ckpt.step == 4 and [h["step"] for h in ckpt.extra["history"]] == [4]


def test_loading_a_gpt_checkpoint_as_seq2seq_is_a_clear_error(tmp_path):
    from npflux.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "gpt", {"x": np.zeros(2, dtype=np.float32)}, {"model": {}})
    with pytest.raises(ValueError, match="not a seq2seq"):
        load_seq2seq(tmp_path / "gpt")

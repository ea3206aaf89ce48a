"""npflux.nn: every module checked three ways.

(a) float64 numerical gradients (npflux.testing.assert_module_gradients_match) of every input
    and every parameter, over shapes drawn by hypothesis;
(b) PyTorch with copied weights: forward, input gradients and every
    parameter gradient, in float64 (1e-10) and float32 (1e-5);
(c) the Module contract: params/grads, accumulation, zero_grad, state dicts,
    train/eval, dtypes, errors, causality, the KV cache.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from npflux.backend import get_backend, to_numpy
from npflux.nn import (
    Block, Dropout, Embedding, FeedForward, KVCache, LayerNorm, Linear, Module, MultiHeadAttention,
    PositionalEmbedding, SinusoidalPositionalEncoding,
)
from npflux.testing import assert_module_gradients_match

from conftest import dev, host

try:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a test extra
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the test oracle) is not installed")

GRAD_TOL = 1e-7
F64_TOL = 1e-10
F32_TOL = 1e-5

# Few examples, derandomized and without a database: the file stays fast and
# every run draws the same shapes, so a failure always reproduces. No shrinking:
# shrinking a failing Block check re-runs hundreds of gradchecks (minutes), and
# the printed failing example is already small.
GRAD_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.reuse, Phase.generate],
                         suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def randomize(module, rng):
    """Random O(1) parameters: zero biases and unit gammas hide bugs (a dropped bias grad, a gamma never used)."""
    for name, p in module.params.items():
        if name.endswith("bias"):
            value = 0.3 * rng.standard_normal(p.shape)
        elif p.ndim == 1:  # a LayerNorm scale
            value = 1.0 + 0.3 * rng.standard_normal(p.shape)
        else:  # (in, out) weights: keep activations O(1)
            value = rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
        p[...] = module.backend.asarray(value, dtype=p.dtype)
    return module


def rel(a, b):
    """Max-abs relative difference of a against the reference b."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def assert_grads_ok(errors):
    """For an errors dict from npflux.gradcheck (test_seq2seq's checks); this file uses npflux.testing."""
    assert errors, "nothing was checked"
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL}
    assert not bad, f"gradient check failed (rel err > {GRAD_TOL}): {bad}; all: {errors}"


def key_mask(rng, B, S, keep_one=True):
    """(B, S) boolean padding mask, True = a real position; keep_one leaves at least one key per row."""
    m = rng.random((B, S)) < 0.7
    if keep_one:
        m[np.arange(B), rng.integers(0, S, B)] = True
    return m


class Reseeded:
    """A Dropout whose forward redraws the SAME mask every call (fresh rng of one seed), for gradcheck."""

    def __init__(self, drop, seed):
        self.drop, self.seed = drop, seed
        self.params, self.grads = drop.params, drop.grads

    def zero_grad(self):
        self.drop.zero_grad()

    def forward(self, x):
        self.drop.rng = np.random.default_rng(self.seed)
        return self.drop.forward(x)

    def backward(self, dy):
        return self.drop.backward(dy)


# hypothesis: (n_head, head_dim) pairs, odd widths included
heads_dims = st.sampled_from([(1, 3), (1, 5), (2, 1), (3, 1), (2, 3), (3, 3), (4, 2)])
batches = st.integers(1, 3)
lengths = st.sampled_from([1, 2, 3, 5])
seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------
# (a) numerical gradients, float64, hypothesis shapes
# --------------------------------------------------------------------------
@GRAD_SETTINGS
@given(B=batches, T=lengths, i=st.integers(1, 6), o=st.integers(1, 5), bias=st.booleans(), seed=seeds)
def test_gradcheck_linear(B, T, i, o, bias, seed):
    rng = np.random.default_rng(seed)
    m = randomize(Linear(i, o, bias=bias, dtype="float64"), rng)
    assert ("bias" in m.params) == bias
    assert_module_gradients_match(m, {"x": dev(rng.standard_normal((B, T, i)), like=m)}, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, V=st.sampled_from([3, 7, 300]), C=st.integers(1, 5), seed=seeds)
def test_gradcheck_embedding(B, T, V, C, seed):
    """V=300 takes the sorted scatter-add path, small V the one-hot one; ids repeat often."""
    rng = np.random.default_rng(seed)
    m = randomize(Embedding(V, C, dtype="float64"), rng)
    ids = rng.integers(0, min(V, 4), (B, T))  # few distinct ids: repeated rows must accumulate
    assert_module_gradients_match(m, {"ids": ids}, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, C=st.integers(1, 5), extra=st.integers(0, 3), seed=seeds)
def test_gradcheck_positional(B, T, C, extra, seed):
    rng = np.random.default_rng(seed)
    offset = int(rng.integers(0, extra + 1))
    x = dev(rng.standard_normal((B, T, C)))
    learned = randomize(PositionalEmbedding(T + extra, C, dtype="float64"), rng)
    assert_module_gradients_match(learned, {"x": x}, kwargs={"offset": offset}, seed=seed)
    fixed = SinusoidalPositionalEncoding(T + extra, C, dtype="float64")
    assert fixed.params == {} and fixed.grads == {}
    assert_module_gradients_match(fixed, {"x": x}, kwargs={"offset": offset}, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, C=st.integers(3, 7), seed=seeds)  # C=2: y = +-1, dx ~ eps, all noise
def test_gradcheck_layernorm(B, T, C, seed):
    rng = np.random.default_rng(seed)
    m = randomize(LayerNorm(C, dtype="float64"), rng)
    x = 2.0 * rng.standard_normal((B, T, C)) + rng.standard_normal()  # an offset the mean must remove
    assert_module_gradients_match(m, {"x": dev(x, like=m)}, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, C=st.integers(1, 5), p=st.sampled_from([0.0, 0.2, 0.5]), seed=seeds)
def test_gradcheck_dropout(B, T, C, p, seed):
    rng = np.random.default_rng(seed)
    drop = Dropout(p, dtype="float64")
    assert_module_gradients_match(Reseeded(drop, seed), {"x": rng.standard_normal((B, T, C))}, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, C=st.integers(1, 5), hidden=st.integers(1, 9),
       activation=st.sampled_from(["gelu", "relu"]), bias=st.booleans(), seed=seeds)
def test_gradcheck_feedforward(B, T, C, hidden, activation, bias, seed):
    rng = np.random.default_rng(seed)
    m = randomize(FeedForward(C, hidden, activation=activation, bias=bias, dtype="float64"), rng).eval()
    assert_module_gradients_match(m, {"x": dev(rng.standard_normal((B, T, C)), like=m)}, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, hd=heads_dims, causal=st.booleans(), masked=st.booleans(),
       qkv_bias=st.booleans(), seed=seeds)
def test_gradcheck_self_attention(B, T, hd, causal, masked, qkv_bias, seed):
    """Self-attention, causal or not, optionally with a padding mask (rows that see nothing included)."""
    H, D = hd
    rng = np.random.default_rng(seed)
    m = randomize(MultiHeadAttention(H * D, H, causal=causal, qkv_bias=qkv_bias, dtype="float64"), rng).eval()
    kwargs = {"mask": key_mask(rng, B, T, keep_one=False)[:, None, None, :]} if masked else {}
    assert_module_gradients_match(m, {"x": dev(rng.standard_normal((B, T, H * D)), like=m)}, kwargs=kwargs, seed=seed)


@GRAD_SETTINGS
@given(B=batches, T=lengths, S=lengths, hd=heads_dims, masked=st.booleans(), seed=seeds)
def test_gradcheck_cross_attention(B, T, S, hd, masked, seed):
    """Cross-attention: gradients of x AND of a context of another length."""
    H, D = hd
    rng = np.random.default_rng(seed)
    m = randomize(MultiHeadAttention(H * D, H, cross=True, dtype="float64"), rng).eval()
    inputs = {"x": dev(rng.standard_normal((B, T, H * D)), like=m),
              "context": dev(rng.standard_normal((B, S, H * D)), like=m)}
    kwargs = {"mask": key_mask(rng, B, S)[:, None, None, :]} if masked else {}
    errors = assert_module_gradients_match(m, inputs, kwargs=kwargs, seed=seed)
    assert {"x", "context"} <= set(errors)


@GRAD_SETTINGS
@given(B=batches, T=lengths, hd=heads_dims, cross=st.booleans(), activation=st.sampled_from(["gelu", "relu"]),
       seed=seeds)
def test_gradcheck_block(B, T, hd, cross, activation, seed):
    """The causal GPT block, and the decoder block with cross-attention (x and context gradients)."""
    H, D = hd
    C = H * D
    rng = np.random.default_rng(seed)
    m = randomize(Block(C, H, causal=True, cross_attention=cross, activation=activation, dtype="float64"), rng)
    m.eval()
    inputs = {"x": dev(rng.standard_normal((B, T, C)), like=m)}
    kwargs = {}
    if cross:
        S = int(rng.integers(1, 5))
        inputs["context"] = dev(rng.standard_normal((B, S, C)), like=m)
        kwargs["context_mask"] = key_mask(rng, B, S)[:, None, None, :]
    errors = assert_module_gradients_match(m, inputs, kwargs=kwargs, seed=seed)
    assert len(errors) == len(m.params) + len(inputs)


# --------------------------------------------------------------------------
# (b) PyTorch, copied weights, forward and backward
# --------------------------------------------------------------------------
DTYPES = [pytest.param(np.float64, F64_TOL, id="float64"), pytest.param(np.float32, F32_TOL, id="float32")]


def tt(a, dtype, grad=False):
    return torch.tensor(np.asarray(to_numpy(a)), dtype=torch.float64 if dtype == np.float64 else torch.float32,
                        requires_grad=grad)


def run_both(module, backend, dtype, inputs, forward, torch_forward, torch_grads, seed=0, n_grads=None):
    """Run npflux and torch on the same float64 host inputs cast to ``dtype``; compare everything.

    forward(*device inputs) -> out;  module.backward(dout) -> input grad(s);
    torch_forward(*torch inputs) -> out;  torch_grads() -> {npflux param name: torch grad in npflux layout}.
    Returns {what: relative difference}.
    """
    rng = np.random.default_rng(seed)
    tin = [tt(a, dtype, grad=True) for a in inputs]
    t_out = torch_forward(*tin)
    dout = rng.standard_normal(tuple(t_out.shape))
    t_out.backward(tt(dout, dtype))

    din = [backend.asarray(a, dtype=dtype) for a in inputs]
    module.zero_grad()
    out = forward(*din)
    assert out.dtype == dtype
    dx = module.backward(backend.asarray(dout, dtype=dtype))
    dx = dx if isinstance(dx, tuple) else (dx,)
    diffs = {"out": rel(out, t_out.detach().numpy())}
    for i, (g, t) in enumerate(zip(dx, tin)):
        assert g.dtype == dtype
        diffs[f"d_input{i}"] = rel(g, t.grad.numpy())
    ref = torch_grads()
    assert set(ref) == set(module.grads), (sorted(ref), sorted(module.grads))
    for name, g in module.grads.items():
        assert g.dtype == dtype
        diffs[name] = rel(g, ref[name].numpy())
    return diffs


def assert_close(diffs, tol):
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    assert not bad, f"differs from torch by more than {tol}: {bad}"


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_vs_torch(backend, dtype, tol, bias):
    rng = np.random.default_rng(1)
    m = randomize(Linear(7, 5, bias=bias, backend=backend, dtype=dtype), rng)
    ref = torch.nn.Linear(7, 5, bias=bias, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        ref.weight.copy_(tt(m.params["weight"], dtype).T)  # npflux (in, out), torch (out, in)
        if bias:
            ref.bias.copy_(tt(m.params["bias"], dtype))

    def grads():
        out = {"weight": ref.weight.grad.T}
        if bias:
            out["bias"] = ref.bias.grad
        return out

    diffs = run_both(m, backend, dtype, [rng.standard_normal((3, 4, 7))], m.forward, ref, grads)
    assert_close(diffs, tol)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_layernorm_vs_torch(backend, dtype, tol):
    rng = np.random.default_rng(2)
    m = randomize(LayerNorm(9, eps=1e-5, backend=backend, dtype=dtype), rng)
    ref = torch.nn.LayerNorm(9, eps=1e-5, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        ref.weight.copy_(tt(m.params["weight"], dtype))
        ref.bias.copy_(tt(m.params["bias"], dtype))
    x = 3.0 * rng.standard_normal((2, 5, 9)) + 1.5
    diffs = run_both(m, backend, dtype, [x], m.forward, ref,
                     lambda: {"weight": ref.weight.grad, "bias": ref.bias.grad})
    assert_close(diffs, tol)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_feedforward_vs_torch(backend, dtype, tol, activation):
    rng = np.random.default_rng(3)
    m = randomize(FeedForward(6, 20, activation=activation, backend=backend, dtype=dtype), rng)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    act = torch.nn.GELU(approximate="tanh") if activation == "gelu" else torch.nn.ReLU()
    ref = torch.nn.Sequential(torch.nn.Linear(6, 20, dtype=tdt), act, torch.nn.Linear(20, 6, dtype=tdt))
    with torch.no_grad():
        for i, name in ((0, "c_fc"), (2, "c_proj")):
            ref[i].weight.copy_(tt(m.params[f"{name}.weight"], dtype).T)
            ref[i].bias.copy_(tt(m.params[f"{name}.bias"], dtype))

    def grads():
        return {f"{name}.{k}": (getattr(ref[i], k).grad.T if k == "weight" else getattr(ref[i], k).grad)
                for i, name in ((0, "c_fc"), (2, "c_proj")) for k in ("weight", "bias")}

    diffs = run_both(m, backend, dtype, [rng.standard_normal((2, 5, 6))], m.forward, ref, grads)
    assert_close(diffs, tol)


# A torch reference for MHA and Block, on parameters kept in npflux's layout and names.
def t_linear(x, P, name):
    y = x @ P[f"{name}.weight"]
    return y + P[f"{name}.bias"] if f"{name}.bias" in P else y


def t_layernorm(x, P, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], P[f"{name}.weight"], P[f"{name}.bias"], eps)


def t_attention(x, P, prefix, H, causal=False, context=None, mask=None):
    """Fused qkv (or q and kv from the context) + F.scaled_dot_product_attention + output projection."""
    B, T, C = x.shape
    if context is None:
        q, k, v = t_linear(x, P, prefix + "c_attn").split(C, dim=-1)
    else:
        q = t_linear(x, P, prefix + "q_proj")
        k, v = t_linear(context, P, prefix + "kv_proj").split(C, dim=-1)

    def heads(a):
        return a.reshape(B, a.shape[1], H, C // H).transpose(1, 2)

    attn_mask = None if mask is None else torch.as_tensor(mask)
    if causal and attn_mask is not None:  # sdpa takes one or the other
        attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool).tril()
        causal = False
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask, is_causal=causal)
    return t_linear(y.transpose(1, 2).reshape(B, T, C), P, prefix + "c_proj")


def t_block(x, P, H, cross=False, activation="gelu", context=None, context_mask=None, mask=None):
    """Pre-LN: x + attn(ln_1 x); [x + cross(ln_cross x, ctx)]; x + mlp(ln_2 x)."""
    x = x + t_attention(t_layernorm(x, P, "ln_1"), P, "attn.", H, causal=True, mask=mask)
    if cross:
        x = x + t_attention(t_layernorm(x, P, "ln_cross"), P, "cross_attn.", H, context=context, mask=context_mask)
    h = t_linear(t_layernorm(x, P, "ln_2"), P, "mlp.c_fc")
    h = F.gelu(h, approximate="tanh") if activation == "gelu" else F.relu(h)
    return x + t_linear(h, P, "mlp.c_proj")


def torch_params(module, dtype):
    return {k: tt(v, dtype, grad=True) for k, v in module.params.items()}


ATTN_CASES = ["self", "causal", "padding_mask", "causal_padding_mask", "no_qkv_bias", "cross", "cross_mask"]


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_vs_torch_reference(backend, dtype, tol, case):
    rng = np.random.default_rng(4)
    B, T, S, C, H = 2, 5, 3, 12, 3
    causal = case.startswith("causal")
    cross = case.startswith("cross")
    m = randomize(MultiHeadAttention(C, H, causal=causal, cross=cross, qkv_bias=case != "no_qkv_bias",
                                     backend=backend, dtype=dtype), rng)
    P = torch_params(m, dtype)
    mask = None
    if "mask" in case:
        mask = key_mask(rng, B, S if cross else T)[:, None, None, :]
    dev_mask = None if mask is None else backend.asarray(mask)
    inputs = [rng.standard_normal((B, T, C))] + ([rng.standard_normal((B, S, C))] if cross else [])

    if cross:
        def forward(x, ctx):
            return m.forward(x, context=ctx, mask=dev_mask)

        def ref(x, ctx):
            return t_attention(x, P, "", H, context=ctx, mask=mask)
    else:
        def forward(x):
            return m.forward(x, mask=dev_mask)

        def ref(x):
            return t_attention(x, P, "", H, causal=causal, mask=mask)

    diffs = run_both(m, backend, dtype, inputs, forward, ref, lambda: {k: t.grad for k, t in P.items()})
    assert len(diffs) == 1 + len(inputs) + len(m.params)
    assert_close(diffs, tol)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_vs_torch_multihead_attention(backend, dtype, tol, masked):
    """Against torch.nn.MultiheadAttention: in_proj_weight (3C, C) holds q, k, v rows; weights compared too."""
    rng = np.random.default_rng(5)
    B, T, S, C, H = 3, 4, 6, 8, 2
    m = randomize(MultiHeadAttention(C, H, cross=True, backend=backend, dtype=dtype), rng)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    ref = torch.nn.MultiheadAttention(C, H, batch_first=True, dtype=tdt)
    p = {k: tt(v, dtype) for k, v in m.params.items()}
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([p["q_proj.weight"].T, p["kv_proj.weight"].T], dim=0))
        ref.in_proj_bias.copy_(torch.cat([p["q_proj.bias"], p["kv_proj.bias"]]))
        ref.out_proj.weight.copy_(p["c_proj.weight"].T)
        ref.out_proj.bias.copy_(p["c_proj.bias"])
    pad = key_mask(rng, B, S) if masked else np.ones((B, S), dtype=bool)
    t_weights = {}

    def torch_forward(x, ctx):
        out, w = ref(x, ctx, ctx, key_padding_mask=torch.as_tensor(~pad), need_weights=True,
                     average_attn_weights=False)
        t_weights["w"] = w
        return out

    def forward(x, ctx):
        return m.forward(x, context=ctx, mask=backend.asarray(pad[:, None, None, :]))

    def grads():
        w, b = ref.in_proj_weight.grad, ref.in_proj_bias.grad
        return {"q_proj.weight": w[:C].T, "kv_proj.weight": w[C:].T, "q_proj.bias": b[:C],
                "kv_proj.bias": b[C:], "c_proj.weight": ref.out_proj.weight.grad.T,
                "c_proj.bias": ref.out_proj.bias.grad}

    inputs = [rng.standard_normal((B, T, C)), rng.standard_normal((B, S, C))]
    diffs = run_both(m, backend, dtype, inputs, forward, torch_forward, grads)
    diffs["weights"] = rel(m.weights, t_weights["w"].detach().numpy())
    assert m.weights.shape == (B, H, T, S)
    assert_close(diffs, tol)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("cross,activation", [(False, "gelu"), (False, "relu"), (True, "gelu")])
def test_block_vs_torch_reference(backend, dtype, tol, cross, activation):
    rng = np.random.default_rng(6)
    B, T, S, C, H = 2, 6, 4, 12, 4
    m = randomize(Block(C, H, causal=True, cross_attention=cross, activation=activation,
                        backend=backend, dtype=dtype), rng)
    P = torch_params(m, dtype)
    inputs = [rng.standard_normal((B, T, C))]
    if cross:
        inputs.append(rng.standard_normal((B, S, C)))
        cmask = key_mask(rng, B, S)[:, None, None, :]

        def forward(x, ctx):
            return m.forward(x, context=ctx, context_mask=backend.asarray(cmask))

        def ref(x, ctx):
            return t_block(x, P, H, cross=True, activation=activation, context=ctx, context_mask=cmask)
    else:
        def forward(x):
            return m.forward(x)

        def ref(x):
            return t_block(x, P, H, activation=activation)

    diffs = run_both(m, backend, dtype, inputs, forward, ref, lambda: {k: t.grad for k, t in P.items()})
    assert len(diffs) == 1 + len(inputs) + len(m.params)
    assert_close(diffs, tol)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_embeddings_vs_torch(backend, dtype, tol):
    rng = np.random.default_rng(7)
    V, C, B, T = 11, 5, 3, 6
    emb = randomize(Embedding(V, C, backend=backend, dtype=dtype), rng)
    pos = randomize(PositionalEmbedding(T + 2, C, backend=backend, dtype=dtype), rng)
    ids = rng.integers(0, 4, (B, T))  # repeated ids
    W, Pw = tt(emb.params["weight"], dtype, grad=True), tt(pos.params["weight"], dtype, grad=True)
    t_out = F.embedding(torch.as_tensor(ids), W) + Pw[2 : 2 + T]
    dout = rng.standard_normal((B, T, C))
    t_out.backward(tt(dout, dtype))
    out = pos.forward(emb.forward(backend.asarray(ids)), offset=2)
    d = pos.backward(backend.asarray(dout, dtype=dtype))
    assert emb.backward(d) is None  # token ids have no gradient
    assert out.dtype == emb.grads["weight"].dtype == pos.grads["weight"].dtype == dtype
    assert_close({"out": rel(out, t_out.detach().numpy()), "wte": rel(emb.grads["weight"], W.grad.numpy()),
                  "wpe": rel(pos.grads["weight"], Pw.grad.numpy())}, tol)


# --------------------------------------------------------------------------
# (c) the Module contract
# --------------------------------------------------------------------------
CASE_NAMES = ["linear", "linear_nobias", "embedding", "embedding_large", "positional", "sinusoidal", "layernorm",
              "dropout", "ffn_gelu", "ffn_relu", "mha", "mha_causal", "mha_mask", "mha_cross", "block",
              "block_cross"]


def make_case(name, backend="numpy", dtype=np.float64, seed=0, dropout=0.0):
    """(module, run) where run() does one forward on fixed inputs and returns the output."""
    be = get_backend(backend)
    rng = np.random.default_rng(seed)
    B, T, S, C, H = 2, 4, 3, 6, 2
    kw = dict(backend=backend, dtype=dtype)

    def arr(*shape):
        return be.asarray(np.random.default_rng(100).standard_normal(shape), dtype=dtype)

    x, ctx = arr(B, T, C), arr(B, S, C)
    mask = be.asarray(key_mask(np.random.default_rng(101), B, T)[:, None, None, :])
    cmask = be.asarray(key_mask(np.random.default_rng(102), B, S)[:, None, None, :])
    ids = be.asarray(np.random.default_rng(103).integers(0, 5, (B, T)))
    build = {
        "linear": lambda: (Linear(C, 5, **kw), lambda m: m.forward(x)),
        "linear_nobias": lambda: (Linear(C, 5, bias=False, **kw), lambda m: m.forward(x)),
        "embedding": lambda: (Embedding(7, C, **kw), lambda m: m.forward(ids)),
        "embedding_large": lambda: (Embedding(300, C, **kw), lambda m: m.forward(ids)),
        "positional": lambda: (PositionalEmbedding(T + 3, C, **kw), lambda m: m.forward(x, offset=1)),
        "sinusoidal": lambda: (SinusoidalPositionalEncoding(T + 3, C, **kw), lambda m: m.forward(x, offset=1)),
        "layernorm": lambda: (LayerNorm(C, **kw), lambda m: m.forward(x)),
        "dropout": lambda: (Dropout(dropout, **kw), lambda m: m.forward(x)),
        "ffn_gelu": lambda: (FeedForward(C, activation="gelu", dropout=dropout, **kw), lambda m: m.forward(x)),
        "ffn_relu": lambda: (FeedForward(C, activation="relu", dropout=dropout, **kw), lambda m: m.forward(x)),
        "mha": lambda: (MultiHeadAttention(C, H, dropout=dropout, **kw), lambda m: m.forward(x)),
        "mha_causal": lambda: (MultiHeadAttention(C, H, causal=True, dropout=dropout, **kw), lambda m: m.forward(x)),
        "mha_mask": lambda: (MultiHeadAttention(C, H, dropout=dropout, **kw), lambda m: m.forward(x, mask=mask)),
        "mha_cross": lambda: (MultiHeadAttention(C, H, cross=True, dropout=dropout, **kw),
                              lambda m: m.forward(x, context=ctx, mask=cmask)),
        "block": lambda: (Block(C, H, dropout=dropout, **kw), lambda m: m.forward(x)),
        "block_cross": lambda: (Block(C, H, cross_attention=True, dropout=dropout, **kw),
                                lambda m: m.forward(x, context=ctx, context_mask=cmask)),
    }
    module, fwd = build[name]()
    randomize(module, rng)
    return module, lambda: fwd(module)


def fwd_bwd(module, run, seed=0):
    out = run()
    dout = module.backend.asarray(np.random.default_rng(seed).standard_normal(out.shape), dtype=out.dtype)
    return out, module.backward(dout)


def host_grads(module):
    return {k: to_numpy(v).copy() for k, v in module.grads.items()}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_params_and_grads_match(backend, name):
    m, run = make_case(name, backend.name)
    params, grads = m.params, m.grads
    assert list(params) == list(grads)
    for k in params:
        assert params[k].shape == grads[k].shape and params[k].dtype == grads[k].dtype
        assert params[k] is m.params[k] and grads[k] is m.grads[k]  # the same live arrays every time
        assert not to_numpy(grads[k]).any()
    assert m.num_parameters() == sum(int(p.size) for p in params.values())
    if name in ("sinusoidal", "dropout"):
        assert params == {}


def test_parameter_names_and_shapes():
    """GPT-2's names and (in, out) layouts, which checkpoints rely on."""
    shapes = {k: v.shape for k, v in Block(8, 2, cross_attention=True).params.items()}
    assert shapes == {
        "ln_1.weight": (8,), "ln_1.bias": (8,),
        "attn.c_attn.weight": (8, 24), "attn.c_attn.bias": (24,),
        "attn.c_proj.weight": (8, 8), "attn.c_proj.bias": (8,),
        "ln_cross.weight": (8,), "ln_cross.bias": (8,),
        "cross_attn.q_proj.weight": (8, 8), "cross_attn.q_proj.bias": (8,),
        "cross_attn.kv_proj.weight": (8, 16), "cross_attn.kv_proj.bias": (16,),
        "cross_attn.c_proj.weight": (8, 8), "cross_attn.c_proj.bias": (8,),
        "ln_2.weight": (8,), "ln_2.bias": (8,),
        "mlp.c_fc.weight": (8, 32), "mlp.c_fc.bias": (32,),
        "mlp.c_proj.weight": (32, 8), "mlp.c_proj.bias": (8,),
    }
    no_bias = MultiHeadAttention(8, 2, bias=False, qkv_bias=False)
    assert set(no_bias.params) == {"c_attn.weight", "c_proj.weight"}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_backward_accumulates(backend, name):
    m, run = make_case(name, backend.name)
    _, dx1 = fwd_bwd(m, run)
    once = host_grads(m)
    _, dx2 = fwd_bwd(m, run)
    twice = host_grads(m)
    for k in once:
        np.testing.assert_allclose(twice[k], 2 * once[k], rtol=1e-12, atol=1e-14)
    if name not in ("embedding", "embedding_large"):
        assert once == {} or any(np.abs(g).sum() > 0 for g in once.values())
    # the input gradient is returned, not accumulated
    for a, b in zip(dx1 if isinstance(dx1, tuple) else (dx1,), dx2 if isinstance(dx2, tuple) else (dx2,)):
        if a is not None:
            np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-12)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_zero_grad_in_place(backend, name):
    m, run = make_case(name, backend.name)
    before = {k: id(v) for k, v in m.grads.items()}
    fwd_bwd(m, run)
    m.zero_grad()
    assert {k: id(v) for k, v in m.grads.items()} == before
    assert all(not to_numpy(g).any() for g in m.grads.values())
    fwd_bwd(m, run)  # gradients still flow into the same arrays afterwards
    assert {k: id(v) for k, v in m.grads.items()} == before


@pytest.mark.parametrize("name", CASE_NAMES)
def test_state_dict_round_trip(backend, name):
    a, run_a = make_case(name, backend.name, seed=0)
    b, run_b = make_case(name, backend.name, seed=1)
    sd = a.state_dict()
    assert list(sd) == list(a.params)
    ids_before = {k: id(v) for k, v in b.params.items()}
    assert b.load_state_dict(sd) == ([], [])
    assert {k: id(v) for k, v in b.params.items()} == ids_before  # loaded in place
    np.testing.assert_array_equal(to_numpy(run_b()), to_numpy(run_a()))
    for k, v in b.params.items():
        assert v is not sd[k]
        np.testing.assert_array_equal(to_numpy(v), to_numpy(sd[k]))
    # a host float32 state dict also loads (cast to the module's dtype, moved to its device)
    host = {k: to_numpy(v).astype(np.float32) for k, v in sd.items()}
    b.load_state_dict(host)
    for k, v in b.params.items():
        assert v.dtype == np.float64
        np.testing.assert_array_equal(to_numpy(v), host[k])


def test_load_state_dict_errors():
    m, _ = make_case("block_cross")
    good = {k: to_numpy(v).copy() for k, v in m.state_dict().items()}
    snapshot = {k: v.copy() for k, v in good.items()}
    other = {k: v + 1.0 for k, v in good.items()}

    wrong_shape = dict(other, **{"mlp.c_fc.weight": np.zeros((6, 5))})
    with pytest.raises(ValueError, match=r"mlp\.c_fc\.weight.*shape"):
        m.load_state_dict(wrong_shape)
    missing = {k: v for k, v in other.items() if k != "ln_2.bias"}
    with pytest.raises(KeyError, match=r"missing.*ln_2\.bias"):
        m.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected.*extra"):
        m.load_state_dict(dict(other, extra=np.zeros(3)))
    not_finite = {k: v.copy() for k, v in other.items()}
    not_finite["attn.c_proj.bias"][2] = np.nan
    with pytest.raises(ValueError, match=r"attn\.c_proj\.bias.*finite"):
        m.load_state_dict(not_finite)
    # a rejected state dict leaves the module untouched (no half-loaded model)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, snapshot[k])

    missing_keys, unexpected = m.load_state_dict(dict(missing, extra=np.zeros(3)), strict=False)
    assert missing_keys == ["ln_2.bias"] and unexpected == ["extra"]
    np.testing.assert_array_equal(m.params["ln_2.bias"], snapshot["ln_2.bias"])
    np.testing.assert_array_equal(m.params["ln_2.weight"], other["ln_2.weight"])


def _all_modules(m):
    yield m
    for _, child in m.named_children():
        yield from _all_modules(child)


def test_train_eval_propagate(backend):
    m, run = make_case("block_cross", backend.name, dropout=0.5)
    mods = list(_all_modules(m))
    assert sum(isinstance(c, Dropout) for c in mods) == 3 and all(c.training for c in mods)
    assert m.eval() is m and not any(c.training for c in mods)
    out1, out2 = to_numpy(run()), to_numpy(run())
    np.testing.assert_array_equal(out1, out2)  # eval is deterministic ...
    plain, run_plain = make_case("block_cross", backend.name, dropout=0.0)
    np.testing.assert_allclose(out1, to_numpy(run_plain()), rtol=1e-13, atol=1e-13)  # ... and dropout-free
    assert m.train() is m and all(c.training for c in mods)
    t1, t2 = to_numpy(run()), to_numpy(run())
    assert not np.allclose(t1, out1) and not np.allclose(t1, t2)  # active in training mode, a new mask per call
    m.train(False)
    assert not any(c.training for c in mods)


def test_dropout_layer(backend):
    xp = backend.xp
    x = backend.asarray(np.random.default_rng(0).standard_normal((40, 50)) + 3.0)
    drop = Dropout(0.25, backend=backend, dtype="float64")
    y = drop.forward(x)
    kept = to_numpy(y) != 0
    assert 0.65 < kept.mean() < 0.85
    np.testing.assert_allclose(to_numpy(y)[kept], to_numpy(x)[kept] / 0.75, rtol=1e-15)
    dy = backend.asarray(np.random.default_rng(1).standard_normal((40, 50)))
    dx = to_numpy(drop.backward(dy))  # the same mask and scale as the forward
    np.testing.assert_allclose(dx, np.where(kept, to_numpy(dy) / 0.75, 0.0), rtol=1e-15)
    drop.eval()
    assert drop.forward(x) is x and drop.backward(dy) is dy
    assert xp is backend.xp
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout"):
            Dropout(p)


def test_dropout_masks_differ_between_sublayers():
    """Without an explicit dropout_rng the dropouts of one block must not draw identical masks."""
    m, run = make_case("block", dropout=0.5)
    run()
    a, b = m.attn.dropout.cache, m.mlp.dropout.cache
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_end_to_end(backend, name):
    m, run = make_case(name, backend.name, dtype=np.float32)
    assert m.dtype == np.float32
    assert all(p.dtype == np.float32 for p in m.params.values())
    out, dx = fwd_bwd(m, run)
    assert out.dtype == np.float32
    for g in dx if isinstance(dx, tuple) else (dx,):
        assert g is None or g.dtype == np.float32
    assert all(g.dtype == np.float32 for g in m.grads.values())
    ref, run64 = make_case(name, backend.name, dtype=np.float64)
    assert rel(out, run64()) < 1e-5


def test_float32_module_rejects_float64_input():
    with pytest.raises(TypeError, match="dtype"):
        Linear(3, 2).forward(np.zeros((1, 3)))


@pytest.mark.parametrize("cls", [MultiHeadAttention, Block])
@pytest.mark.parametrize("dim,n_head", [(10, 3), (12, 5), (7, 2), (8, 0)])
def test_width_not_divisible_by_heads(cls, dim, n_head):
    with pytest.raises(ValueError, match=rf"model width {dim} is not divisible by the number of heads {n_head}"):
        cls(dim, n_head)


def test_constructor_errors():
    with pytest.raises(ValueError, match="activation"):
        FeedForward(4, activation="swish")
    with pytest.raises(ValueError, match="not causal"):
        MultiHeadAttention(4, 2, causal=True, cross=True)
    with pytest.raises(ValueError, match="context"):
        MultiHeadAttention(4, 2, cross=True).forward(np.zeros((1, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        MultiHeadAttention(4, 2).forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="exceeds"):
        PositionalEmbedding(4, 3).forward(np.zeros((1, 3, 3), np.float32), offset=2)
    with pytest.raises(ValueError, match="exceeds"):
        SinusoidalPositionalEncoding(4, 3).forward(np.zeros((1, 5, 3), np.float32))


# --------------------------------------------------------------------------
# causality, masks, positions, the KV cache
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "block"])
def test_causal_future_does_not_leak(backend, kind):
    B, T, C, H, t = 2, 7, 6, 3, 3
    rng = np.random.default_rng(8)
    m = MultiHeadAttention(C, H, causal=True, backend=backend, dtype="float64") if kind == "mha" else \
        Block(C, H, causal=True, backend=backend, dtype="float64")
    randomize(m, rng)
    x = rng.standard_normal((B, T, C))
    y = to_numpy(m.forward(backend.asarray(x)))
    x2 = x.copy()
    x2[:, t + 1 :] = 10 * rng.standard_normal((B, T - t - 1, C))
    y2 = to_numpy(m.forward(backend.asarray(x2)))
    np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])  # early outputs unchanged, bit for bit
    assert not np.allclose(y2[:, t + 1 :], y[:, t + 1 :])
    # a loss on positions <= t has no gradient w.r.t. later inputs
    dout = np.zeros((B, T, C))
    dout[:, : t + 1] = rng.standard_normal((B, t + 1, C))
    m.zero_grad()
    dx = to_numpy(m.backward(backend.asarray(dout)))
    assert not dx[:, t + 1 :].any()
    assert np.abs(dx[:, : t + 1]).min() > 0


def test_non_causal_attention_sees_the_future():
    rng = np.random.default_rng(9)
    m = randomize(MultiHeadAttention(6, 2, dtype="float64"), rng)
    x = rng.standard_normal((1, 5, 6))
    y = host(m.forward(dev(x, like=m)))
    x[:, -1] += 1.0
    assert not np.allclose(host(m.forward(dev(x, like=m)))[:, 0], y[:, 0])


def test_padding_mask_blocks_keys():
    """Masked keys get zero weight; in cross-attention masked context positions get zero gradient."""
    rng = np.random.default_rng(10)
    B, T, S, C, H = 2, 3, 5, 6, 2
    m = randomize(MultiHeadAttention(C, H, cross=True, dtype="float64"), rng)
    pad = key_mask(rng, B, S)
    pad[0, -1] = False
    x, ctx = rng.standard_normal((B, T, C)), rng.standard_normal((B, S, C))
    y = host(m.forward(dev(x, like=m), context=dev(ctx, like=m), mask=pad[:, None, None, :]))
    w = host(m.weights)
    assert not w[np.broadcast_to(~pad[:, None, None, :], w.shape)].any()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-13)
    _, dctx = m.backward(dev(rng.standard_normal(y.shape), like=m))
    dctx = host(dctx)
    assert not dctx[~pad].any() and np.abs(dctx[pad]).min() > 0
    ctx2 = ctx.copy()
    ctx2[~pad] = 100.0  # what sits at masked positions does not matter
    y2 = host(m.forward(dev(x, like=m), context=dev(ctx2, like=m), mask=pad[:, None, None, :]))
    np.testing.assert_array_equal(y2, y)


def test_fully_masked_row_gives_bias_only_output():
    rng = np.random.default_rng(11)
    m = randomize(MultiHeadAttention(4, 2, dtype="float64"), rng)
    mask = np.zeros((1, 1, 1, 3), dtype=bool)
    y = host(m.forward(dev(rng.standard_normal((1, 3, 4)), like=m), mask=mask))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, np.broadcast_to(host(m.params["c_proj.bias"]), y.shape), rtol=1e-15)


def test_positional_offset_gradient_rows():
    rng = np.random.default_rng(12)
    m = PositionalEmbedding(8, 3, dtype="float64")
    x = rng.standard_normal((2, 3, 3))
    np.testing.assert_array_equal(host(m.forward(dev(x, like=m), offset=4)), x + host(m.params["weight"][4:7]))
    dy = dev(rng.standard_normal((2, 3, 3)), like=m)
    assert m.backward(dy) is dy
    g = host(m.grads["weight"])
    np.testing.assert_allclose(g[4:7], host(dy).sum(0), rtol=1e-15)
    assert not g[:4].any() and not g[7:].any()


def test_sinusoidal_values():
    m = SinusoidalPositionalEncoding(10, 5, dtype="float64")
    x = dev(np.zeros((1, 4, 5)), like=m)
    pe = host(m.forward(x, offset=3)[0])
    p = np.arange(3, 7)[:, None]
    angle = p / 10000.0 ** (np.arange(0, 5, 2)[None, :] / 5)
    np.testing.assert_allclose(pe[:, 0::2], np.sin(angle), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(pe[:, 1::2], np.cos(angle[:, :2]), rtol=1e-14, atol=1e-15)
    assert SinusoidalPositionalEncoding(10, 4).forward(dev(np.zeros((1, 2, 4), np.float32))).dtype == np.float32


def test_embedding_repeated_ids_accumulate():
    for V in (5, 300):  # the one-hot and the sorted scatter-add paths
        m = Embedding(V, 2, dtype="float64")
        ids = np.array([[1, 3, 1], [1, 0, 3]])
        m.forward(ids)
        dy = np.arange(12, dtype=np.float64).reshape(2, 3, 2) + 1
        m.backward(dev(dy, like=m))
        g = host(m.grads["weight"])
        np.testing.assert_array_equal(g[1], dy[0, 0] + dy[0, 2] + dy[1, 0])
        np.testing.assert_array_equal(g[3], dy[0, 1] + dy[1, 2])
        np.testing.assert_array_equal(g[0], dy[1, 1])
        assert not np.delete(g, [0, 1, 3], axis=0).any()


@pytest.mark.parametrize("kind", ["mha", "block"])
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 2, 1], [7]])
def test_kv_cache_decoding_equals_full_forward(backend, kind, chunks):
    """Feeding the sequence in chunks through a KV cache gives the full causal forward's outputs."""
    B, T, C, H = 2, 7, 6, 3
    rng = np.random.default_rng(13)
    m = MultiHeadAttention(C, H, causal=True, backend=backend, dtype="float64") if kind == "mha" else \
        Block(C, H, causal=True, backend=backend, dtype="float64")
    randomize(m, rng).eval()
    x = backend.asarray(rng.standard_normal((B, T, C)))
    full = to_numpy(m.forward(x))
    cache = KVCache(backend.xp, B, H, T, C // H, np.float64)
    outs, start = [], 0
    for n in chunks:
        outs.append(to_numpy(m.forward(x[:, start : start + n], kv_cache=cache)))
        start += n
    assert cache.length == T
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="full"):
        m.forward(x[:, :1], kv_cache=cache)


def test_params_dict_is_current_after_structure_changes():
    """params/grads are cached between calls, but never stale: a new parameter or child shows up."""
    from npflux.nn import Linear, Module

    m = Module(dtype="float64")
    m.a = Linear(2, 3, rng=np.random.default_rng(0), dtype="float64")
    first = m.params
    assert sorted(first) == ["a.bias", "a.weight"]
    first.pop("a.bias")  # the caller's copy; the module's answer is unaffected
    assert sorted(m.params) == ["a.bias", "a.weight"]
    m.a.add_param("extra", np.zeros(4))
    assert "a.extra" in m.params and "a.extra" in m.grads
    m.b = Linear(3, 1, rng=np.random.default_rng(1), dtype="float64")
    assert set(m.params) == set(m.grads) == {"a.bias", "a.weight", "a.extra", "b.weight", "b.bias"}
    assert m.params["b.weight"] is m.b.p["weight"]

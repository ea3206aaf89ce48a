"""LoRA adapters, int8 weight quantization, QLoRA, and their checkpoints and commands.

(a) float64 numerical gradients of LoRALinear (float and int8 base), FrozenLinear, QuantizedLinear;
(b) PyTorch: a LoRA layer written here and torch.quantize_per_channel, float64 and float32;
(c) the frozen weights: no gradient array, untouched by training, invisible to the optimizer;
    merge/unmerge; the model's parameter caches and flat buffers after layers are swapped;
(d) quantized and adapter checkpoints round-trip; fine-tuning lowers the loss; the commands.
"""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from npflux import GPT, GPTConfig
from npflux.backend import to_numpy
from npflux.checkpoint import CheckpointError, save_checkpoint
from npflux.finetune import (
    FinetuneConfig, encode_for, finetune, model_size, quantize_model, save_adapter, save_quantized, split_text,
    windows_loss,
)
from npflux.gradcheck import check_module
from npflux.nn import (
    FrozenLinear, Linear, LoRALinear, QuantizedLinear, apply_lora, dequantize_int8, lora_parameters, merge_lora,
    quantize_int8, unmerge_lora,
)
from npflux.nn.lora import lora_gradients
from npflux.nn.quant import named_buffers
from npflux.tokenizers import CharTokenizer
from npflux.train import model_from_checkpoint

from conftest import dev, host

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a test extra
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the test oracle) is not installed")
GRAD_TOL, F64_TOL, F32_TOL = 1e-7, 1e-10, 1e-5
GRAD_SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.reuse, Phase.generate],
                         suppress_health_check=[HealthCheck.too_slow])
DTYPES = [(np.float64, F64_TOL), (np.float32, F32_TOL)]
# y = base(x) + s (x A) B is linear in x, in A and in B separately, so the central difference has no
# truncation error at any step: a step of 1e-3 instead of 1e-6 cuts its rounding error (~ machine eps |L| / step)
# 1000-fold. With 1e-6, a parameter whose whole gradient is small by cancellation (a 1 x 1 B of 0.003) read
# 1.8e-7 from rounding alone (a 300-example hypothesis run found it).
LINEAR_EPS = 1e-3


def rel(a, b):
    a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def lora_layer(i, o, rank, bias, quantized, seed, dtype="float64", group_size=None, blocks=None):
    """A LoRALinear with random base, A and a NONZERO B (a fresh B = 0 would hide a wrong dA)."""
    rng = np.random.default_rng(seed)
    lin = Linear(i, o, bias=bias, rng=rng, dtype=dtype)
    lin.p["weight"][...] = dev(rng.standard_normal((i, o)) / np.sqrt(i), like=lin)
    if bias:
        lin.p["bias"][...] = dev(0.3 * rng.standard_normal(o), like=lin)
    base = QuantizedLinear.from_linear(lin, group_size) if quantized else FrozenLinear.from_linear(lin)
    m = LoRALinear(base, rank, alpha=2.0 * rank + 1, rng=rng, blocks=blocks)
    for name, p in m.params.items():
        if name.startswith("lora_B"):
            p[...] = dev(rng.standard_normal(p.shape), like=p)
    return m


def tiny_config(**kw):
    return GPTConfig(**{**dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, activation="relu",
                               qkv_bias=False, tie_weights=False, lm_head_bias=True), **kw})


def batch(seed=0, B=3, T=8, V=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


# --------------------------------------------------------------------------
# (a) numerical gradients, float64
# --------------------------------------------------------------------------
@GRAD_SETTINGS
@given(B=st.integers(1, 3), T=st.sampled_from([1, 2, 5]), i=st.integers(1, 6), o=st.integers(1, 6),
       rank=st.integers(1, 3), bias=st.booleans(), quantized=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gradcheck_lora_linear(B, T, i, o, rank, bias, quantized, seed):
    rank = min(rank, i, o)
    m = lora_layer(i, o, rank, bias, quantized, seed)
    assert set(m.params) == {"lora_A", "lora_B"}  # the base weight has no gradient to check: it has none
    x = dev(np.random.default_rng(seed + 1).standard_normal((B, T, i)), like=m)
    errors = check_module(m, {"x": x}, seed=seed, eps=LINEAR_EPS)
    assert set(errors) == {"x", "lora_A", "lora_B"}
    assert max(errors.values()) <= GRAD_TOL, errors


@GRAD_SETTINGS
@given(B=st.integers(1, 3), T=st.sampled_from([1, 3]), i=st.integers(1, 5), w=st.integers(1, 3),
       parts=st.sampled_from([("q",), ("v",), ("q", "v"), ("q", "k", "v")]), quantized=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gradcheck_lora_on_column_blocks(B, T, i, w, parts, quantized, seed):
    """Separate adapters on some thirds of a fused (in, 3w) projection: x and every block's A and B."""
    blocks = {p: ("qkv".index(p) * w, ("qkv".index(p) + 1) * w) for p in parts}
    m = lora_layer(i, 3 * w, 1, True, quantized, seed, blocks=blocks)
    assert set(m.params) == {f"lora_{ab}_{p}" for p in parts for ab in "AB"}
    errors = check_module(m, {"x": dev(np.random.default_rng(seed + 1).standard_normal((B, T, i)), like=m)}, seed=seed,
                          eps=LINEAR_EPS)
    assert set(errors) == {"x", *m.params} and max(errors.values()) <= GRAD_TOL, errors


@GRAD_SETTINGS
@given(B=st.integers(1, 3), T=st.sampled_from([1, 3]), i=st.sampled_from([2, 4, 6]), o=st.integers(1, 5),
       bias=st.booleans(), group=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gradcheck_frozen_and_quantized_linear(B, T, i, o, bias, group, seed):
    rng = np.random.default_rng(seed)
    lin = Linear(i, o, bias=bias, rng=rng, dtype="float64")
    for layer in (FrozenLinear.from_linear(lin), QuantizedLinear.from_linear(lin, 2 if group else None)):
        assert layer.params == {} and layer.grads == {}
        errors = check_module(layer, {"x": dev(rng.standard_normal((B, T, i)), like=layer)}, seed=seed, eps=LINEAR_EPS)
        assert set(errors) == {"x"} and errors["x"] <= GRAD_TOL, errors


# --------------------------------------------------------------------------
# (b) PyTorch
# --------------------------------------------------------------------------
def torch_lora(x, W0, b0, A, B, scaling):
    """The reference LoRA: y = x W0^T + b0 + s (x A^T) B^T with torch's (out, in) layouts; W0 frozen."""
    y = torch.nn.functional.linear(x, W0, b0)
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("quantized", [False, True])
def test_lora_vs_torch(dtype, tol, quantized):
    m = lora_layer(7, 5, 3, True, quantized, seed=4, dtype=dtype)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    W0 = torch.tensor(to_numpy(m.base.weight()).T.copy(), dtype=tdt, requires_grad=False)
    b0 = torch.tensor(to_numpy(m.base.buffers["bias"]), dtype=tdt, requires_grad=False)
    A = torch.tensor(to_numpy(m.p["lora_A"]).T.copy(), dtype=tdt, requires_grad=True)  # peft's lora_A (r, in)
    B = torch.tensor(to_numpy(m.p["lora_B"]).T.copy(), dtype=tdt, requires_grad=True)  # peft's lora_B (out, r)
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((2, 4, 7)).astype(dtype)
    dy_np = rng.standard_normal((2, 4, 5)).astype(dtype)
    x = torch.tensor(x_np, requires_grad=True)
    y_ref = torch_lora(x, W0, b0, A, B, m.scaling)
    y_ref.backward(torch.tensor(dy_np))

    y = m.forward(dev(x_np, like=m))
    dx = m.backward(dev(dy_np, like=m))
    assert y.dtype == dtype and dx.dtype == dtype and m.g["lora_A"].dtype == dtype
    assert W0.grad is None  # torch never computed it either
    errs = {"y": rel(y, y_ref.detach().numpy()), "dx": rel(dx, x.grad.numpy()),
            "dA": rel(m.g["lora_A"], A.grad.numpy().T), "dB": rel(m.g["lora_B"], B.grad.numpy().T)}
    assert max(errs.values()) <= tol, errs


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_qv_lora_on_fused_projection_vs_torch(dtype, tol):
    """peft-style separate q and v adapters on a fused q/k/v projection, against torch."""
    C = 6
    m = lora_layer(C, 3 * C, 2, True, False, seed=7, dtype=dtype, blocks={"q": (0, C), "v": (2 * C, 3 * C)})
    tdt = torch.float64 if dtype == np.float64 else torch.float32

    def t(a, grad=False):
        return torch.tensor(np.ascontiguousarray(to_numpy(a)), dtype=tdt, requires_grad=grad)

    W0, b0 = t(m.base.weight().T), t(m.base.buffers["bias"])
    Aq, Bq, Av, Bv = (t(m.p[n].T, True) for n in ("lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v"))
    rng = np.random.default_rng(3)
    x_np, dy_np = rng.standard_normal((2, 3, C)).astype(dtype), rng.standard_normal((2, 3, 3 * C)).astype(dtype)
    x = t(x_np, True)
    q, k, v = torch.nn.functional.linear(x, W0, b0).split(C, dim=-1)
    y_ref = torch.cat([q + m.scaling * (x @ Aq.T) @ Bq.T, k, v + m.scaling * (x @ Av.T) @ Bv.T], dim=-1)
    y_ref.backward(t(dy_np))
    y, dx = m.forward(dev(x_np, like=m)), m.backward(dev(dy_np, like=m))
    errs = {"y": rel(y, y_ref.detach().numpy()), "dx": rel(dx, x.grad.numpy()),
            **{n: rel(m.g[n], ref.grad.numpy().T) for n, ref in
               zip(("lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v"), (Aq, Bq, Av, Bv))}}
    assert y.dtype == dtype and max(errs.values()) <= tol, errs


@needs_torch
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated, still the reference
def test_quantize_int8_matches_torch_per_channel():
    """Our int8 values and scales are torch.quantize_per_channel's (symmetric, zero point 0, round half even)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 10)) * rng.uniform(0.1, 3.0, 10)).astype(np.float32)
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (10,)
    ref = torch.quantize_per_channel(torch.tensor(w.T.copy()), torch.tensor(scale, dtype=torch.float64),
                                     torch.zeros(10, dtype=torch.int64), axis=0, dtype=torch.qint8)
    np.testing.assert_array_equal(q, ref.int_repr().numpy().T)
    np.testing.assert_allclose(dequantize_int8(q, scale), ref.dequantize().numpy().T, rtol=1e-6, atol=0)


@needs_torch
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_quantized_linear_vs_torch(dtype, tol):
    rng = np.random.default_rng(2)
    lin = Linear(8, 6, rng=rng, dtype=dtype)
    lin.p["bias"][...] = dev(rng.standard_normal(6), like=lin)
    layer = QuantizedLinear.from_linear(lin, group_size=4)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    W = host(dequantize_int8(layer.buffers["weight_int8"], layer.buffers["weight_scale"], np.float64))
    W = torch.tensor(W.T.copy(), dtype=tdt)
    x_np, dy_np = rng.standard_normal((3, 8)).astype(dtype), rng.standard_normal((3, 6)).astype(dtype)
    x = torch.tensor(x_np, requires_grad=True)
    y_ref = torch.nn.functional.linear(x, W, torch.tensor(to_numpy(lin.p["bias"]), dtype=tdt))
    y_ref.backward(torch.tensor(dy_np))
    y, dx = layer.forward(dev(x_np, like=layer)), layer.backward(dev(dy_np, like=layer))
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel(y, y_ref.detach().numpy()) <= tol and rel(dx, x.grad.numpy()) <= tol


# --------------------------------------------------------------------------
# quantization error
# --------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(i=st.sampled_from([4, 8, 12]), o=st.integers(1, 7), group=st.sampled_from([None, 2, 4]),
       seed=st.integers(0, 2**32 - 1))
def test_quantization_error_is_at_most_half_a_step(i, o, group, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((i, o)) * rng.uniform(0.01, 5.0, o)).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero channel must not divide by zero
    q, scale = quantize_int8(w, group)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    assert scale.shape == ((o,) if group is None else (i // group, o))
    step = scale if group is None else np.repeat(scale, group, axis=0)
    assert np.all(np.abs(dequantize_int8(q, scale) - w) <= step / 2 * (1 + 1e-6))
    assert dequantize_int8(q, scale).dtype == np.float32  # float32 stays float32; float64 on request
    assert dequantize_int8(q, scale, np.float64).dtype == np.float64
    assert np.all(q[:, 0] == 0)
    # the largest magnitude of each channel (or group) is on the grid's end
    blocks = np.abs(q.astype(int)).reshape(-1 if group is None else i // group, i if group is None else group, o)
    assert np.all((blocks.max(axis=1) == 127) | (blocks.max(axis=1) == 0))


def test_quantize_a_column_too_small_for_a_float32_scale():
    """max |w| / 127 underflows to 0 for subnormal weights: the scale must not be 0 (0 / 0 made q undefined)."""
    import warnings

    w = np.array([[1e-44, 1.0], [-1e-45, 0.5]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero
        q, scale = quantize_int8(w)
    assert np.all(scale > 0) and np.abs(q.astype(int)).max() <= 127
    assert np.abs(dequantize_int8(q, scale) - w).max() <= scale.max() / 2


def test_quantize_errors():
    with pytest.raises(ValueError, match="divide"):
        quantize_int8(np.ones((6, 2), np.float32), group_size=4)
    with pytest.raises(ValueError, match="finite"):
        quantize_int8(np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="int8"):
        QuantizedLinear(np.ones((2, 2), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="scales"):
        QuantizedLinear(np.ones((6, 2), np.int8), np.ones((4, 2), np.float32))


# --------------------------------------------------------------------------
# (c) frozen weights, merging, the model's structure
# --------------------------------------------------------------------------
def test_frozen_base_is_never_given_a_gradient_or_updated():
    model = GPT(tiny_config(), seed=0, dtype="float64")
    n_base = model.num_parameters()
    before = {k: v.copy() for k, v in model.params.items()}
    paths = apply_lora(model, ["attn.c_attn", "mlp.c_fc"], rank=2, alpha=4, seed=1)
    assert paths == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_fc")]
    params, grads = model.params, model.grads
    assert params.keys() == grads.keys()
    # No linear weight (adapted or not) is a parameter or has a gradient array any more.
    linear_weights = [k for k in before if ".attn." in k or ".mlp." in k]
    assert linear_weights and not any(k in params or k in grads for k in linear_weights)
    assert set(lora_parameters(model)) == {f"{p}.lora_{ab}" for p in paths for ab in "AB"}
    trainable = sum(v.size for v in lora_parameters(model).values())
    assert trainable == 2 * (2 * (8 + 24) + 2 * (8 + 32)) and trainable < n_base

    frozen = {k: v.copy() for k, v in named_buffers(model).items()}
    from npflux import optim

    opt = optim.AdamW(lora_parameters(model), lr=1e-2)
    assert set(opt.params) == set(lora_parameters(model))  # the optimizer sees A and B only
    x, y = batch()
    for step in range(3):
        model.zero_grad()
        model.forward(x, y)
        model.backward()
        # B starts at 0, so the first step moves only B (dA = x^T dy B^T s = 0); after it, both move.
        moving = [k for k in lora_gradients(model) if step > 0 or k.endswith("lora_B")]
        assert all(float(np.abs(host(lora_gradients(model)[k])).max()) > 0 for k in moving)
        opt.step(lora_gradients(model))
    for k, v in named_buffers(model).items():
        np.testing.assert_array_equal(host(v), host(frozen[k]), err_msg=k)  # frozen weights: bit for bit
    for k, v in model.params.items():
        if "lora_" not in k:
            np.testing.assert_array_equal(host(v), host(before[k]), err_msg=k)  # embeddings, norms, head: untouched
    assert any(float(np.abs(host(v)).max()) > 0 for k, v in lora_parameters(model).items() if k.endswith("lora_B"))


def test_zero_grad_and_caches_after_swapping_layers():
    """The model's flat gradient buffer is rebuilt: zero_grad must clear the NEW adapters' gradients."""
    model = GPT(tiny_config(), seed=0)
    old_params = model.params
    apply_lora(model, "attn.c_attn", rank=2)
    assert model.params.keys() != old_params.keys()  # the cached dicts were invalidated
    x, y = batch()
    model.forward(x, y)
    model.backward()
    assert any(float(np.abs(g).max()) > 0 for g in lora_gradients(model).values())
    model.zero_grad()
    assert all(float(np.abs(g).max()) == 0 for g in model.grads.values())
    assert all(v.dtype == np.float32 for v in {**model.params, **named_buffers(model)}.values() if v.dtype.kind == "f")


def test_gpt_adapter_gradients_match_numerical():
    """Through a whole GPT: the adapters' gradients are the loss's (central differences on a few entries)."""
    model = GPT(tiny_config(), seed=0, dtype="float64")
    apply_lora(model, ["attn.c_attn", "mlp.c_proj"], rank=2, alpha=5, seed=3)  # scaling 2.5, not 1
    rng = np.random.default_rng(0)
    for v in lora_parameters(model).values():
        v[...] = dev(0.3 * rng.standard_normal(v.shape), like=v)
    x, y = batch(1)
    model.zero_grad()
    model.forward(x, y)
    model.backward()
    for name, p in lora_parameters(model).items():
        g = host(model.grads[name])
        for idx in [tuple(rng.integers(0, s) for s in p.shape) for _ in range(3)]:
            old = float(p[idx])  # a value: on CuPy p[idx] is a 0-d view that the next line would change
            p[idx] = old + 1e-6
            up = float(model.forward(x, y)[1])
            p[idx] = old - 1e-6
            down = float(model.forward(x, y)[1])
            p[idx] = old
            assert abs((up - down) / 2e-6 - g[idx]) <= 1e-7 * max(1.0, abs(g[idx])), (name, idx)


def test_merge_and_unmerge_agree():
    m = lora_layer(6, 4, 2, True, False, seed=3)
    x = dev(np.random.default_rng(0).standard_normal((2, 3, 6)), like=m)
    w0 = m.base.buffers["weight"].copy()
    y = m.forward(x)
    m.merge()
    merged_weight = m.base.buffers["weight"].copy()
    m.merge()  # idempotent: the update is not added twice
    np.testing.assert_array_equal(host(m.base.buffers["weight"]), host(merged_weight))
    assert m.merged and rel(m.forward(x), y) <= 1e-13
    with pytest.raises(RuntimeError, match="unmerge"):
        m.backward(m.xp.ones_like(y))
    m.unmerge()
    m.unmerge()  # idempotent too
    assert rel(m.base.buffers["weight"], w0) <= 1e-14 and rel(m.forward(x), y) <= 1e-14

    model = GPT(tiny_config(), seed=0, dtype="float64")
    apply_lora(model, ["attn.*", "mlp.c_fc"], rank=3)
    for v in lora_parameters(model).values():
        v[...] = dev(0.1 * np.random.default_rng(1).standard_normal(v.shape), like=v)
    idx, _ = batch()
    logits = model.forward(idx)[0]
    merge_lora(model)
    assert rel(model.forward(idx)[0], logits) <= 1e-12
    unmerge_lora(model)
    assert rel(model.forward(idx)[0], logits) <= 1e-12

    with pytest.raises(TypeError, match="int8"):
        lora_layer(6, 4, 2, True, True, seed=3).merge()


def test_apply_lora_on_q_and_v_only():
    model = GPT(tiny_config(), seed=0, dtype="float64")
    apply_lora(model, ["attn.c_attn[q,v]", "mlp.c_fc"], rank=2, alpha=3)
    names = set(lora_parameters(model))
    assert "transformer.h.0.attn.c_attn.lora_A_q" in names and "transformer.h.1.attn.c_attn.lora_B_v" in names
    assert not any(n.endswith("_k") for n in names)
    assert sum(v.size for v in lora_parameters(model).values()) == 2 * (2 * 2 * (8 + 8) + 2 * (8 + 32))
    for v in lora_parameters(model).values():
        v[...] = dev(0.2 * np.random.default_rng(2).standard_normal(v.shape), like=v)
    layer = model.transformer.h.items[0].attn.c_attn
    assert np.all(host(layer.delta())[:, 8:16] == 0) and np.any(host(layer.delta())[:, :8] != 0)  # k untouched
    idx, _ = batch()
    logits = model.forward(idx)[0]
    merge_lora(model)
    assert rel(model.forward(idx)[0], logits) <= 1e-12
    with pytest.raises(ValueError, match="no parts"):
        apply_lora(GPT(tiny_config(), seed=0), ["mlp.c_fc[q]"])
    with pytest.raises(ValueError, match="more than one"):
        apply_lora(GPT(tiny_config(), seed=0), ["attn.c_attn", "attn.*"])


def test_apply_lora_errors():
    model = GPT(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_lora(model, ["attn.q_proj"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, ["attn.c_attn"], rank=9)  # n_embd is 8
    apply_lora(model, ["attn.c_attn"], rank=2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, ["attn.c_attn"], rank=2)


# --------------------------------------------------------------------------
# (d) checkpoints, fine-tuning, commands
# --------------------------------------------------------------------------
TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 40


def make_base(tmp_path, n_embd=16, **config):
    tok = CharTokenizer(TEXT)
    cfg = tiny_config(vocab_size=tok.vocab_size, n_embd=n_embd, block_size=16, **config)
    model = GPT(cfg, seed=0)
    save_checkpoint(tmp_path / "base", model.state_dict(), {"model": cfg.to_dict(), "train": {"dtype": "float32"}},
                    tokenizer=tok)
    return tmp_path / "base", tok


@pytest.mark.parametrize("gpt2_style", [False, True])
def test_quantized_checkpoint_round_trip_and_size(tmp_path, gpt2_style):
    """The char models' layout, and GPT-2's (GELU, all biases, lm_head tied to wte: the embedding stays float)."""
    extra = dict(activation="gelu", qkv_bias=True, tie_weights=True, lm_head_bias=False) if gpt2_style else {}
    base_dir, tok = make_base(tmp_path, **extra)
    model, _, ckpt = model_from_checkpoint(base_dir)
    idx = np.asarray([tok.encode("the cat sat on t")])
    float_logits = model.forward(idx)[0]
    size_float = model_size(model)
    paths = quantize_model(model, group_size=8)
    assert len(paths) == 8
    q_logits = model.forward(idx)[0]
    save_quantized(tmp_path / "q", model, ckpt.config, tokenizer=ckpt.tokenizer)
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    assert meta["config"]["quantization"]["group_size"] == 8 and meta["config"]["quantization"]["layers"] == paths
    import safetensors.numpy

    saved = safetensors.numpy.load_file(str(tmp_path / "q" / "model.safetensors"))
    assert saved["transformer.h.0.mlp.c_fc.weight_int8"].dtype == np.int8
    assert not any(k.endswith("c_fc.weight") for k in saved)

    loaded, tok2, _ = model_from_checkpoint(tmp_path / "q")
    assert tok2 == tok and isinstance(loaded.transformer.h.items[1].mlp.c_proj, QuantizedLinear)
    np.testing.assert_array_equal(host(loaded.forward(idx)[0]), host(q_logits))
    assert rel(q_logits, float_logits) < 0.05  # close, not equal
    assert model_size(loaded)["total"] == model_size(model)["total"] < size_float["total"]
    out = loaded.generate(idx[:, :4], 5, temperature=0)
    assert out.shape == (1, 9)


def test_finetune_lowers_loss_and_adapter_round_trip(tmp_path):
    base_dir, tok = make_base(tmp_path)
    model, _, _ = model_from_checkpoint(base_dir)
    before = {k: v.copy() for k, v in model.params.items()}
    ids = np.asarray(tok.encode(TEXT))
    cfg = FinetuneConfig(rank=4, alpha=8, targets=("attn.c_attn", "mlp.c_fc"), max_iters=40, learning_rate=1e-2,
                         eval_interval=20, progress=False)
    summary = finetune(model, ids[:1500], ids[1500:], cfg, log=lambda *a: None)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.1
    # finetune's optimizer moved A and B only: every base array (now a parameter or a frozen buffer) is as loaded
    after = {**model.params, **{k.replace(".base.", "."): v for k, v in named_buffers(model).items()}}
    for k, v in before.items():
        np.testing.assert_array_equal(host(after[k]), host(v), err_msg=k)
    assert summary["trainable_parameters"] == 2 * (4 * (16 + 48) + 4 * (16 + 64))

    save_adapter(tmp_path / "adapter", model, base_dir,
                 {"rank": 4, "alpha": 8, "targets": list(cfg.targets), "seed": cfg.seed}, tokenizer=tok)
    import safetensors.numpy

    saved = safetensors.numpy.load_file(str(tmp_path / "adapter" / "model.safetensors"))
    assert set(saved) == set(lora_parameters(model))  # only A and B
    loaded, tok2, _ = model_from_checkpoint(tmp_path / "adapter")
    idx = ids[None, :16]
    np.testing.assert_array_equal(host(loaded.forward(idx)[0]), host(model.forward(idx)[0]))
    assert windows_loss(loaded, ids[1500:]) == pytest.approx(summary["val_loss_after"], abs=1e-6)

    # a moved base: a clear error, and load_adapter takes its new place
    from npflux.finetune import load_adapter

    moved = base_dir.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="not there"):
        model_from_checkpoint(tmp_path / "adapter")
    again, _ = load_adapter(tmp_path / "adapter", base_checkpoint=moved)
    np.testing.assert_array_equal(host(again.forward(idx)[0]), host(model.forward(idx)[0]))
    moved.rename(base_dir)

    # a changed base is refused, not silently combined
    other = GPT(GPTConfig.from_dict(json.loads((base_dir / "meta.json").read_text())["config"]["model"]), seed=5)
    save_checkpoint(base_dir, other.state_dict(), json.loads((base_dir / "meta.json").read_text())["config"],
                    tokenizer=tok)
    with pytest.raises(CheckpointError, match="SHA-256"):
        model_from_checkpoint(tmp_path / "adapter")


def test_qlora_adapter_over_int8_base(tmp_path):
    base_dir, tok = make_base(tmp_path)
    model, _, ckpt = model_from_checkpoint(base_dir)
    with pytest.raises(ValueError, match="no int8 layers"):
        save_quantized(tmp_path / "q", model, ckpt.config)
    quantize_model(model)
    save_quantized(tmp_path / "q", model, ckpt.config, tokenizer=tok)
    qmodel, _, _ = model_from_checkpoint(tmp_path / "q")
    ids = np.asarray(tok.encode(TEXT))
    cfg = FinetuneConfig(rank=2, alpha=4, targets="attn.c_attn", max_iters=30, learning_rate=1e-2, eval_interval=30,
                         progress=False)
    int8_before = {k: v.copy() for k, v in named_buffers(qmodel).items() if v.dtype == np.int8}
    summary = finetune(qmodel, ids[:1500], ids[1500:], cfg, log=lambda *a: None)
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert summary["base_parameters"] == GPT(qmodel.config).num_parameters()  # int8 weights counted
    assert summary["config"]["targets"] == ["attn.c_attn"]  # one pattern given as a string, not 11 characters
    for k, v in named_buffers(qmodel).items():
        if v.dtype == np.int8:
            np.testing.assert_array_equal(host(v), host(int8_before[k.replace(".base.", ".")]), err_msg=k)
    with pytest.raises(ValueError, match="int8, but .* a float checkpoint"):  # it would load over the float base
        save_adapter(tmp_path / "adapter", qmodel, base_dir, {"rank": 2, "alpha": 4, "targets": ["attn.c_attn"]})
    save_adapter(tmp_path / "adapter", qmodel, tmp_path / "q", {"rank": 2, "alpha": 4, "targets": ["attn.c_attn"]})
    loaded, _, _ = model_from_checkpoint(tmp_path / "adapter")
    assert isinstance(loaded.transformer.h.items[0].attn.c_attn.base, QuantizedLinear)
    np.testing.assert_array_equal(host(loaded.forward(ids[None, :16])[0]), host(qmodel.forward(ids[None, :16])[0]))


def test_text_helpers():
    tok = CharTokenizer("abc\n")
    with pytest.raises(ValueError, match=r"'x'.*--unknown-chars drop"):
        encode_for(tok, "abxc")
    ids, text, dropped = encode_for(tok, "abxcxx", unknown="drop")
    assert text == "abc" and dropped == 3 and ids.tolist() == tok.encode("abc")
    lines = "".join(f"line {i}\n" for i in range(20))
    train, val = split_text(lines, 0.1, "lines")
    assert val == "line 9\nline 19\n" and len(train.splitlines()) == 18
    assert split_text("abcdefghij", 0.2, "tail") == ("abcdefgh", "ij")


def test_commands(tmp_path, capsys):
    from npflux.cli import main

    base_dir, tok = make_base(tmp_path)
    data = tmp_path / "new.txt"
    data.write_text(TEXT)
    main(["quantize", str(base_dir), "--data", str(data), "--json", str(tmp_path / "q.json")])
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["size_mb_int8"] < result["size_mb_float"] and "val_loss_increase" in result
    assert (tmp_path / "base-int8" / "meta.json").is_file()
    val = tmp_path / "val.txt"
    val.write_text(split_text(TEXT, 0.1, "tail")[1])  # what quantize scored: the last tenth
    capsys.readouterr()
    main(["eval", "--checkpoint", str(tmp_path / "base-int8"), "--text", str(val)])
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result["val_loss_int8"], abs=1e-5)
    before = (base_dir / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main(["quantize", str(base_dir), "--out", str(base_dir)])
    assert "replace it" in capsys.readouterr().err and (base_dir / "model.safetensors").read_bytes() == before
    main(["finetune", "--checkpoint", str(base_dir), "--data", str(data), "--lora-rank", "2", "--max-iters", "5",
          "--targets", "attn.c_attn[q,v],mlp.c_fc", "--out-dir", str(tmp_path / "ft"), "--quiet", "--sample-tokens", "10"])
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert summary["history"][-1]["step"] == 5 and summary["trainable_fraction"] < 0.2
    assert summary["config"]["targets"] == ["attn.c_attn[q,v]", "mlp.c_fc"]
    main(["sample", "--checkpoint", str(tmp_path / "ft" / "adapter"), "--prompt", "the", "--max-new-tokens", "5",
          "--seed", "0"])
    bad = tmp_path / "bad.txt"
    bad.write_text("the cat 42\n" * 50)
    with pytest.raises(SystemExit):
        main(["finetune", "--checkpoint", str(base_dir), "--data", str(bad), "--out-dir", str(tmp_path / "x"), "--quiet"])
    assert "--unknown-chars drop" in capsys.readouterr().err


def test_merge_lora_is_all_or_none():
    """A model with float and int8 bases: merge_lora refuses before merging any layer (no half-merged model)."""
    model = GPT(tiny_config(), seed=0, dtype="float64")
    quantize_model(model, targets=("transformer.h.1.attn.c_attn",))
    apply_lora(model, "attn.c_attn", rank=2)
    for v in lora_parameters(model).values():
        v[...] = 0.1
    w0 = model.transformer.h.items[0].attn.c_attn.base.buffers["weight"].copy()
    with pytest.raises(TypeError, match="int8"):
        merge_lora(model)
    assert not any(block.attn.c_attn.merged for block in model.transformer.h.items)
    np.testing.assert_array_equal(host(model.transformer.h.items[0].attn.c_attn.base.buffers["weight"]), host(w0))


def test_quantize_a_fine_tuned_model(tmp_path):
    """merge_lora then quantize_model: the adapted layers become int8 copies of the MERGED weight (none is
    skipped or left float), and the checkpoint loads; unmerged adapters are refused, not silently dropped."""
    cfg = tiny_config()
    model = GPT(cfg, seed=0)
    apply_lora(model, "attn.c_attn", rank=2)
    for v in lora_parameters(model).values():
        v[...] = 0.2
    with pytest.raises(ValueError, match="merge_lora"):
        quantize_model(model)
    idx, _ = batch()
    merged_logits = model.forward(idx)[0]
    merge_lora(model)
    merged_weight = model.transformer.h.items[0].attn.c_attn.base.buffers["weight"].copy()
    paths = quantize_model(model)
    assert len(paths) == 8 and not lora_parameters(model)
    layer = model.transformer.h.items[0].attn.c_attn
    assert isinstance(layer, QuantizedLinear)
    q, scale = quantize_int8(merged_weight)
    np.testing.assert_array_equal(host(layer.buffers["weight_int8"]), host(q))
    assert rel(model.forward(idx)[0], merged_logits) < 0.05
    save_quantized(tmp_path / "q", model, {"model": cfg.to_dict(), "train": {"dtype": "float32"}})
    loaded, _, _ = model_from_checkpoint(tmp_path / "q")
    np.testing.assert_array_equal(host(loaded.forward(idx)[0]), host(model.forward(idx)[0]))

    qlora = GPT(cfg, seed=0)
    quantize_model(qlora)
    apply_lora(qlora, "attn.c_attn", rank=2)
    with pytest.raises(ValueError, match="save_adapter"):
        save_quantized(tmp_path / "q2", qlora, {"model": cfg.to_dict()})
    assert not (tmp_path / "q2").exists()


def test_bpe_base_finetune_and_quantize_pack_documents_as_training_did(tmp_path, capsys):
    """A BPE model trained on [BOS] doc [EOS] documents (doc_sep "\\n"): finetune and quantize score and train
    on the text packed the same way, and `npflux eval` of the adapter splits documents as the base's does."""
    from npflux.cli import main
    from npflux.tokenizers import BPETokenizer

    tok = BPETokenizer.train([TEXT], vocab_size=300)
    cfg = tiny_config(vocab_size=tok.vocab_size, n_embd=16, block_size=16)
    save_checkpoint(tmp_path / "base", GPT(cfg, seed=0).state_dict(),
                    {"model": cfg.to_dict(), "train": {"dtype": "float32", "doc_sep": "\n"}}, tokenizer=tok)
    data, val = tmp_path / "new.txt", tmp_path / "val.txt"
    data.write_text(TEXT)
    val.write_text(split_text(TEXT, 0.1, "tail")[1])

    def evaluate(ckpt, text):
        capsys.readouterr()
        main(["eval", "--checkpoint", str(ckpt), "--text", str(text)])
        return json.loads(capsys.readouterr().out)

    main(["finetune", "--checkpoint", str(tmp_path / "base"), "--data", str(data), "--lora-rank", "2", "--max-iters", "3",
          "--out-dir", str(tmp_path / "ft"), "--quiet", "--sample-tokens", "5"])
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    base_val = evaluate(tmp_path / "base", val)
    assert summary["val_loss_before"] == pytest.approx(base_val["loss"], abs=1e-5)
    adapter_val = evaluate(tmp_path / "ft" / "adapter", val)
    assert adapter_val["chars"] == base_val["chars"] and adapter_val["tokens"] == base_val["tokens"]
    assert adapter_val["loss"] == pytest.approx(summary["val_loss_after"], abs=1e-5)

    main(["quantize", str(tmp_path / "base"), "--data", str(data), "--json", str(tmp_path / "q.json")])
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["val_loss_float"] == pytest.approx(base_val["loss"], abs=1e-5)
    assert result["val_loss_int8"] == pytest.approx(evaluate(tmp_path / "base-int8", val)["loss"], abs=1e-5)


def test_save_adapter_checks_its_description(tmp_path):
    """Loading re-applies the saved rank / alpha / targets: a description that differs from the model's adapters
    would load with another scaling (silently) or not at all, so saving refuses it."""
    base_dir, tok = make_base(tmp_path)
    model, _, _ = model_from_checkpoint(base_dir)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(tmp_path / "a", model, base_dir, {"rank": 2, "alpha": 4, "targets": ["attn.c_attn"]})
    apply_lora(model, ["attn.c_attn[q,v]"], rank=2, alpha=4)
    for bad in ({"rank": 2, "alpha": 8, "targets": ["attn.c_attn[q,v]"]},
                {"rank": 4, "alpha": 4, "targets": ["attn.c_attn[q,v]"]}):
        with pytest.raises(ValueError, match="description says"):
            save_adapter(tmp_path / "a", model, base_dir, bad)
    with pytest.raises(ValueError, match="do not give"):
        save_adapter(tmp_path / "a", model, base_dir, {"rank": 2, "alpha": 4, "targets": ["attn.c_attn"]})
    other_dir, _ = make_base(tmp_path / "other", n_embd=8)
    with pytest.raises(ValueError, match="different model"):
        save_adapter(tmp_path / "a", model, other_dir, {"rank": 2, "alpha": 4, "targets": ["attn.c_attn[q,v]"]})
    assert not (tmp_path / "a").exists()
    save_adapter(tmp_path / "a", model, base_dir, {"rank": 2, "alpha": 4, "targets": ["attn.c_attn[q,v]"]})
    assert model_from_checkpoint(tmp_path / "a")[0].transformer.h.items[0].attn.c_attn.scaling == 2.0
    with pytest.raises(ValueError, match="alpha must be positive"):
        apply_lora(GPT(tiny_config(), seed=0), "attn.c_attn", rank=2, alpha=0)

"""The GPT model against a PyTorch reference, numerical gradients, presets, loading and generation.

The reference below is a plain pre-LN GPT in PyTorch (fused c_attn, causal
scaled_dot_product_attention, GELU-tanh or ReLU MLP, tied or untied lm_head
with an optional bias) whose parameters are copied from an npflux model.
Every comparison is norm-wise relative error (``rel``), in float64 unless
said otherwise. Parameters are randomised before each comparison: the
initial zero biases and unit LayerNorm gains would hide bugs.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import npflux
from npflux import GPT, GPTConfig
from npflux.models.gpt import PRESETS, load_gpt2_safetensors
from npflux.optim import AdamW

from conftest import dev, host

torch = pytest.importorskip("torch")
F = torch.nn.functional

try:  # the library's checker when the tree has it, else a small directional check below
    from npflux.gradcheck import directional_error, numerical_gradient
except ImportError:  # pragma: no cover - depends on the tree
    directional_error = numerical_gradient = None

V, T, C, L = 23, 8, 12, 2

GPT2_LAYOUT = dict(vocab_size=V, block_size=T, n_layer=L, n_head=3, n_embd=C)
CHAR_LAYOUT = dict(vocab_size=V, block_size=T, n_layer=L, n_head=2, n_embd=C,
                   activation="relu", qkv_bias=False, tie_weights=False, lm_head_bias=True)
LAYOUTS = pytest.mark.parametrize("layout", [GPT2_LAYOUT, CHAR_LAYOUT], ids=["gpt2", "char"])


def rel(a, b):
    a = np.asarray(host(a), dtype=np.float64)
    b = np.asarray(host(b), dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def randomize(model, seed=0, scale=0.3):
    """O(1)-ish random values for every parameter (LayerNorm gains around 1)."""
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p[...] = dev(1.0 + 0.2 * rng.standard_normal(p.shape), like=p)
        else:
            p[...] = dev(scale * rng.standard_normal(p.shape), like=p)
    return model


def make_model(layout, dtype="float64", seed=0, **overrides):
    return randomize(GPT(GPTConfig(**{**layout, **overrides}), seed=seed, dtype=dtype), seed=seed + 10)


def batch(seed=0, B=3, n=T):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(B, n)), rng.integers(0, V, size=(B, n))


# ---------------------------------------------------------------------------
# the PyTorch reference
# ---------------------------------------------------------------------------
# The one PyTorch reference GPT, shared with the benchmarks: benchmarks/torch_models.py's
# modern style (fused q/k/v, scaled_dot_product_attention), with npflux's weights copied in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_models  # noqa: E402


def _is_linear_weight(name):
    return torch_models.is_linear_weight(name)


def torch_params(tmodel):
    """npflux name -> torch Parameter (the tied lm_head appears once, as wte)."""
    return torch_models.npflux_named_parameters(tmodel)


def to_torch(v, name):
    a = np.asarray(host(v))
    return torch.from_numpy(np.ascontiguousarray(a.T if _is_linear_weight(name) else a))


def from_torch(t, name):
    a = t.detach().numpy()
    return a.T if _is_linear_weight(name) else a


def torch_reference(model, dtype=torch.float64):
    tmodel = torch_models.build(model.config, "modern", model, dtype=dtype)
    assert set(torch_params(tmodel)) == set(model.params), set(torch_params(tmodel)) ^ set(model.params)
    return tmodel


# ---------------------------------------------------------------------------
# 1. logits, loss and every gradient against PyTorch
# ---------------------------------------------------------------------------
@LAYOUTS
def test_forward_backward_match_torch_float64(layout):
    model = make_model(layout)
    tmodel = torch_reference(model)
    idx, targets = batch(1)
    targets[0, 3] = -100  # an ignored position: both average over the others
    logits, loss = model.forward(idx, targets)
    model.backward()
    tlogits, tloss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    assert rel(logits, tlogits.detach().numpy()) <= 1e-12
    assert abs(float(loss) - tloss.item()) <= 1e-12 * abs(tloss.item())
    tp = torch_params(tmodel)
    grads = model.grads
    assert set(grads) == set(tp)
    for name, g in grads.items():
        assert np.abs(host(g)).sum() > 0, f"{name} has no gradient"
        assert rel(g, from_torch(tp[name].grad, name)) <= 1e-8, name


@LAYOUTS
def test_forward_backward_match_torch_float32(layout):
    model64 = make_model(layout)
    model = GPT(model64.config, dtype="float32")
    model.load_state_dict(model64.state_dict())
    assert all(p.dtype == np.float32 for p in model.params.values())
    tmodel = torch_reference(model64)  # the float64 truth
    idx, targets = batch(2)
    logits, loss = model.forward(idx, targets)
    model.backward()
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    tlogits, tloss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    assert rel(logits, tlogits.detach().numpy()) <= 1e-5
    assert abs(float(loss) - tloss.item()) <= 1e-5 * abs(tloss.item())
    tp = torch_params(tmodel)
    for name, g in model.grads.items():
        assert g.dtype == np.float32, name
        assert rel(g, from_torch(tp[name].grad, name)) <= 1e-5, name


# ---------------------------------------------------------------------------
# 2. AdamW steps against torch.optim.AdamW
# ---------------------------------------------------------------------------
@LAYOUTS
@pytest.mark.parametrize("weight_decay", [0.01, 0.1])
def test_adamw_steps_match_torch(layout, weight_decay):
    model = make_model(layout)
    tmodel = torch_reference(model)
    hp = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt = AdamW(model.params, **hp)
    topt = torch.optim.AdamW(tmodel.parameters(), **hp)
    for step in range(5):
        idx, targets = batch(100 + step)
        model.zero_grad()
        _, loss = model.forward(idx, targets)
        model.backward()
        opt.step(model.grads)
        topt.zero_grad()
        _, tloss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
        tloss.backward()
        topt.step()
        assert abs(float(loss) - tloss.item()) <= 1e-10 * abs(tloss.item()), step
    tp = torch_params(tmodel)
    for name, p in model.params.items():
        p = host(p)
        ref = from_torch(tp[name], name)
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds the same q.b_k to every score of a row, which the
            # softmax ignores: its true gradient is 0 and both sides hold rounding
            # noise (~1e-17) that Adam scales up to steps of ~lr * g / eps. Compared
            # loosely; the query and value biases tightly.
            (pq, pk, pv), (rq, rk, rv) = np.split(p, 3), np.split(ref, 3)
            assert rel(pk, rk) <= 1e-8, name
            p, ref = np.concatenate([pq, pv]), np.concatenate([rq, rv])
        assert rel(p, ref) <= 1e-10, name


# ---------------------------------------------------------------------------
# 3. gradient accumulation
# ---------------------------------------------------------------------------
@LAYOUTS
def test_gradient_accumulation_equals_full_batch(layout):
    model = make_model(layout)
    idx, targets = batch(3, B=4)
    _, full_loss = model.forward(idx, targets)
    model.backward()
    full = {k: g.copy() for k, g in model.grads.items()}
    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())
    losses = []
    for half in (slice(0, 2), slice(2, 4)):
        _, loss = model.forward(idx[half], targets[half])
        model.backward(loss_scale=0.5)
        losses.append(float(loss))
    assert abs(np.mean(losses) - float(full_loss)) <= 1e-13
    for name, g in model.grads.items():
        assert rel(g, full[name]) <= 1e-12, name


def test_backward_without_targets_raises():
    model = make_model(GPT2_LAYOUT)
    model.forward(batch(0)[0])
    with pytest.raises(RuntimeError):
        model.backward()


# ---------------------------------------------------------------------------
# 4. whole-model numerical gradients
# ---------------------------------------------------------------------------
def _directional(f, x, grad, eps=1e-6, num_directions=3, seed=0):
    """|<grad, u> - (f(x + eps u) - f(x - eps u)) / 2 eps| / max(||grad||, |numerical|), worst over u."""
    if directional_error is not None:
        return directional_error(f, x, grad, dev(np.asarray(1.0), like=x), eps=eps, num_directions=num_directions,
                                 seed=seed)
    rng, x0, worst = np.random.default_rng(seed), x.copy(), 0.0  # pragma: no cover
    for _ in range(num_directions):  # pragma: no cover
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u)
        x[...] = x0 + eps * u
        plus = float(f())
        x[...] = x0 - eps * u
        minus = float(f())
        x[...] = x0
        num = (plus - minus) / (2 * eps)
        worst = max(worst, abs(float((grad * u).sum()) - num) / max(np.linalg.norm(grad), abs(num)))
    return worst


@LAYOUTS
def test_numerical_gradients_whole_model(layout):
    model = make_model(layout, seed=5)
    idx, targets = batch(5, B=2)
    model.forward(idx, targets)
    model.backward()
    grads = {k: g.copy() for k, g in model.grads.items()}
    params = model.params

    def loss():
        return model.forward(idx, targets)[1]

    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
             "transformer.h.0.ln_1.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.bias",
             "transformer.ln_f.bias"]
    if "lm_head.weight" in params:
        names += ["lm_head.weight", "lm_head.bias"]
    for i, name in enumerate(names):
        err = _directional(loss, params[name], grads[name], seed=i)
        assert err <= 1e-7, (name, err)
    if numerical_gradient is not None:  # one small parameter element by element
        name = "transformer.ln_f.bias"
        num = numerical_gradient(loss, params[name], dev(np.asarray(1.0), like=params[name]))
        assert rel(num, grads[name]) <= 1e-7


# ---------------------------------------------------------------------------
# 5. presets and names
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, count", [("shakespeare-s1", 209_729), ("shakespeare-s2", 2_697_281),
                                         ("shakespeare-n", 10_788_929)])
def test_preset_parameter_counts(name, count):
    model = GPT(GPTConfig.from_preset(name))
    assert model.num_parameters() == count
    assert "lm_head.weight" in model.params and "lm_head.bias" in model.params
    assert "transformer.h.0.attn.c_attn.bias" not in model.params


def test_preset_size_and_errors():
    model = GPT(GPTConfig.from_preset("shakespeare-s1"))
    assert model.size_mb() == pytest.approx(209_729 * 4 / 1e6)
    assert abs(model.size_mb() - 0.84) < 0.005
    assert GPT(GPTConfig.from_preset("shakespeare-s1"), dtype="float64").size_mb() == pytest.approx(2 * 0.838916)
    assert GPTConfig.from_preset("shakespeare-s1", dropout=0.1).dropout == 0.1
    with pytest.raises(KeyError):
        GPTConfig.from_preset("no-such-preset")
    assert set(PRESETS) >= {"shakespeare-s1", "shakespeare-s2", "shakespeare-n"}


def hf_names(n_layer, tied=True):
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        names += [h + s for s in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                                  "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return names if tied else names + ["lm_head.weight"]


def test_parameter_names_and_shapes_are_gpt2s():
    model = GPT(GPTConfig(**GPT2_LAYOUT))
    assert list(model.params) == hf_names(L)
    assert list(model.grads) == hf_names(L)
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes["transformer.wte.weight"] == (V, C) and shapes["transformer.wpe.weight"] == (T, C)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (C, 3 * C)
    assert shapes["transformer.h.0.attn.c_attn.bias"] == (3 * C,)
    assert shapes["transformer.h.1.mlp.c_fc.weight"] == (C, 4 * C)
    assert shapes["transformer.h.1.mlp.c_proj.weight"] == (4 * C, C)
    untied = GPT(GPTConfig(**GPT2_LAYOUT, tie_weights=False))
    assert list(untied.params) == hf_names(L, tied=False)
    assert untied.params["lm_head.weight"].shape == (V, C)
    assert model.num_parameters() + V * C == untied.num_parameters()


# ---------------------------------------------------------------------------
# 6. loading GPT-2 checkpoints in the Hugging Face layout
# ---------------------------------------------------------------------------
def hf_style_state(model, prefix=True, with_head=True, buffers=True):
    """The model's weights as Hugging Face stores GPT-2: optional prefix, mask buffers, tied lm_head."""
    c = model.config
    state = {}
    for name, p in model.params.items():
        state[name if prefix else name.replace("transformer.", "", 1)] = np.array(host(p))
    if buffers:
        for i in range(c.n_layer):
            h = ("transformer." if prefix else "") + f"h.{i}.attn."
            state[h + "bias"] = np.tril(np.ones((1, 1, c.block_size, c.block_size), dtype=bool))
            state[h + "masked_bias"] = np.asarray(-1e4, dtype=np.float32)
    if with_head and c.tie_weights:
        state["lm_head.weight"] = np.array(host(model.params["transformer.wte.weight"]))
    return state


def test_hf_transformers_gpt2_logits_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=12, n_layer=2, n_head=3, n_positions=16, vocab_size=31,
                                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = hf.state_dict()
    assert "lm_head.weight" in state
    model = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=3, n_embd=12), dtype="float64")
    model.load_state_dict(state)
    idx = np.random.default_rng(0).integers(0, 31, size=(2, 16))
    logits, _ = model.forward(idx)
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    assert rel(logits, ref) <= 1e-10
    # and through the file save_pretrained writes (tied: no lm_head.weight in it)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_gpt2_safetensors(tmp_path / "model.safetensors", n_head=3, dtype="float64")
    assert loaded.config.vocab_size == 31 and loaded.config.block_size == 16 and loaded.config.n_layer == 2
    assert rel(loaded.forward(idx)[0], ref) <= 1e-10


@pytest.mark.parametrize("prefix", [True, False])
def test_load_hf_layout_torch_tensors(prefix):
    src = make_model(GPT2_LAYOUT)
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf_style_state(src, prefix=prefix).items()}
    model = GPT(src.config, seed=1, dtype="float64")
    model.load_state_dict(state)
    for name, p in src.params.items():
        assert np.array_equal(host(model.params[name]), host(p)), name
    idx = batch(0)[0]
    assert np.array_equal(host(model.forward(idx)[0]), host(src.forward(idx)[0]))


@pytest.mark.parametrize("with_head", [True, False])
def test_load_gpt2_safetensors_without_prefix(tmp_path, with_head):
    from safetensors.numpy import save_file

    src = make_model(GPT2_LAYOUT)
    path = tmp_path / "model.safetensors"
    save_file(hf_style_state(src, prefix=False, with_head=with_head), str(path))
    model = load_gpt2_safetensors(path, n_head=3, dtype="float64")
    assert isinstance(model, GPT)
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (V, T, L, 3, C)
    assert c.tie_weights and c.activation == "gelu" and c.qkv_bias and c.bias and not c.lm_head_bias
    for name, p in src.params.items():
        assert np.array_equal(host(model.params[name]), host(p)), name
    idx = batch(0)[0]
    assert rel(model.forward(idx)[0], src.forward(idx)[0]) == 0.0
    assert npflux.load_gpt2_safetensors is load_gpt2_safetensors
    # the default head count is GPT-2's head width of 64: 12 // 64 == 0 heads is clamped to 1
    assert load_gpt2_safetensors(path).config.n_head == 1
    # an explicit config wins over the inference
    given = GPTConfig(**GPT2_LAYOUT)
    assert load_gpt2_safetensors(path, config=given).config is given


def test_load_gpt2_safetensors_errors(tmp_path):
    from safetensors.numpy import save_file

    src = make_model(GPT2_LAYOUT)
    state = hf_style_state(src, prefix=False)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0  # not the embedding
    save_file(state, str(tmp_path / "bad_head.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_gpt2_safetensors(tmp_path / "bad_head.safetensors", n_head=3)

    state = hf_style_state(src, prefix=False)
    state["h.1.mlp.c_fc.weight"] = np.zeros((C, 3 * C))
    save_file(state, str(tmp_path / "bad_shape.safetensors"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*\(12, 36\)"):
        load_gpt2_safetensors(tmp_path / "bad_shape.safetensors", n_head=3)

    state = hf_style_state(src, prefix=False)
    del state["wpe.weight"]
    save_file(state, str(tmp_path / "no_wpe.safetensors"))
    with pytest.raises(ValueError, match="wpe"):
        load_gpt2_safetensors(tmp_path / "no_wpe.safetensors", n_head=3)

    with pytest.raises(ValueError, match="divisible"):  # 12 is not divisible by 5 heads
        load_gpt2_safetensors(tmp_path / "bad_head.safetensors", n_head=5)


def test_load_state_dict_errors():
    src = make_model(GPT2_LAYOUT)
    model = GPT(src.config, dtype="float64")
    bad = hf_style_state(src)
    bad["lm_head.weight"] = bad["lm_head.weight"] * 2
    with pytest.raises(ValueError, match="lm_head.weight"):
        model.load_state_dict(bad)
    bad = hf_style_state(src)
    bad["transformer.wpe.weight"] = np.zeros((T + 1, C))
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight"):
        model.load_state_dict(bad)
    for missing in ("transformer.ln_f.bias", "transformer.wte.weight"):
        bad = hf_style_state(src)
        del bad[missing]
        with pytest.raises(KeyError, match=missing):
            model.load_state_dict(bad)


# ---------------------------------------------------------------------------
# 7. generation
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_model():
    return make_model(GPT2_LAYOUT, seed=7)


PROMPT = np.array([[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=1.0, seed=3),
                                    dict(temperature=0.8, top_k=5, seed=4), dict(temperature=1.3, top_p=0.7, seed=5),
                                    dict(temperature=1.0, top_k=7, top_p=0.9, seed=6)],
                         ids=["greedy", "sample", "top_k", "top_p", "top_k+top_p"])
def test_cached_equals_uncached_past_block_size(gen_model, kwargs):
    # The cached and the recomputed logits sum in different orders (one new row against the whole
    # window), so they agree to about 1e-15 relative in this float64 model, not to the bit; the tokens
    # are equal unless an argmax near-tie or a sampling threshold falls within that distance: about
    # 1e-15 per token, far below anything a run of this test can meet.
    n = 2 * T + 3  # well past block_size: the window slides
    cached = host(gen_model.generate(PROMPT, n, **kwargs))
    uncached = host(gen_model.generate(PROMPT, n, use_cache=False, **kwargs))
    assert cached.shape == (2, 3 + n)
    assert np.array_equal(cached[:, :3], PROMPT)
    assert np.array_equal(cached, uncached)
    assert cached.min() >= 0 and cached.max() < V


def test_prompt_longer_than_block_size(gen_model):
    prompt = np.random.default_rng(0).integers(0, V, size=(1, T + 4))
    a = host(gen_model.generate(prompt, 5, temperature=0))
    b = host(gen_model.generate(prompt, 5, temperature=0, use_cache=False))
    assert np.array_equal(a, b) and a.shape == (1, T + 9)


def test_greedy_is_argmax_of_uncached_logits(gen_model):
    out = host(gen_model.generate(PROMPT, T + 4, temperature=0))
    for t in range(PROMPT.shape[1], out.shape[1]):
        logits, _ = gen_model.forward(out[:, :t][:, -T:])
        assert np.array_equal(out[:, t], host(logits[:, -1].argmax(axis=-1))), t


def test_top_k_1_is_greedy_and_seeds_reproduce(gen_model):
    greedy = host(gen_model.generate(PROMPT, 10, temperature=0))
    assert np.array_equal(host(gen_model.generate(PROMPT, 10, temperature=1.5, top_k=1, seed=0)), greedy)
    a = host(gen_model.generate(PROMPT, 10, seed=11))
    b = host(gen_model.generate(PROMPT, 10, seed=11))
    c = host(gen_model.generate(PROMPT, 10, seed=12))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(host(gen_model.generate(PROMPT, 0)), PROMPT)


def test_generate_stops_when_every_row_reached_eos(gen_model):
    one = PROMPT[:1]
    full = host(gen_model.generate(one, 12, seed=3))
    P = one.shape[1]
    eos = int(full[0, P + 4])  # make the 5th sampled token the end mark
    first = P + int(np.flatnonzero(full[0, P:] == eos)[0])
    out = host(gen_model.generate(one, 12, seed=3, eos_id=eos))
    assert np.array_equal(out, full[:, : first + 1])  # the same tokens, up to and with the first [EOS]
    never = next(v for v in range(gen_model.config.vocab_size) if v not in full[0, P:])
    assert np.array_equal(host(gen_model.generate(one, 12, seed=3, eos_id=never)), full)
    # two rows: a row that ended runs on until the other ends too
    both = host(gen_model.generate(PROMPT, 12, seed=3))
    only_first = next(v for v in both[0, P:].tolist() if v not in both[1, P:].tolist())
    assert np.array_equal(host(gen_model.generate(PROMPT, 12, seed=3, eos_id=only_first)), both)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_p=0.0), dict(top_k=0), dict(top_p=1.5),
                                    dict(max_new_tokens=-1)])
def test_generate_bad_arguments(gen_model, kwargs):
    with pytest.raises(ValueError):
        gen_model.generate(PROMPT, **{"max_new_tokens": 3, **kwargs})
    # rejected even where they would go unused: greedy decoding, or no new tokens
    with pytest.raises(ValueError):
        gen_model.generate(PROMPT, **{"max_new_tokens": 3, "temperature": 0, **kwargs})
    with pytest.raises(ValueError):
        gen_model.generate(PROMPT, **{"max_new_tokens": 0, **kwargs})


def test_generate_bad_ids(gen_model):
    with pytest.raises(ValueError):
        gen_model.generate(np.array([[1, V]]), 2)
    with pytest.raises(ValueError):
        gen_model.generate(np.array([[-1, 2]]), 2)
    with pytest.raises(TypeError):
        gen_model.generate(np.array([[1.0, 2.0]]), 2)
    with pytest.raises(ValueError):
        gen_model.generate(np.zeros((1, 0), dtype=np.int64), 2)


def test_dropout_only_in_train_mode():
    model = make_model(GPT2_LAYOUT, dropout=0.3)
    plain = make_model(GPT2_LAYOUT, dropout=0.0)
    idx = batch(0)[0]
    model.train()
    a, b = host(model.forward(idx)[0]), host(model.forward(idx)[0])
    assert not np.allclose(a, b)
    model.eval()
    c, d = host(model.forward(idx)[0]), host(model.forward(idx)[0])
    assert np.array_equal(c, d)
    assert np.array_equal(c, host(plain.forward(idx)[0]))


def _modes(model):
    out = [model.training]
    stack = [model]
    while stack:
        m = stack.pop()
        for _, child in m.named_children():
            out.append(child.training)
            stack.append(child)
    return set(out)


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_training_mode(training):
    model = make_model(GPT2_LAYOUT, dropout=0.3)
    model.train(training)
    a = host(model.generate(PROMPT, 6, seed=1))
    assert _modes(model) == {training}
    b = host(model.generate(PROMPT, 6, seed=1))
    assert np.array_equal(a, b)  # sampling ran in eval mode: no dropout noise
    model.train(training)
    with pytest.raises(ValueError):
        model.generate(PROMPT, 2, temperature=-1)
    assert _modes(model) == {training}


# ---------------------------------------------------------------------------
# 8. input and config errors
# ---------------------------------------------------------------------------
def test_forward_errors():
    model = make_model(GPT2_LAYOUT)
    with pytest.raises(ValueError, match="block_size"):
        model.forward(np.zeros((1, T + 1), dtype=np.int64))
    with pytest.raises(TypeError):
        model.forward(np.zeros((1, 4), dtype=np.float64))
    with pytest.raises(ValueError):
        model.forward(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError):
        model.forward(np.array([[0, V]]))
    logits, loss = model.forward(np.zeros((2, T), dtype=np.int64))
    assert logits.shape == (2, T, V) and loss is None


@pytest.mark.parametrize("bad", [dict(n_embd=10, n_head=3), dict(n_layer=0), dict(activation="tanh"),
                                 dict(dropout=1.0), dict(init="xavier")])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        GPTConfig(**{**GPT2_LAYOUT, **bad})


def test_config_dict_roundtrip():
    c = GPTConfig(**CHAR_LAYOUT)
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        GPTConfig.from_dict({**c.to_dict(), "nonsense": 1})


def test_torch_default_init_matches_torch_layers():
    """init="torch" draws what nn.Embedding / nn.Linear draw by default (the published small model's init)."""
    torch = pytest.importorskip("torch")
    cfg = GPTConfig.from_preset("shakespeare-s2", init="torch")
    params = GPT(cfg, seed=3).params
    torch.manual_seed(0)
    C = cfg.n_embd
    ref = {"emb": torch.nn.Embedding(cfg.vocab_size, C).weight, "fc": torch.nn.Linear(C, 4 * C).weight,
           "proj": torch.nn.Linear(4 * C, C).weight, "proj_b": torch.nn.Linear(4 * C, C).bias}
    ref = {k: v.detach().double().numpy() for k, v in ref.items()}
    ours = params["transformer.wte.weight"]
    assert abs(ours.std() - 1) < 0.05 and abs(ref["emb"].std() - 1) < 0.05  # N(0, 1) both
    fan_in = {"fc": C, "proj": 4 * C, "proj_b": 4 * C}
    pairs = [("transformer.h.0.mlp.c_fc.weight", "fc"), ("transformer.h.2.mlp.c_proj.weight", "proj"),
             ("transformer.h.2.mlp.c_proj.bias", "proj_b")]
    for name, key in pairs:
        # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) both: the same bound, filled up to it, the same spread
        b = 1 / np.sqrt(fan_in[key])
        for a in (params[name], ref[key]):
            assert np.abs(a).max() <= b and np.abs(a).max() > 0.95 * b, name
            assert abs(a.std() * np.sqrt(3) / b - 1) < 0.1, name
    bound = 1 / np.sqrt(C)
    for name in ("transformer.h.0.attn.c_attn.weight", "lm_head.weight", "lm_head.bias"):
        a = params[name]
        assert a.max() <= bound and a.min() >= -bound and a.max() > 0.95 * bound, name
    assert np.all(params["transformer.h.0.ln_1.weight"] == 1) and np.all(params["transformer.ln_f.bias"] == 0)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg

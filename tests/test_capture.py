"""npflux.capture: what is recorded equals a forward written out by hand; nothing changes when unused."""
import numpy as np
import pytest

from npflux import GPT, GPTConfig
from npflux.capture import capture, capture_points, match_points
from npflux.nn import Module

from conftest import dev, host


def tiny_gpt(activation="relu", dtype="float64", n_layer=2):
    c = GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=8, activation=activation,
                  qkv_bias=False, tie_weights=False, lm_head_bias=True)
    model = GPT(c, seed=3, dtype=dtype)
    rng = np.random.default_rng(0)
    for p in model.params.values():  # O(1) weights: zero biases / unit gains would hide a wrong recording
        p[...] = dev(0.5 * rng.standard_normal(p.shape), like=p)
    return model


def ids(B=2, T=7, seed=1):
    return np.random.default_rng(seed).integers(0, 11, (B, T))


def manual_forward(model, idx):
    """The GPT's forward spelt out module by module, every intermediate kept."""
    from npflux import ops

    t, out = model.transformer, {}
    x = t.drop.forward(t.wpe.forward(t.wte.forward(idx)))
    out["transformer.drop"] = x
    for i, block in enumerate(t.h.items):
        x = x + block.attn.forward(block.ln_1.forward(x))
        out[f"transformer.h.{i}.attn.weights"] = block.attn.weights
        out[f"transformer.h.{i}.resid_mid"] = x
        mlp = block.mlp
        h, _ = mlp.act_forward(mlp.c_fc.forward(block.ln_2.forward(x)))
        out[f"transformer.h.{i}.mlp.hidden"] = h
        x = x + mlp.dropout.forward(mlp.c_proj.forward(h))
        out[f"transformer.h.{i}"] = x
    out["transformer.ln_f"] = t.ln_f.forward(x)
    out["logits"] = ops.linear_forward(out["transformer.ln_f"], model.lm_head.p["weight"].T, model.lm_head.p["bias"])[0]
    return out


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_captured_values_equal_a_manual_forward(activation):
    model = tiny_gpt(activation)
    idx = ids()
    names = ["transformer.drop", "transformer.h.*", "transformer.h.*.attn.weights", "transformer.h.*.resid_mid",
             "transformer.h.*.mlp.hidden", "transformer.ln_f"]
    with capture(model, names) as acts:
        logits, _ = model.forward(idx)
    ref = manual_forward(model, idx)
    assert len(acts) == 2 + 4 * model.config.n_layer
    for name in acts:
        assert acts[name].shape == ref[name].shape, name
        np.testing.assert_allclose(host(acts[name]), host(ref[name]), rtol=1e-13, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(host(logits), host(ref["logits"]), rtol=1e-13, atol=1e-13)
    assert acts["transformer.h.0.attn.weights"].shape == (2, 2, 7, 7)
    np.testing.assert_allclose(host(acts["transformer.h.1.attn.weights"].sum(-1)), 1.0, rtol=1e-12)
    assert acts["transformer.h.1.mlp.hidden"].shape == (2, 7, 32)
    if activation == "relu":  # the ReLU overwrites c_fc's output in place; the capture copied it first
        assert (acts["transformer.h.0.mlp.hidden"] >= 0).all()


def test_capture_copies_what_is_later_overwritten():
    """c_fc's output is overwritten by the ReLU in place: its captured copy keeps the negative values."""
    model = tiny_gpt("relu")
    with capture(model, ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.hidden"]) as acts:
        model.forward(ids())
    pre, post = host(acts["transformer.h.0.mlp.c_fc"]), host(acts["transformer.h.0.mlp.hidden"])
    assert (pre < 0).any()
    np.testing.assert_array_equal(post, np.maximum(pre, 0))


def _no_wrappers(model):
    stack = [model]
    while stack:
        m = stack.pop()
        if "forward" in m.__dict__:
            return False
        stack.extend(c for _, c in m.named_children())
    return True


def test_unused_or_finished_capture_leaves_the_model_bit_identical():
    model = tiny_gpt(dtype="float32")
    idx = ids()
    y = np.random.default_rng(2).integers(0, 11, idx.shape)
    logits0, loss0 = model.forward(idx, y)
    model.backward()
    grads0 = {k: g.copy() for k, g in model.grads.items()}
    model.zero_grad()
    with capture(model, ["transformer.h.*", "transformer.h.*.attn.weights"]) as acts:
        logits1, loss1 = model.forward(idx, y)
        model.backward()  # backward is untouched by the capture
    grads1 = {k: g.copy() for k, g in model.grads.items()}
    assert _no_wrappers(model)
    model.zero_grad()
    logits2, loss2 = model.forward(idx, y)
    np.testing.assert_array_equal(host(logits0), host(logits1))
    np.testing.assert_array_equal(host(logits0), host(logits2))
    assert loss0 == loss1 == loss2
    for k in grads0:
        np.testing.assert_array_equal(host(grads0[k]), host(grads1[k]), err_msg=k)
    assert acts["transformer.h.0"].dtype == np.float32
    # the recorded arrays are copies: a later forward does not change them
    before = acts["transformer.h.1"].copy()
    model.forward(ids(seed=9))
    np.testing.assert_array_equal(host(acts["transformer.h.1"]), host(before))


def test_capture_is_removed_after_an_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        with capture(model, ["transformer.h.*"]):
            model.forward(np.zeros((1, 20), dtype=np.int64))
    assert _no_wrappers(model)


def test_names_match_segment_by_segment():
    model = tiny_gpt(n_layer=3)
    assert match_points(model, ["transformer.h.*"]) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert match_points(model, "transformer.h.[02].attn.weights") == ["transformer.h.0.attn.weights",
                                                                     "transformer.h.2.attn.weights"]
    # duplicates collapse; order is the model's, not the patterns'
    assert match_points(model, ["transformer.ln_f", "transformer.h.1", "transformer.h.*"])[-1] == "transformer.ln_f"
    points = capture_points(model)
    for name in points:  # every point's module is reachable under its dotted prefix in params' naming
        assert name.startswith("transformer.")
    assert any(k.startswith("transformer.h.2.attn.c_attn.") for k in model.params)


def test_bad_name_lists_the_valid_ones():
    model = tiny_gpt(n_layer=3)
    with pytest.raises(KeyError) as info:
        with capture(model, ["blocks.0.out"]):
            pass
    msg = info.value.args[0]
    assert "'blocks.0.out' matches no capture point" in msg
    for valid in ("transformer.h.{0..2}", "transformer.h.{0..2}.attn.weights", "transformer.h.{0..2}.mlp.hidden",
                  "transformer.h.{0..2}.resid_mid", "transformer.ln_f"):
        assert "\n  " + valid + "\n" in msg + "\n", valid


def test_several_forwards_are_all_kept_and_pop_frees_them():
    model = tiny_gpt()
    with capture(model, ["transformer.h.1"]) as acts:
        assert "transformer.h.1" in acts
        with pytest.raises(KeyError, match="has not run"):
            acts["transformer.h.1"]
        for s in range(3):
            model.forward(ids(B=1, T=3 + s, seed=s))
        assert [a.shape[1] for a in acts.all("transformer.h.1")] == [3, 4, 5]
        assert acts["transformer.h.1"].shape == (1, 5, 8)
        assert len(acts.pop("transformer.h.1")) == 3 and acts.all("transformer.h.1") == []
        with pytest.raises(KeyError, match="was not captured"):
            acts["transformer.h.0"]


def test_kv_cache_decoding_records_one_step_at_a_time():
    model = tiny_gpt()
    with capture(model, ["transformer.h.0.attn.weights"]) as acts:
        model.generate(ids(B=1, T=3), 2, temperature=0, use_cache=True)
    shapes = [a.shape for a in acts.all("transformer.h.0.attn.weights")]
    assert shapes == [(1, 2, 3, 3), (1, 2, 1, 4)]


def test_nested_capture_of_one_module_is_refused():
    model = tiny_gpt()
    with capture(model, ["transformer.h.0"]):
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture(model, ["transformer.h.0"]):
                pass
    assert _no_wrappers(model)


def test_any_module_tree_works():
    from npflux.nn import Linear

    root = Module()
    root.first = Linear(3, 4, dtype="float64")
    x = dev(np.ones((2, 3)), like=root.first)
    with capture(root, ["first"]) as acts:
        y = root.first.forward(x)
    np.testing.assert_array_equal(host(acts["first"]), host(y))

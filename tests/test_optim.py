"""npflux.optim against torch.optim, step by step."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npflux import optim  # noqa: E402
from npflux.backend import cupy_available  # noqa: E402

from conftest import dev, host  # noqa: E402

SHAPES = {"w1": (5, 4), "b1": (4,), "emb": (7, 3), "ln.weight": (3,)}


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def make_grads(steps, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    return [{n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()} for _ in range(steps)]


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def run_torch(opt_factory, params, grad_seq, grouped=False, lrs=None):
    """Run a torch optimizer over the same gradients; return final params."""
    tp = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    opt = opt_factory(tp, grouped)
    for i, grads in enumerate(grad_seq):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        for n, t in tp.items():
            t.grad = torch.tensor(grads[n])
        opt.step()
    return {n: t.detach().numpy() for n, t in tp.items()}


def torch_groups(tp, grouped, wd):
    if not grouped:
        return [{"params": list(tp.values()), "weight_decay": wd}]
    decay = [t for t in tp.values() if t.ndim >= 2]
    no_decay = [t for t in tp.values() if t.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


@pytest.mark.parametrize("wd,grouped", [(0.0, False), (0.1, False), (0.1, True)])
def test_adamw_matches_torch_float64(wd, grouped):
    params = make_params()
    grad_seq = make_grads(10)
    lrs = [1e-2 * (1 + 0.3 * math.sin(i)) for i in range(10)]  # a schedule changing lr
    ref = run_torch(
        lambda tp, g: torch.optim.AdamW(torch_groups(tp, g, wd), lr=1e-2, betas=(0.8, 0.95), eps=1e-6),
        params, grad_seq, grouped, lrs)
    ours = {n: p.copy() for n, p in params.items()}
    ids = {n: id(p) for n, p in ours.items()}
    opt = optim.AdamW(ours, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd,
                      decay_filter=optim.nanogpt_decay if grouped else None)
    for i, grads in enumerate(grad_seq):
        opt.lr = lrs[i]
        opt.step(grads)
    for n in SHAPES:
        assert id(ours[n]) == ids[n], "update must be in place"
        assert rel_err(ours[n], ref[n]) < 1e-12, n
        assert not np.allclose(ours[n], params[n]), "parameters should have moved"


def test_adamw_grouping_changes_result():
    """The filter really keeps decay off vectors: grouped != ungrouped for vectors."""
    grad_seq = make_grads(3)
    a, b = make_params(), make_params()
    oa = optim.AdamW(a, lr=0.1, weight_decay=0.5)
    ob = optim.AdamW(b, lr=0.1, weight_decay=0.5, decay_filter=optim.nanogpt_decay)
    for g in grad_seq:
        oa.step(g)
        ob.step(g)
    assert np.array_equal(a["w1"], b["w1"])
    assert not np.array_equal(a["b1"], b["b1"])
    assert ob.decayed == {"w1": True, "b1": False, "emb": True, "ln.weight": False}


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=0.05),
    dict(momentum=0.9, weight_decay=0.05, nesterov=True),
    dict(momentum=0.5, weight_decay=0.01, dampening=0.3),
])
@pytest.mark.parametrize("grouped", [False, True])
def test_sgd_matches_torch_float64(kwargs, grouped):
    params = make_params()
    grad_seq = make_grads(10)
    wd = kwargs.get("weight_decay", 0.0)
    other = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    ref = run_torch(lambda tp, g: torch.optim.SGD(torch_groups(tp, g, wd), lr=0.05, **other),
                    params, grad_seq, grouped)
    ours = {n: p.copy() for n, p in params.items()}
    opt = optim.SGD(ours, lr=0.05, decay_filter=optim.nanogpt_decay if grouped else None, **kwargs)
    grads_before = [{n: g.copy() for n, g in gs.items()} for gs in grad_seq]
    for grads in grad_seq:
        opt.step(grads)
    for n in SHAPES:
        assert rel_err(ours[n], ref[n]) < 1e-12, n
    for gs, gb in zip(grad_seq, grads_before):
        for n in SHAPES:
            assert np.array_equal(gs[n], gb[n]), "SGD must not modify the gradients"


@pytest.mark.parametrize("make", [
    lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
])
def test_float32_stays_float32(make):
    params = make_params(np.float32)
    opt = make(params)
    for grads in make_grads(3, np.float32):
        opt.step(grads)
    for n, p in params.items():
        assert p.dtype == np.float32, n
    for k, v in opt.state_dict().items():
        if hasattr(v, "dtype"):
            assert v.dtype == np.float32, k


def test_adamw_float32_close_to_torch():
    params = make_params(np.float32)
    grad_seq = make_grads(5, np.float32)
    ref = run_torch(lambda tp, g: torch.optim.AdamW(torch_groups(tp, g, 0.01), lr=1e-2), params, grad_seq)
    opt = optim.AdamW(params, lr=1e-2)
    for g in grad_seq:
        opt.step(g)
    for n in SHAPES:
        np.testing.assert_allclose(params[n], ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_grad_norm_matches_torch(max_norm, dtype):
    grads = make_grads(1, dtype)[0]
    tgrads = [torch.tensor(g.copy()) for g in grads.values()]
    tp = [torch.zeros_like(g, requires_grad=True) for g in tgrads]
    for p, g in zip(tp, tgrads):
        p.grad = g
    ref_norm = float(torch.nn.utils.clip_grad_norm_(tp, max_norm))
    norm = optim.clip_grad_norm(grads, max_norm)
    assert isinstance(norm, float)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(norm - ref_norm) <= tol * ref_norm
    for g, p in zip(grads.values(), tp):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=tol, atol=0)
    new_norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert new_norm <= max_norm * (1 + 1e-6)
    if max_norm < ref_norm:
        assert new_norm < ref_norm


def test_clip_grad_norm_known_value():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert optim.clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [3.0 / (5 + 1e-6), 0.0])
    np.testing.assert_allclose(grads["b"], [[4.0 / (5 + 1e-6)]])


def test_cosine_with_warmup_shape():
    kw = dict(max_lr=1e-3, warmup_steps=100, decay_steps=1100, min_lr=1e-4)
    lr = lambda s: optim.cosine_with_warmup(s, **kw)  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 * 1 / 101)          # warmup start: small, non-zero
    assert lr(99) == pytest.approx(1e-3 * 100 / 101)       # last warmup step
    assert lr(100) == pytest.approx(1e-3)                   # peak
    assert lr(600) == pytest.approx((1e-3 + 1e-4) / 2)      # cosine midpoint
    assert lr(1100) == pytest.approx(1e-4)                  # end of decay
    assert lr(5000) == 1e-4                                 # floor afterwards
    warm = [lr(s) for s in range(100)]
    decay = [lr(s) for s in range(100, 1101)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert optim.constant(123, 3e-4) == 3e-4
    with pytest.raises(ValueError):
        optim.cosine_with_warmup(0, 1e-3, 10, 5, 0.0)


def test_no_warmup():
    assert optim.cosine_with_warmup(0, 1.0, 0, 10, 0.0) == pytest.approx(1.0)
    assert optim.cosine_with_warmup(10, 1.0, 0, 10, 0.0) == pytest.approx(0.0)


@pytest.mark.parametrize("make", [
    lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, decay_filter=optim.nanogpt_decay),
    lambda p: optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
])
def test_state_dict_round_trip_continues_identically(make):
    grad_seq = make_grads(10)
    # uninterrupted run
    full = make_params()
    opt_full = make(full)
    for g in grad_seq:
        opt_full.step(g)
    # interrupted after 4 steps, state split into arrays and scalars (as a checkpoint would)
    part = make_params()
    opt = make(part)
    for g in grad_seq[:4]:
        opt.step(g)
    arrays, scalars = optim.split_state_dict(opt.state_dict())
    import json
    scalars = json.loads(json.dumps(scalars))  # must survive JSON
    assert scalars["step"] == 4
    saved_params = {n: p.copy() for n, p in part.items()}
    for g in grad_seq[4:6]:  # the old optimizer goes on; the snapshot must not follow it
        opt.step(g)
    resumed = saved_params
    opt2 = make(resumed)
    opt2.load_state_dict({**arrays, **scalars})
    for g in grad_seq[4:]:
        opt2.step(g)
    for n in SHAPES:
        assert np.array_equal(resumed[n], full[n]), n


def test_load_state_dict_errors():
    opt = optim.AdamW(make_params(), lr=1e-3)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="SGD"):
        optim.SGD(make_params(), lr=1e-3).load_state_dict(state)
    del state["m.w1"]
    with pytest.raises(KeyError, match="m.w1"):
        optim.AdamW(make_params(), lr=1e-3).load_state_dict(state)


def test_bad_inputs():
    with pytest.raises(TypeError):
        optim.AdamW({"i": np.zeros(3, dtype=np.int64)})
    opt = optim.AdamW(make_params())
    with pytest.raises(KeyError, match="missing"):
        opt.step({"w1": np.zeros((5, 4))})
    bad = make_grads(1)[0]
    bad["w1"] = np.zeros((4, 5))
    with pytest.raises(ValueError, match="shape"):
        opt.step(bad)
    with pytest.raises(ValueError):
        optim.SGD(make_params(), lr=0.1, nesterov=True)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")
def test_adamw_cupy_matches_numpy():
    import cupy

    host = make_params(np.float32)
    dev = {n: cupy.asarray(p) for n, p in host.items()}
    oh, od = optim.AdamW(host, lr=1e-2), optim.AdamW(dev, lr=1e-2)
    for g in make_grads(3, np.float32):
        oh.step(g)
        od.step({n: cupy.asarray(a) for n, a in g.items()})
    for n in SHAPES:
        assert dev[n].dtype == np.float32
        np.testing.assert_allclose(cupy.asnumpy(dev[n]), host[n], rtol=1e-5, atol=1e-6)


def _tiny_model(seed=0):
    from npflux import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, activation="relu",
                    qkv_bias=False, tie_weights=False, lm_head_bias=True)
    return GPT(cfg, seed=seed, dtype="float64")


def test_flatten_parameters_keeps_values_and_shares_one_buffer():
    from npflux.backend import flat_base
    from npflux.nn import Linear, Module

    m = Module(dtype="float64")
    m.a = Linear(3, 4, rng=np.random.default_rng(0), dtype="float64")
    m.b = Linear(4, 2, rng=np.random.default_rng(1), dtype="float64")
    before = {k: v.copy() for k, v in m.params.items()}
    assert flat_base(m.params.values()) is None
    flat_p, flat_g = m.flatten_parameters()
    assert flat_p.size == sum(v.size for v in before.values())
    assert flat_base(m.params.values()) is flat_p and flat_base(m.grads.values()) is flat_g
    for k, v in m.params.items():
        np.testing.assert_array_equal(host(v), host(before[k]))
    m.b.g["weight"] += 1.0
    assert flat_g.sum() == 8.0
    m.zero_grad()
    assert not flat_g.any()
    # a reordered or partial set of views is not "flat"
    assert flat_base(list(m.params.values())[::-1]) is None
    assert flat_base(list(m.params.values())[1:]) is None


def test_flat_base_remembers_only_the_very_arrays_it_saw():
    """flat_base keeps its yes for the same array objects; new arrays, even at a dead one's id, are asked afresh."""
    import gc

    from npflux import backend

    buf = np.zeros(12)
    views = [buf[:4], buf[4:12]]
    assert backend.flat_base(views) is buf
    assert backend.flat_base(views) is buf  # the remembered answer
    assert backend.flat_base(views[::-1]) is None
    for _ in range(200):  # CPython hands a freed object's id to the next: never a stale yes for it
        del views, buf
        gc.collect()
        buf = np.zeros(12)
        views = [buf[:4], buf[5:12]]  # a gap: not a tiling
        assert backend.flat_base(views) is None
        views = [buf[:4], buf[4:12]]
        assert backend.flat_base(views) is buf


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("wd,grouped,clip", [(0.0, False, None), (0.1, True, 0.5), (0.01, False, 10.0)])
def test_flat_adamw_equals_per_parameter_adamw(wd, grouped, clip, threads, monkeypatch):
    """The one-buffer fast path (split over worker threads or not) gives bit-for-bit the per-array update
    (the update is element-wise, so the order of work cannot change a bit; the clipping norm is a sum
    whose order differs, so it is compared within its rounding bound)."""
    from npflux import parallel

    monkeypatch.setattr(parallel, "_NUM_THREADS", threads)
    monkeypatch.setattr(parallel, "_MIN_SPLIT_ELEMENTS", 1)
    flat_model = _tiny_model()
    arrays = {k: v.copy() for k, v in flat_model.params.items()}  # the same values, separate arrays
    grad_arrays = {k: flat_model.xp.zeros_like(v) for k, v in arrays.items()}
    kw = dict(lr=1e-2, weight_decay=wd, decay_filter=optim.nanogpt_decay if grouped else None)
    opt_flat = optim.AdamW(flat_model.params, **kw)
    opt_each = optim.AdamW(arrays, **kw)
    assert opt_flat.flat_params is not None and opt_each.flat_params is None
    assert opt_flat._flat_grads(flat_model.grads) is not None
    r = np.random.default_rng(0)
    for _ in range(4):
        for k, g in flat_model.grads.items():
            g[...] = dev(r.standard_normal(g.shape), like=g)
            grad_arrays[k][...] = g
        if clip:
            # The two norms sum the same squares in a different order (one dot over the
            # buffer vs one per array, each ordered by the BLAS kernel), so they agree to
            # rounding, not to the bit: every term is >= 0, so each computed sum of n
            # squares is within gamma_n = n*u/(1 - n*u) of the exact one (Higham, Accuracy
            # and Stability, 3.1), the two squared norms within 2*gamma_n of each other and
            # the norms (square roots) within about gamma_n.
            n = sum(g.size for g in grad_arrays.values())
            u = np.finfo(np.float64).eps / 2
            norm_flat = optim.clip_grad_norm(flat_model.grads, clip)
            norm_each = optim.clip_grad_norm(grad_arrays, clip)
            assert abs(norm_flat - norm_each) <= 2 * n * u / (1 - n * u) * norm_each
            # The update under test is element-wise, so feed it bit-identical clipped
            # gradients: the per-array copy takes the flat path's clipped values.
            for k, g in flat_model.grads.items():
                grad_arrays[k][...] = g
        opt_flat.step(flat_model.grads)
        opt_each.step(grad_arrays)
    for k, v in flat_model.params.items():
        np.testing.assert_array_equal(host(v), host(arrays[k]))
    s_flat, s_each = opt_flat.state_dict(), opt_each.state_dict()
    assert s_flat.keys() == s_each.keys()
    for k in s_flat:
        np.testing.assert_array_equal(host(s_flat[k]), host(s_each[k]))

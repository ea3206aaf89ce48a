"""Knowledge distillation: the op (gradients, PyTorch, the textbook version), then the training workflow.

The op is checked as every op in tests/test_ops.py: numerical gradients in
float64 over shapes drawn by hypothesis (both logits, every temperature and
mix), and PyTorch's ``F.kl_div`` on log-softmax inputs plus ``F.cross_entropy``
forward and backward in float64 (1e-10) and float32 (1e-5).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux import ops
from npflux.gradcheck import rel_error
from npflux.ops import reference
from npflux.testing import assert_gradients_match, assert_matches_torch, assert_preserves_dtype

seeds = st.integers(0, 2**32 - 1)
leads = st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple)
temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0])
alphas = st.sampled_from([0.0, 0.3, 0.9, 1.0])


def _inputs(r, lead, V, ignore=0.0, scale=1.5, ignore_index=-100):
    targets = r.integers(0, V, lead)
    targets = np.where(r.random(lead) < ignore, ignore_index, targets)
    return {"student_logits": scale * r.standard_normal((*lead, V)),
            "teacher_logits": scale * r.standard_normal((*lead, V)), "targets": targets}


def _torch_distill(torch):
    F = torch.nn.functional

    def fn(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5, ignore_index=-100,
           teacher_grad=False):
        V = student_logits.shape[-1]
        s, t, y = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), targets.reshape(-1)
        keep = y != ignore_index
        s, t, y = s[keep], t[keep], y[keep]
        T = temperature
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)

    return fn


def _float32_rtol(inputs, T, alpha, ignore_index):
    """1e-5, or what float32 can promise for this loss when it is small against the terms it sums.

    The loss adds up terms p (log p - log q) and -log q_y of magnitude M
    (below), each rounded to a few float32 ulps, so its absolute error is
    ~ a few eps32 * M; relative to a KL near 0 that can exceed 1e-5 (torch's
    float32 result misses by as much: it is the conditioning, not the code).
    """
    V = inputs["student_logits"].shape[-1]
    keep = inputs["targets"].reshape(-1) != ignore_index
    s, t = inputs["student_logits"].reshape(-1, V)[keep], inputs["teacher_logits"].reshape(-1, V)[keep]
    y = inputs["targets"].reshape(-1)[keep]

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p, log_q, log_h = log_softmax(t / T), log_softmax(s / T), log_softmax(s)
    soft = (np.exp(log_p) * (np.abs(log_p) + np.abs(log_q))).sum(-1).mean()
    hard = -log_h[np.arange(len(y)), y].mean()
    loss = alpha * T * T * (np.exp(log_p) * (log_p - log_q)).sum(-1).mean() + (1 - alpha) * hard
    magnitude = alpha * T * T * soft + (1 - alpha) * hard
    return max(1e-5, 10 * float(np.finfo(np.float32).eps) * magnitude / abs(loss))


@given(lead=leads, V=st.integers(1, 8), T=temperatures, alpha=alphas, ignore=st.sampled_from([0.0, 0.4]), seed=seeds)
def test_distillation_gradcheck(lead, V, T, alpha, ignore, seed):
    inputs = _inputs(np.random.default_rng(seed), lead, V, ignore)
    assert_gradients_match(ops.distillation_forward, ops.distillation_backward, inputs, seed=seed % 1000,
                           kwargs={"temperature": T, "alpha": alpha, "teacher_grad": True})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(lead=leads, V=st.integers(2, 9), T=temperatures, alpha=alphas, teacher=st.booleans(),
       ignore_index=st.sampled_from([-100, -1]), seed=seeds)
def test_distillation_matches_torch(torch, dtype, lead, V, T, alpha, teacher, ignore_index, seed):
    inputs = _inputs(np.random.default_rng(seed), lead, V, 0.3, ignore_index=ignore_index)
    inputs["targets"].flat[0] = 0  # at least one position counts (torch's batchmean of nothing is NaN)
    rtol = 1e-10 if dtype == np.float64 else _float32_rtol(inputs, T, alpha, ignore_index)
    out, _ = assert_matches_torch(
        ops.distillation_forward, ops.distillation_backward, inputs, _torch_distill(torch), dtype=dtype, seed=seed,
        rtol=rtol,
        kwargs={"temperature": T, "alpha": alpha, "ignore_index": ignore_index, "teacher_grad": teacher},
        grad_names=None if teacher else ["student_logits"])
    assert out.shape == () and out.dtype == dtype


@given(lead=leads, V=st.integers(1, 8), T=temperatures, alpha=alphas, seed=seeds)
def test_distillation_equals_the_textbook_version(lead, V, T, alpha, seed):
    inputs = _inputs(np.random.default_rng(seed), lead, V)
    loss, cache = ops.distillation_forward(*inputs.values(), temperature=T, alpha=alpha)
    ref, ref_cache = reference.distillation_forward(*inputs.values(), temperature=T, alpha=alpha)
    assert abs(float(loss) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref)))
    d = np.asarray(0.7)
    ds, dt = ops.distillation_backward(d, cache)
    assert dt is None  # the teacher's gradient only when asked
    assert rel_error(ds, reference.distillation_backward(d, ref_cache)) < 1e-12


def test_distillation_dtypes():
    inputs = _inputs(np.random.default_rng(3), (2, 3), 5)
    for dtype in (np.float32, np.float64):
        assert_preserves_dtype(ops.distillation_forward, ops.distillation_backward, inputs, dtype,
                               kwargs={"temperature": 2.0, "alpha": 0.5, "teacher_grad": True})


def test_alpha_zero_is_cross_entropy_and_equal_logits_cost_nothing_soft():
    """alpha = 0 is exactly the labels' cross-entropy; a student equal to its teacher has KL 0 and,
    at alpha = 1, gradient 0 (the soft targets are what it already predicts)."""
    r = np.random.default_rng(11)
    inp = _inputs(r, (3, 4), 6)
    loss, cache = ops.distillation_forward(*inp.values(), temperature=3.0, alpha=0.0)
    ce, ce_cache = ops.cross_entropy_forward(inp["student_logits"], inp["targets"])
    assert abs(float(loss) - float(ce)) <= 1e-12 * float(ce)
    d = np.asarray(1.0)
    assert rel_error(ops.distillation_backward(d, cache)[0], ops.cross_entropy_backward(d, ce_cache)) < 1e-12
    same = inp["student_logits"]
    loss, cache = ops.distillation_forward(same, same.copy(), inp["targets"], temperature=2.0, alpha=1.0)
    assert abs(float(loss)) < 1e-12
    assert np.abs(ops.distillation_backward(d, cache)[0]).max() < 1e-12


@pytest.mark.parametrize("T", [1.0, 4.0, 16.0])
def test_t_squared_keeps_the_soft_gradient_on_the_hard_scale(T):
    """Hinton et al.'s reason for T^2: for logits small against T, the soft gradient tends to
    (s - t) / (V N) whatever T; without the T^2 it would shrink as 1/T^2."""
    r = np.random.default_rng(5)
    s, t = 0.01 * r.standard_normal((4, 5)), 0.01 * r.standard_normal((4, 5))
    _, cache = ops.distillation_forward(s, t, np.zeros(4, dtype=np.int64), temperature=T, alpha=1.0)
    ds, _ = ops.distillation_backward(np.asarray(1.0), cache)
    centred = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
    limit = centred / (5 * 4)
    # the first-order term of softmax(x/T) is 1/V + centred(x)/(V T); the rest is O(|x|^2 / T^2), here <= 1e-4 relative
    assert rel_error(ds, limit) < 1e-2 / T


@pytest.mark.parametrize("big", [1e3, 1e4])
def test_distillation_huge_logits_stay_finite(torch, big):
    r = np.random.default_rng(int(big))
    inp = _inputs(r, (2, 3), 7, scale=big)
    loss, cache = ops.distillation_forward(*inp.values(), temperature=2.0, alpha=0.5)
    ds, _ = ops.distillation_backward(np.asarray(1.0), cache)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(ds))
    assert_matches_torch(ops.distillation_forward, ops.distillation_backward, inp, _torch_distill(torch),
                         dtype=np.float64, kwargs={"temperature": 2.0, "alpha": 0.5}, grad_names=["student_logits"])


def test_everything_ignored_is_zero():
    inp = _inputs(np.random.default_rng(0), (2, 2), 4, ignore=1.0)
    loss, cache = ops.distillation_forward(*inp.values(), temperature=2.0, alpha=0.5)
    assert float(loss) == 0.0
    assert np.all(ops.distillation_backward(np.asarray(1.0), cache)[0] == 0)


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_logits=np.zeros((2, 3, 6))), "differ in shape"),
    (dict(teacher_logits=np.zeros((2, 3, 5), dtype=np.float32)), "cast the teacher"),
    (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(targets=np.array([[0, 1, 5], [0, 0, 0]])), r"\[0, 5\)"),
    (dict(targets=np.zeros((2, 2), dtype=np.int64)), "targets of shape"),
])
def test_bad_input_is_a_clear_error(bad, match):
    args = {"student_logits": np.zeros((2, 3, 5)), "teacher_logits": np.zeros((2, 3, 5)),
            "targets": np.zeros((2, 3), dtype=np.int64), **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        ops.distillation_forward(**args)


# ==========================================================================
# the workflow: npflux.training.distill and npflux distill
# ==========================================================================
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny trained teacher (2 layers, width 16) on TEXT, saved as `npflux train` saves."""
    from npflux.models import GPTConfig
    from npflux.tokenizers import CharTokenizer
    from npflux.train import TrainConfig, train

    out = tmp_path_factory.mktemp("teacher")
    tok = CharTokenizer(TEXT)
    ids = np.asarray(tok.encode(TEXT), dtype=np.int64)
    cfg = TrainConfig(out_dir=str(out), batch_size=4, max_iters=30, eval_interval=30, eval_iters=1,
                      learning_rate=1e-2, progress=False, checkpoint_interval=0)
    train(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16), cfg, ids[:1600],
          ids[1600:], tok, log=_quiet)
    return out / "ckpt"


def _student(vocab, **kw):
    from npflux.models import GPTConfig

    return GPTConfig(**{"vocab_size": vocab, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8, **kw})


def _data(tok):
    ids = np.asarray(tok.encode(TEXT), dtype=np.int64)
    return ids[:1600], ids[1600:]


def test_alpha_zero_student_gets_exactly_the_plain_gradient(teacher_dir):
    """Through the model: the objective at alpha = 0 is the labels' cross-entropy, so its gradient
    (ops.distillation_backward -> GPT.backward_from_logits) equals GPT.backward's, bit for bit in float64."""
    from npflux.models import GPT
    from npflux.training.distill import Distillation, load_teacher

    teacher, tok = load_teacher(teacher_dir, dtype="float64")
    train_ids, _ = _data(tok)
    x = np.stack([train_ids[i:i + 16] for i in (0, 50)])
    y = np.stack([train_ids[i + 1:i + 17] for i in (0, 50)])
    a, b = (GPT(_student(tok.vocab_size), seed=3, dtype="float64") for _ in range(2))
    objective = Distillation(teacher, temperature=2.0, alpha=0.0)
    loss = objective.loss(a, (x, y))
    objective.backward(a, 0.5)
    _, plain = b.forward(x, y)
    b.backward(loss_scale=0.5)
    assert abs(float(loss) - float(plain)) <= 1e-12 * float(plain)
    for name in a.grads:
        assert rel_error(a.grads[name], b.grads[name]) < 1e-12, name


def test_distill_writes_its_kind_and_resumes_exactly(teacher_dir, tmp_path):
    """4 steps in one run equal 2 steps, a stop, and 2 more with resume=True; the checkpoint is a
    gpt-distilled that everything reading a GPT reads, and records the teacher."""
    from npflux.checkpoint import GPT_KINDS, load_model
    from npflux.train import TrainConfig
    from npflux.training.distill import Distillation, distill, load_teacher

    teacher, tok = load_teacher(teacher_dir)
    train_ids, val_ids = _data(tok)
    objective = Distillation(teacher, temperature=2.0, alpha=0.7, teacher_path=str(teacher_dir))

    def run(out, steps, resume=False):
        cfg = TrainConfig(out_dir=str(out), batch_size=4, max_iters=steps, eval_interval=2, eval_iters=1,
                          checkpoint_interval=0, progress=False, learning_rate=1e-2)
        return distill(_student(tok.vocab_size), cfg, objective, train_ids, val_ids, tok, resume=resume, log=_quiet)

    straight, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, state = run(tmp_path / "b", 4, resume=True)
    assert state.step == 4
    for name, p in straight.params.items():
        np.testing.assert_array_equal(p, resumed.params[name], err_msg=name)
    model, _, ckpt = load_model(tmp_path / "b" / "ckpt", expect=GPT_KINDS)
    assert ckpt.kind == "gpt-distilled"
    assert ckpt.config["distill"]["alpha"] == 0.7 and ckpt.config["distill"]["teacher"]["path"] == str(teacher_dir)
    np.testing.assert_array_equal(model.params["transformer.wte.weight"], straight.params["transformer.wte.weight"])
    # resuming under another objective is refused, not silently continued
    other = Distillation(teacher, temperature=1.0, alpha=0.7, teacher_path=str(teacher_dir))
    cfg = TrainConfig(out_dir=str(tmp_path / "b"), max_iters=6, progress=False, eval_iters=1, batch_size=4)
    with pytest.raises(ValueError, match="temperature"):
        distill(_student(tok.vocab_size), cfg, other, train_ids, val_ids, tok, resume=True, log=_quiet)


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_sizes(teacher_dir, tmp_path):
    from npflux.train import TrainConfig
    from npflux.training.distill import Distillation, distill, load_teacher

    teacher, tok = load_teacher(teacher_dir)
    with pytest.raises(ValueError, match=rf"{tok.vocab_size} tokens, the student {tok.vocab_size + 3}"):
        load_teacher(teacher_dir, _student(tok.vocab_size + 3))
    cfg = TrainConfig(out_dir=str(tmp_path / "s"), max_iters=1, progress=False)
    with pytest.raises(ValueError, match=rf"{tok.vocab_size} tokens, the student {tok.vocab_size + 3}"):
        distill(_student(tok.vocab_size + 3), cfg, Distillation(teacher), *_data(tok), tok, log=_quiet)
    assert not (tmp_path / "s").exists()  # refused before any work


def test_cli_distill_runs_and_refuses_a_teacher_of_another_kind(teacher_dir, tmp_path, capsys):
    from pathlib import Path

    from npflux.cli import main

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "out"
    main(["distill", "--teacher", str(teacher_dir), "--preset", "shakespeare-s1", "--n-layer", "1", "--n-embd", "8",
          "--n-head", "2", "--block-size", "16", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
          "--batch-size", "2", "--data", str(data), "--out-dir", str(out), "--quiet"])
    meta = json.loads((out / "ckpt" / "meta.json").read_text())
    assert meta["kind"] == "gpt-distilled" and meta["step"] == 2
    sae = Path(__file__).parent / "fixtures" / "checkpoints" / "sae"
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(sae), "--data", str(data), "--out-dir", str(tmp_path / "o2")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "sparse autoencoder" in err and "not a GPT" in err and "Traceback" not in err

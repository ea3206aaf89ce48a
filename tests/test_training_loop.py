"""npflux.training.loop: the one training step, eval mode, the window-loss evaluator."""
import numpy as np
import pytest

from npflux import optim
from npflux.gradcheck import rel_error
from npflux.models import GPT, GPTConfig
from npflux.training import evaluating, train_step, windows_loss

CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.0)


def batch(seed, B=4, T=8):
    r = np.random.default_rng(seed)
    x = r.integers(0, CFG.vocab_size, (B, T))
    return x, r.integers(0, CFG.vocab_size, (B, T))


@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_accumulated_micro_batches_equal_one_big_batch(n_micro):
    """n micro-batches of b rows step like one batch of n*b rows (float64: to rounding, the sums differ in order)."""
    x, y = batch(0, B=8)
    whole = GPT(CFG, seed=1, dtype="float64")
    parts = GPT(CFG, seed=1, dtype="float64")
    opt_w, opt_p = optim.AdamW(whole.params, lr=1e-2), optim.AdamW(parts.params, lr=1e-2)
    loss_w, norm_w = train_step(whole, opt_w, [(x, y)], grad_clip=0.5)
    rows = np.array_split(np.arange(8), n_micro)
    loss_p, norm_p = train_step(parts, opt_p, [(x[r], y[r]) for r in rows], grad_clip=0.5)
    assert abs(loss_w - loss_p) <= 1e-12 * abs(loss_w)
    assert abs(norm_w - norm_p) <= 1e-12 * norm_w
    for k in whole.params:
        assert rel_error(parts.params[k], whole.params[k]) < 1e-12, k


def test_train_step_clips_and_reports_the_norm_before_clipping():
    model = GPT(CFG, seed=2, dtype="float64")
    opt = optim.SGD(model.params, lr=0.0)  # lr 0: the parameters stay; only the gradients are looked at
    _, norm = train_step(model, opt, [batch(1)], grad_clip=1e-3)
    assert norm > 1e-3
    total = np.sqrt(sum(float((g * g).sum()) for g in model.grads.values()))
    assert abs(total - 1e-3) <= 1e-6 * 1e-3 + 1e-9  # clipped to max_norm (less torch's 1e-6 epsilon)
    _, none = train_step(model, opt, [batch(1)], grad_clip=0.0)
    assert none is None


def test_train_step_takes_other_losses_and_gradients():
    """A model without (logits, loss) forwards (an SAE) plugs in its own loss and backward."""
    calls = []
    model = GPT(CFG, seed=3, dtype="float64")
    opt = optim.SGD(model.params, lr=0.1)
    x, y = batch(2)
    loss, _ = train_step(model, opt, [(x, y), (x, y)],
                         loss=lambda b: calls.append("loss") or model.forward(*b)[1],
                         backward=lambda s: calls.append(s) or model.backward(loss_scale=s))
    assert calls == ["loss", 0.5, "loss", 0.5]
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match="no micro-batches"):
        train_step(model, opt, [])


def test_evaluating_restores_the_mode_even_after_an_error():
    model = GPT(CFG, seed=0)
    model.train()
    with pytest.raises(RuntimeError):
        with evaluating(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training
    model.eval()
    with evaluating(model):
        pass
    assert not model.training  # a model that was in eval mode stays there


def test_windows_loss_is_the_mean_over_every_predicted_token():
    model = GPT(CFG, seed=4, dtype="float64")
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, 8 * 5 + 1 + 3)  # 5 windows and a remainder
    got = windows_loss(model, ids, batch_size=2)
    windows = [ids[i * 8: i * 8 + 9] for i in range(5)]
    expected = np.mean([float(model.forward(w[None, :-1], w[None, 1:])[1]) for w in windows])
    assert abs(got - expected) <= 1e-12 * expected
    with pytest.raises(ValueError):
        windows_loss(model, ids[:1])


def test_run_log_keeps_what_a_resumed_run_kept_and_appends_at_once(tmp_path):
    import json

    from npflux.training import RunLog, plot_losses

    path = tmp_path / "run" / "log.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 0}\n{"step": 10}\n{"step": 20}\n')  # the last line: a run that died after it
    log = RunLog(path, kept=[{"step": 0}, {"step": 10}])
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 10]
    log.append({"step": 20, "val_loss": 1.5})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 20, "val_loss": 1.5}
    history = [{"step": s, "train_loss": 2.0 - s / 100, "val_loss": 2.1 - s / 100} for s in (0, 10, 20)]
    assert plot_losses(history, tmp_path / "loss.png").is_file()
    assert plot_losses([], tmp_path / "none.png") is None

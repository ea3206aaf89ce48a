"""npflux.training.threads: a step's batch rows split over the worker threads, one model replica each."""
import numpy as np
import pytest

from npflux import optim, settings
from npflux.distributed import GradientSync
from npflux.gradcheck import rel_error
from npflux.models import GPT, GPTConfig
from npflux.nn.convert import apply_lora, refresh_flat_parameters
from npflux.training import threads, train_step

CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.0)
SPLIT = dict(num_threads=2, split_batch=True)
ONE_PASS = dict(num_threads=2, split_batch=False)


def batch(seed, B=5, T=8, ignored=0):
    r = np.random.default_rng(seed)
    x = r.integers(0, CFG.vocab_size, (B, T))
    y = r.integers(0, CFG.vocab_size, (B, T))
    y[B - 1, :ignored] = -100  # left out of the mean: the shares then hold different numbers of targets
    return x, y


def grads_after(model, micro_batches, **setting):
    with settings.override(**setting):
        loss, _ = train_step(model, optim.SGD(model.params, lr=0.0), micro_batches)
    return loss, {k: g.copy() for k, g in model.grads.items()}


@pytest.mark.parametrize("micro", [1, 2])
def test_a_split_step_is_its_shares_run_one_after_the_other(micro):
    """Order identical by construction, so equal to the bit: share k's forward and backward on its own, its
    backward scaled by its targets over the batch's (and 1/micro per micro-batch), share 1's gradients added
    to share 0's. 5 rows split 3 + 2; 6 of share 1's targets ignored, so it weighs 10/34, not 2/5."""
    batches = [batch(s, ignored=6) for s in range(micro)]
    split = GPT(CFG, seed=1, dtype="float64")
    loss, got = grads_after(split, batches, **SPLIT)

    share0, share1 = GPT(CFG, seed=1, dtype="float64"), GPT(CFG, seed=1, dtype="float64")
    expected_loss = 0.0
    with settings.override(num_threads=1):
        for x, y in batches:
            counts = [int((y[r] != -100).sum()) for r in (slice(0, 3), slice(3, 5))]
            for model, rows, count in zip((share0, share1), (slice(0, 3), slice(3, 5)), counts):
                _, part = model.forward(x[rows], y[rows])
                model.backward(loss_scale=count / sum(counts) / micro)
                expected_loss += float(part) * count / sum(counts) / micro
    for k in got:
        np.testing.assert_array_equal(got[k], share0.grads[k] + share1.grads[k], err_msg=k)
    assert loss == pytest.approx(expected_loss, rel=1e-15, abs=0)


def test_a_split_step_gives_the_one_pass_gradients_to_rounding():
    """Against one pass over the batch, only the grouping of the sums over its B*T = 40 tokens differs.
    Reordering a float64 sum of n terms moves it by at most 2nu * sum|terms| (u = 1.1e-16); allowing
    sum|terms| up to 10^3 times the largest gradient (cancellation) gives 40 * 2.2e-16 * 1e3 < 1e-11."""
    x, y = batch(3, ignored=5)
    loss_split, split = grads_after(GPT(CFG, seed=1, dtype="float64"), [(x, y)], **SPLIT)
    loss_one, one = grads_after(GPT(CFG, seed=1, dtype="float64"), [(x, y)], **ONE_PASS)
    assert abs(loss_split - loss_one) <= 1e-11 * abs(loss_one)
    for k in one:
        assert np.abs(split[k] - one[k]).max() <= 1e-11 * np.abs(one[k]).max(), k


def test_the_replicas_hold_the_models_arrays_and_follow_its_optimizer():
    model = GPT(CFG, seed=1)
    opt = optim.AdamW(model.params, lr=1e-2)
    with settings.override(**SPLIT):
        for s in range(3):
            train_step(model, opt, [batch(s)])
        split = threads.batch_split(model, [batch(0)])
    assert len(split.replicas) == 1
    for (name, p), q in zip(model.params.items(), split.replicas[0].params.values()):
        assert q is p, name
    assert all(g is not h for g, h in zip(model.grads.values(), split.replicas[0].grads.values()))


def test_the_split_is_rebuilt_when_the_threads_or_the_parameter_arrays_change():
    model = GPT(CFG, seed=1)
    with settings.override(**SPLIT):
        first = threads.batch_split(model, [batch(0)])
        assert threads.batch_split(model, [batch(0)]) is first  # built once
    with settings.override(num_threads=3, split_batch=True):
        three = threads.batch_split(model, [batch(0)])
    assert len(three.replicas) == 2
    refresh_flat_parameters(model)  # rebinds every parameter to a new buffer
    with settings.override(**SPLIT):
        again = threads.batch_split(model, [batch(0)])
    assert again is not first and again.replicas[0].params["transformer.wte.weight"] is model.params["transformer.wte.weight"]


def test_dropout_masks_are_reproducible_from_the_seed():
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": 0.3})
    runs = []
    for _ in range(2):
        model = GPT(cfg, seed=4)
        opt = optim.AdamW(model.params, lr=1e-2)
        with settings.override(**SPLIT):
            losses = [train_step(model, opt, [batch(s)])[0] for s in range(3)]
        runs.append((losses, {k: v.copy() for k, v in model.params.items()}))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        np.testing.assert_array_equal(v, runs[1][1][k], err_msg=k)


def test_where_a_step_is_not_split():
    model = GPT(CFG, seed=1)
    x, y = batch(0)
    with settings.override(**SPLIT):
        assert threads.batch_split(model, [(x, y)]) is not None
        assert threads.batch_split(model, [(x, y)], custom=True) is None        # a loss of the caller's own
        assert threads.batch_split(model, [(x, y)], one_process=False) is None  # MPI's hooks watch the model
        assert threads.batch_split(model, [(x[:1], y[:1])]) is None            # one row
        assert threads.batch_split(model, [(x, np.full_like(y, -100))]) is None  # nothing to predict
        assert threads.batch_split(model, [(x, y, y)]) is None                 # not (idx, targets)
    with settings.override(num_threads=1, split_batch=True):
        assert threads.batch_split(model, [(x, y)]) is None
    with settings.override(**ONE_PASS):
        assert threads.batch_split(model, [(x, y)]) is None
    with settings.override(num_threads=2, split_batch="auto"):  # a tiny model: the threads would only wait
        assert threads.batch_split(model, [(x, y)]) is None
        big = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=0)
        r = np.random.default_rng(0)
        assert threads.batch_split(big, [(r.integers(0, 65, (12, 64)),) * 2]) is not None


def test_a_model_that_cannot_be_rebuilt_from_its_config_is_not_split_and_not_retried(monkeypatch):
    model = GPT(CFG, seed=1)
    apply_lora(model, ["*attn.c_attn"], rank=2)
    built, real = [], threads._replica
    monkeypatch.setattr(threads, "_replica", lambda m: built.append(m) or real(m))  # a GPT without the adapters
    with settings.override(**SPLIT):
        assert threads.batch_split(model, [batch(0)]) is None
        assert threads.batch_split(model, [batch(0)]) is None
    assert len(built) == 1


def test_an_error_in_a_share_reaches_the_caller_and_the_weights_stay():
    model = GPT(CFG, seed=1)
    before = {k: v.copy() for k, v in model.params.items()}
    x, y = batch(0)
    y[4, 0] = CFG.vocab_size  # out of range, in the second share
    with settings.override(**SPLIT), pytest.raises(ValueError, match="cross_entropy"):
        train_step(model, optim.AdamW(model.params, lr=1e-2), [(x, y)])
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_the_split_batch_setting_reads_auto_and_flags(monkeypatch):
    for text, value in (("auto", "auto"), ("on", True), ("0", False)):
        monkeypatch.setenv("NPFLUX_SPLIT_BATCH", text)
        assert settings.get("split_batch") == value
    monkeypatch.setenv("NPFLUX_SPLIT_BATCH", "sometimes")
    with pytest.raises(ValueError, match="NPFLUX_SPLIT_BATCH"):
        settings.get("split_batch")


def test_split_training_matches_one_pass_training():
    """Five AdamW steps, float64: the rounding differences of each step stay at rounding size."""
    models = []
    for setting in (SPLIT, ONE_PASS):
        model = GPT(CFG, seed=1, dtype="float64")
        opt = optim.AdamW(model.params, lr=1e-2)
        with settings.override(**setting):
            for s in range(5):
                train_step(model, opt, [batch(s)], grad_clip=1.0)
        models.append(model)
    for k in models[0].params:
        assert rel_error(models[0].params[k], models[1].params[k]) < 1e-9, k

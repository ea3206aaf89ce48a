"""The extractive reader: its span loss (gradients, PyTorch), the model, the QA generator, metrics, ``ask``."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npflux import ops
from npflux.testing import assert_gradients_match, assert_matches_torch, assert_preserves_dtype

seeds = st.integers(0, 2**32 - 1)


def _span_inputs(r, B, T, masked):
    mask = r.random((B, T)) < 0.6 if masked else np.ones((B, T), dtype=bool)
    mask[np.arange(B), r.integers(0, T, B)] = True  # every row allows at least one position
    allowed = [np.flatnonzero(m) for m in mask]
    starts = np.array([r.choice(a) for a in allowed])
    ends = np.array([r.choice(a) for a in allowed])
    inputs = {"start_logits": 2 * r.standard_normal((B, T)), "end_logits": 2 * r.standard_normal((B, T)),
              "starts": starts, "ends": ends}
    return inputs, mask


def _torch_span(torch):
    F = torch.nn.functional

    def fn(start_logits, end_logits, starts, ends, mask=None):
        if mask is not None:
            keep = torch.as_tensor(mask)
            start_logits = start_logits.masked_fill(~keep, float("-inf"))
            end_logits = end_logits.masked_fill(~keep, float("-inf"))
        return F.cross_entropy(start_logits, starts) + F.cross_entropy(end_logits, ends)

    return fn


@given(B=st.integers(1, 4), T=st.integers(1, 9), masked=st.booleans(), seed=seeds)
def test_span_loss_gradcheck(B, T, masked, seed):
    inputs, mask = _span_inputs(np.random.default_rng(seed), B, T, masked)
    assert_gradients_match(ops.span_loss_forward, ops.span_loss_backward, inputs, seed=seed % 1000,
                           kwargs={"mask": mask})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(B=st.integers(1, 4), T=st.integers(1, 9), masked=st.booleans(), seed=seeds)
def test_span_loss_matches_torch(torch, dtype, B, T, masked, seed):
    inputs, mask = _span_inputs(np.random.default_rng(seed), B, T, masked)
    out, grads = assert_matches_torch(ops.span_loss_forward, ops.span_loss_backward, inputs, _torch_span(torch),
                                      dtype=dtype, kwargs={"mask": mask}, seed=seed)
    assert out.shape == () and out.dtype == dtype
    assert np.all(grads["start_logits"][~mask] == 0) and np.all(grads["end_logits"][~mask] == 0)


def test_span_loss_dtypes():
    inputs, mask = _span_inputs(np.random.default_rng(1), 3, 6, True)
    for dtype in (np.float32, np.float64):
        assert_preserves_dtype(ops.span_loss_forward, ops.span_loss_backward, inputs, dtype, kwargs={"mask": mask})


def test_span_loss_ignores_masked_logits():
    """What the mask leaves out cannot change the loss, however large its logits."""
    r = np.random.default_rng(4)
    inputs, mask = _span_inputs(r, 3, 7, True)
    loss, _ = ops.span_loss_forward(*inputs.values(), mask=mask)
    inputs["start_logits"] = np.where(mask, inputs["start_logits"], 1e4)
    loss2, _ = ops.span_loss_forward(*inputs.values(), mask=mask)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-14)


@pytest.mark.parametrize("bad, match", [
    (dict(starts=np.array([0, 9])), r"\[0, 5\)"),
    (dict(ends=np.array([1])), r"\(2,\)"),
    (dict(mask=np.array([[True] * 5, [False] * 5])), "allows no position"),
    (dict(mask=np.array([[False, True, True, True, True]] * 2)), "mask leaves out"),
    (dict(end_logits=np.zeros((2, 4))), r"\(B, T\)"),
])
def test_span_loss_bad_input(bad, match):
    args = {"start_logits": np.zeros((2, 5)), "end_logits": np.zeros((2, 5)), "starts": np.array([0, 1]),
            "ends": np.array([2, 3]), **bad}
    with pytest.raises(ValueError, match=match):
        ops.span_loss_forward(**args)

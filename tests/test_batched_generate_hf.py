"""An outside reference for batched generation: Hugging Face ``transformers`` GPT-2, left-padded.

The same random GPT-2 weights in both libraries (npflux loads a GPT-2 state dict
as it is). Hugging Face pads on the LEFT with an attention mask and derives each
row's positions from the mask; npflux pads on the right with per-row positions
(``nn.RowLayout``). Different layouts, the same model: greedy tokens must agree
row by row, and the first step's logits within a float64 rounding bound. The
models are float64, so a greedy token could only differ at a near-tie of
~1e-15 (see tests/test_batched_generate.py). Skipped when ``transformers`` is
not installed (it is a test-only dependency).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from npflux import GPT, GPTConfig  # noqa: E402
from npflux.generate import generate  # noqa: E402

V, BLOCK, PAD = 37, 48, 0


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=BLOCK, n_embd=24, n_layer=2, n_head=3,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():  # GPT-2's 0.02 init gives near-constant outputs; wider weights vary from step to step
        for name, p in hf.named_parameters():
            if "ln_" not in name:
                p.normal_(0.0, 0.3)
    ours = GPT(GPTConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=3, n_embd=24), dtype="float64")
    ours.load_state_dict({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    return hf, ours


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("lengths, seed", [([3, 9, 1, 6], 0), ([12, 2], 1), ([5], 2), ([1, 1, 20, 7, 4], 3)])
def test_greedy_batches_agree_with_hugging_face_left_padding(pair, lengths, seed):
    hf, ours = pair
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, V, n) for n in lengths]
    ids, mask = left_padded(prompts)
    n = 16
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD)
        # the first step in float64 (generate hands back float32 scores): positions from the mask, as generate does
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].numpy()
    ref_tokens = out[:, ids.shape[1]:].numpy()
    got = generate(ours, prompts, n, temperature=0.0)
    for b, p in enumerate(prompts):
        np.testing.assert_array_equal(got[b][len(p):], ref_tokens[b])
    assert len({tuple(r) for r in ref_tokens}) == len({tuple(p) for p in prompts})  # not one constant answer
    # the first step's logits: every row's last real position, against the left-padded reference
    T = max(lengths)
    idx = np.zeros((len(prompts), T), dtype=np.int64)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = p
    with ours.evaluating():
        logits, _ = ours.forward(idx, lengths=lengths)
    first = np.stack([logits[b, len(p) - 1] for b, p in enumerate(prompts)])
    assert first.dtype == ref.dtype == np.float64
    # rounding only: a few hundred float64 operations per logit, each off by at most eps relative
    bound = 1000 * np.finfo(np.float64).eps * np.abs(ref).max()
    np.testing.assert_allclose(first, ref, rtol=0, atol=bound)

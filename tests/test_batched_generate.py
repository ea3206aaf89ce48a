"""Batched generation over prompts of different lengths: each row is exactly what it would be alone.

Rows are right-padded (``nn.RowLayout``): every row's positions count from its
own start, its padding is masked out of every attention, and its cache row grows
on its own. So row b of a batched call must give the tokens of a call with only
prompt b, and its seed.

Why exact token equality is safe: the batched forward computes the same sums as
the solo one, only in a different order (BLAS blocks by shape), so its logits
differ by rounding alone, measured below at ~1e-16 relative in float64. A
greedy token could flip only if the top two logits of some step were that close
(the logits are O(1), so a gap below 1e-13 has probability ~1e-13 per step);
a sampled token could flip only if its uniform draw fell within ~1e-16 of a
boundary of the cumulative distribution. The models here are float64 for that
reason; the float32 test compares logits within a bound derived from the
dtype's epsilon instead of tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npflux import GPT, GPTConfig
from npflux.generate import DecodeBatch, Sequence, generate, generate_stream, row_seeds
from npflux.nn import KVCache, RowLayout

V, BLOCK = 23, 12


def model64(seed=0, block=BLOCK):
    cfg = GPTConfig(vocab_size=V, block_size=block, n_layer=2, n_head=2, n_embd=16)
    return GPT(cfg, seed=seed, dtype="float64")


MODEL = model64()


def prompts_of(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n) for n in lengths]


def alone(model, prompt, n, **kw):
    return generate(model, [prompt], n, **kw)[0]


# -- the forward: a right-padded batch gives each row's solo logits --------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_padded_forward_gives_each_rows_solo_logits(dtype):
    model = GPT(MODEL.config, seed=1, dtype=dtype)
    lengths = [3, 9, 1, 6]
    prompts = prompts_of(lengths, 0)
    idx = np.zeros((4, max(lengths)), dtype=np.int64)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = p
    with model.evaluating():
        batched, _ = model.forward(idx, lengths=lengths)
        solos = [model.forward(p[None])[0][0] for p in prompts]
    # Only the order of summation differs. A sum of K terms reordered changes by at most
    # ~K eps sum|terms| (Higham); the widest sums here are the MLP's (4C = 64 terms), and
    # the error passes through 2 layers and the head: 4 C L eps max|logit| bounds it with room.
    eps = np.finfo(dtype).eps
    for b, p in enumerate(prompts):
        bound = 4 * 16 * 2 * eps * max(1.0, float(np.abs(solos[b]).max())) * 4
        np.testing.assert_allclose(batched[b, : len(p)], solos[b], rtol=0, atol=bound)
        assert batched.dtype == np.dtype(dtype)


def test_cached_steps_of_rows_at_different_lengths_give_solo_logits():
    lengths = [2, 7, 4]
    prompts = prompts_of(lengths, 1)
    caches = MODEL.new_kv_caches(3)
    idx = np.zeros((3, 7), dtype=np.int64)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = p
    with MODEL.evaluating():
        MODEL.forward(idx, kv_caches=caches, lengths=lengths)
        assert caches[0].lengths.tolist() == lengths  # each row's cache grew by its own prompt
        nxt = np.array([[5], [6], [7]])
        step, _ = MODEL.forward(nxt, kv_caches=caches, lengths=[1, 1, 1])
        for b, p in enumerate(prompts):
            solo, _ = MODEL.forward(np.append(p, nxt[b])[None])
            np.testing.assert_allclose(step[b, 0], solo[0, -1], rtol=0, atol=1e-12)
    assert caches[0].lengths.tolist() == [n + 1 for n in lengths]


def test_row_layout_mask_is_causal_within_each_row_and_blind_to_padding():
    rows = RowLayout(np, offsets=[0, 3], counts=[2, 1], T=2)
    assert rows.n_keys == 4
    m = rows.mask[:, 0]
    # row 0: positions 0, 1 (a fresh prompt of 2): query 0 sees key 0, query 1 keys 0-1
    assert m[0, 0].tolist() == [True, False, False, False]
    assert m[0, 1].tolist() == [True, True, False, False]
    # row 1: one real token at position 3 (3 cached); its padding query sees no key past the end
    assert m[1, 0].tolist() == [True, True, True, True]
    assert m[1, 1].tolist() == [True, True, True, True]
    assert rows.positions.tolist() == [[0, 1], [3, 4]] and not rows.uniform
    # rows at one offset without padding: the plain causal mask, which attention applies as a bias
    same = RowLayout(np, offsets=[2, 2], counts=[3, 3], T=3)
    assert same.uniform and same.mask is None and same.n_keys == 5


def test_per_row_positions_backward_adds_every_rows_gradient():
    from npflux.nn import PositionalEmbedding

    pe = PositionalEmbedding(6, 3, rng=np.random.default_rng(0), dtype="float64")
    x = np.zeros((2, 3, 3))
    positions = np.array([[0, 1, 2], [2, 3, 4]])  # position 2 in both rows: its gradients add
    y = pe.forward(x, positions=positions)
    np.testing.assert_array_equal(y[1, 0], pe.p["weight"][2])
    dy = np.random.default_rng(0).standard_normal((2, 3, 3))
    pe.zero_grad()
    pe.backward(dy)
    expected = np.zeros((6, 3))
    np.add.at(expected, positions.ravel(), dy.reshape(-1, 3))
    np.testing.assert_allclose(pe.g["weight"], expected, rtol=1e-15)


# -- generate: each row as alone --------------------------------------------------------

lengths_st = st.lists(st.integers(1, BLOCK + 2), min_size=1, max_size=5)  # some start past block_size


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_st, n=st.integers(0, 16), data_seed=st.integers(0, 1000))
def test_greedy_rows_of_a_batch_equal_each_prompt_alone(lengths, n, data_seed):
    prompts = prompts_of(lengths, data_seed)
    together = generate(MODEL, prompts, n, temperature=0.0)
    for p, row in zip(prompts, together):
        np.testing.assert_array_equal(row, alone(MODEL, p, n, temperature=0.0))
        np.testing.assert_array_equal(row[: len(p)], p)
        assert len(row) == len(p) + n


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_st, n=st.integers(1, 16), data_seed=st.integers(0, 1000), base=st.integers(0, 2**31),
       top_k=st.none() | st.integers(1, V), top_p=st.none() | st.floats(0.3, 1.0))
def test_seeded_rows_of_a_batch_equal_each_prompt_alone_with_its_own_seed(lengths, n, data_seed, base, top_k, top_p):
    prompts = prompts_of(lengths, data_seed)
    kw = dict(temperature=0.9, top_k=top_k, top_p=top_p)
    together = generate(MODEL, prompts, n, seed=base, **kw)
    for b, (p, row) in enumerate(zip(prompts, together)):
        np.testing.assert_array_equal(row, alone(MODEL, p, n, seed=base + b, **kw))


@settings(max_examples=10, deadline=None)
@given(lengths=lengths_st, data_seed=st.integers(0, 1000))
def test_a_rows_samples_do_not_depend_on_its_batch_mates(lengths, data_seed):
    """The same prompts and seeds in reverse order: each prompt's tokens are unchanged."""
    prompts = prompts_of(lengths, data_seed)
    seeds = [1000 + i for i in range(len(prompts))]
    forward = generate(MODEL, prompts, 10, temperature=1.0, seed=seeds)
    backward = generate(MODEL, prompts[::-1], 10, temperature=1.0, seed=seeds[::-1])
    for a, b in zip(forward, backward[::-1]):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=10, deadline=None)
@given(lengths=lengths_st, data_seed=st.integers(0, 1000), eos=st.integers(0, V - 1))
def test_rows_stop_at_their_own_eos_and_the_cache_free_path_agrees(lengths, data_seed, eos):
    prompts = prompts_of(lengths, data_seed)
    kw = dict(temperature=1.0, seed=7, eos_id=eos)
    together = generate(MODEL, prompts, 14, **kw)
    uncached = generate(MODEL, prompts, 14, use_cache=False, **kw)
    for b, (p, row) in enumerate(zip(prompts, together)):
        new = row[len(p):].tolist()
        assert eos not in new[:-1]  # nothing after an eos
        assert len(new) == 14 or new[-1] == eos
        np.testing.assert_array_equal(row, alone(MODEL, p, 14, temperature=1.0, seed=7 + b, eos_id=eos))
        np.testing.assert_array_equal(row, uncached[b])


def test_a_uniform_array_batch_keeps_its_shape_and_equals_the_list_form():
    prompts = prompts_of([5, 5, 5], 3)
    arr = generate(MODEL, np.stack(prompts), 9, temperature=0.8, seed=4)
    assert arr.shape == (3, 14)
    for b, row in enumerate(generate(MODEL, prompts, 9, temperature=0.8, seed=4)):
        np.testing.assert_array_equal(arr[b], row)


def test_generate_stream_over_a_list_marks_finished_rows():
    prompts = prompts_of([2, 6], 5)
    ends = generate(MODEL, prompts, 8, temperature=1.0, seed=[3, 4], eos_id=None)
    steps = list(generate_stream(MODEL, prompts, 8, temperature=1.0, seed=[3, 4]))
    assert len(steps) == 8 and all(s.dtype == np.int64 for s in steps)
    for b, p in enumerate(prompts):
        np.testing.assert_array_equal(np.array([s[b] for s in steps]), ends[b][len(p):])
    # with an eos: after its eos a row reads -1 until every row is done
    eos = int(ends[0][len(prompts[0])])  # row 0's first token
    steps = list(generate_stream(MODEL, prompts, 8, temperature=1.0, seed=[3, 4], eos_id=eos))
    assert steps[0][0] == eos and all(s[0] == -1 for s in steps[1:])


def test_decode_batch_rows_join_and_leave_between_steps():
    """A sequence added while others run gives its solo tokens; one that leaves frees its row."""
    batch = DecodeBatch(MODEL, capacity=3)
    prompts = prompts_of([4, 9, 2, 6], 9)
    seqs = [Sequence(MODEL, p, 6 + i, temperature=1.0, seed=50 + i) for i, p in enumerate(prompts)]
    batch.add(seqs[0])
    batch.add(seqs[1])
    batch.step()
    batch.step()
    batch.add(seqs[2])          # joins at step 3
    while len(batch) == 3:
        batch.step()
    batch.add(seqs[3])          # takes the row the first finished one freed
    while len(batch):
        batch.step()
    for i, (p, seq) in enumerate(zip(prompts, seqs)):
        assert seq.finish_reason == "length"
        np.testing.assert_array_equal(seq.tokens, alone(MODEL, p, 6 + i, temperature=1.0, seed=50 + i))
    with pytest.raises(RuntimeError, match="full"):
        for s in [Sequence(MODEL, p, 2) for p in prompts]:
            batch.add(s)


def test_bad_lists_of_prompts_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        generate(MODEL, [], 3)
    with pytest.raises(ValueError, match="prompt 1"):
        generate(MODEL, [[1, 2], []], 3)
    with pytest.raises(TypeError):
        generate(MODEL, [[1, 2], [0.5, 1.0]], 3)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(MODEL, [[1], [2], [3]], 3, seed=[1, 2])
    caches = MODEL.new_kv_caches(1)
    MODEL.forward(np.zeros((1, BLOCK - 1), dtype=np.int64), kv_caches=caches, lengths=[BLOCK - 1])
    with pytest.raises(ValueError, match="exceeds block_size"):
        MODEL.forward(np.zeros((1, 2), dtype=np.int64), kv_caches=caches, lengths=[2])
    assert row_seeds(5, 3) == [5, 6, 7] and row_seeds(None, 2) == [None, None]


def test_mixing_aligned_and_per_row_feeding_of_one_cache_is_refused():
    caches = MODEL.new_kv_caches(2)
    MODEL.forward(np.zeros((2, 3), dtype=np.int64), kv_caches=caches, lengths=[3, 1])
    with pytest.raises(ValueError, match="different lengths"):
        MODEL.forward(np.zeros((2, 1), dtype=np.int64), kv_caches=caches)
    assert isinstance(caches[0], KVCache)


def test_cache_slots_past_a_rows_end_never_reach_its_output():
    """Slots a short row does not own (another row's stale keys, or never written) are masked with
    weight exactly 0; they hold finite numbers (caches start at zero: 0 * NaN would be NaN), so
    filling them with large garbage changes nothing."""
    prompts = prompts_of([1, 14, 1, 3, 4], 310)
    expected = [alone(MODEL, p, 6, temperature=0.0) for p in prompts]
    batch = DecodeBatch(MODEL, capacity=5)
    for cache in batch.caches:
        cache.k[:] = 1e30
        cache.v[:] = -1e30
    seqs = [Sequence(MODEL, p, 6, temperature=0.0) for p in prompts]
    for s in seqs:
        batch.add(s)
    while len(batch):
        batch.step()
    for s, e in zip(seqs, expected):
        np.testing.assert_array_equal(s.tokens, e)
    assert not np.isnan(MODEL.new_kv_caches(2)[0].k).any()


# -- beam search over a list of prompts ------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, BLOCK + 2), min_size=1, max_size=4), data_seed=st.integers(0, 1000),
       width=st.integers(1, 4), n=st.integers(0, 10), eos=st.none() | st.integers(0, V - 1),
       use_cache=st.booleans())
def test_beam_search_over_a_list_gives_each_prompts_own_search(lengths, data_seed, width, n, eos, use_cache):
    from npflux.generate import beam_search

    prompts = prompts_of(lengths, data_seed)
    kw = dict(beam_width=width, max_new_tokens=n, eos_id=eos, length_penalty=0.7, use_cache=use_cache)
    together = beam_search(MODEL, prompts, **kw)
    assert len(together) == len(prompts)
    for p, (seqs, scores) in zip(prompts, together):
        alone_seqs, alone_scores = beam_search(MODEL, p, **kw)
        assert [s.tolist() for s in seqs] == [s.tolist() for s in alone_seqs]
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-12, atol=1e-12)


def test_a_forward_may_feed_a_subset_of_the_cache_rows():
    """Rows 0 and 2 decode while row 1 is left alone: each equals its sequence alone."""
    prompts = prompts_of([3, 5, 2], 11)
    caches = MODEL.new_kv_caches(3)
    idx = np.zeros((3, 5), dtype=np.int64)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = p
    with MODEL.evaluating():
        MODEL.forward(idx, kv_caches=caches, lengths=[3, 5, 2])
        step, _ = MODEL.forward(np.array([[4], [9]]), kv_caches=caches, lengths=[1, 1], cache_rows=[2, 0])
        assert caches[0].lengths.tolist() == [4, 5, 3]
        for i, (b, tok) in enumerate([(2, 4), (0, 9)]):
            solo, _ = MODEL.forward(np.append(prompts[b], tok)[None])
            np.testing.assert_allclose(step[i, 0], solo[0, -1], rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="distinct rows"):
            MODEL.forward(np.array([[4], [9]]), kv_caches=caches, lengths=[1, 1], cache_rows=[1, 1])
        with pytest.raises(ValueError, match="distinct rows"):
            MODEL.forward(np.array([[4]]), kv_caches=caches, lengths=[1], cache_rows=[3])

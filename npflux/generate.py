"""Sampling from a GPT: greedy, temperature, top-k, top-p, with a key/value cache.

With the cache, the prompt is run once (prefill) and each new token is one
forward of length 1 that attends to the cached keys and values: O(T) work per
token instead of O(T^2). When the sequence reaches block_size the positions
shift, the cache no longer applies, and the window is recomputed, exactly as
the uncached path crops to the last block_size tokens, so both give the same
tokens.

    generate(model, idx, n, ...)          (B, T) -> (B, T + n), stopping early at eos_id
    generate_stream(model, idx, n, ...)   the same tokens, one step at a time (a server's requests)
    beam_search(model, idx, k, n, ...)    the k most probable continuations of one prompt
    sequence_logprob(model, idx, cont)    log p(cont | idx), recomputed plainly (for checking)
"""
import contextlib

import numpy as np  # host-side bookkeeping of beam search: scores and token lists

from .backend import check_int, get_array_module, to_numpy
from .models.gpt import GPT


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (rows of (B, V))."""
    xp = get_array_module(logits)
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        k = min(int(top_k), logits.shape[-1])
        kth = xp.sort(logits, axis=-1)[:, -k][:, None]
        logits = xp.where(logits < kth, -xp.inf, logits)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p >= 1.0:
            # the whole distribution: nothing to cut (the mass before the last tokens can round to 1.0
            # and would drop them)
            return logits
        order = xp.argsort(-logits, axis=-1)
        sorted_logits = xp.take_along_axis(logits, order, axis=-1)
        probs = xp.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        # keep a token if the mass BEFORE it is still below top_p (the first is always kept)
        mass_before = xp.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = xp.empty_like(drop_sorted)
        xp.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = xp.where(drop, -xp.inf, logits)
    return logits


def sample_next(logits, temperature, top_k, top_p, rng):
    """One token id per row of logits (B, V); temperature 0 is greedy (argmax)."""
    xp = get_array_module(logits)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    # Below the dtype's smallest normal number the temperature is greedy too: 1e-300 is 0 in float32,
    # and a GPU flushes a subnormal one (1e-40) to 0, so 0 / temperature would be nan there.
    if temperature < float(np.finfo(logits.dtype).tiny):
        return xp.argmax(logits, axis=-1)
    # shift the max to 0 before dividing: at a tiny temperature logits / temperature overflows to
    # inf, inf - inf is nan, and every row would silently sample token 0
    logits = filter_logits((logits - logits.max(axis=-1, keepdims=True)) / temperature, top_k, top_p)
    probs = xp.exp(logits)  # the max is 0 (filtering always keeps it): no overflow
    cdf = xp.cumsum(probs, axis=-1)
    u = rng.random((logits.shape[0], 1), dtype=cdf.dtype) * cdf[:, -1:]
    return xp.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


def _checked_prompt(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, name):
    """idx as a (B, T) array of the model's backend, after checking every sampling argument.

    Checked up front, so a bad argument fails even when it would go unused
    (greedy decoding, 0 new tokens), and a stream fails before its first token.
    """
    check_int(idx, f"{name}: idx")
    idx = model.backend.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"{name}: idx must be (B, T) with T >= 1, got shape {idx.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_id is not None and not 0 <= eos_id < model.config.vocab_size:  # it could never be sampled
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {model.config.vocab_size})")
    return idx


def _sample_steps(model, idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache, eos_id, lock):
    """Yield the next token of every row, (B,) on the model's backend, one step at a time.

    Each call owns its caches and random generator. ``lock`` (or a null
    context) is held around each forward, with the model in eval mode inside
    it: the modules keep per-forward state on themselves, so two forwards at
    once on one model would overwrite each other's. Stops early once every row
    has produced ``eos_id``.
    """
    xp, rng, block = model.xp, model.backend.rng(seed), model.config.block_size
    lock = lock if lock is not None else contextlib.nullcontext()
    finished = xp.zeros(idx.shape[0], dtype=bool)
    caches, fed = None, 0  # fed: how many tokens of idx the caches hold
    for _ in range(max_new_tokens):
        with lock, model.evaluating():
            if not use_cache:
                logits, _ = model.forward(idx[:, -block:])
            elif caches is None or idx.shape[1] > block:
                # (re)start: prefill with the last `block` tokens
                caches = model.new_kv_caches(idx.shape[0])
                logits, _ = model.forward(idx[:, -block:], kv_caches=caches)
            else:
                logits, _ = model.forward(idx[:, fed:], kv_caches=caches)
        fed = idx.shape[1]
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, rng).astype(idx.dtype)
        idx = xp.concatenate([idx, nxt[:, None]], axis=1)
        yield nxt
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                return


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, use_cache=True,
             eos_id=None):
    """idx (B, T) int -> (B, T + n) with sampled continuations (model in eval mode).

    n = max_new_tokens, or fewer when ``eos_id`` is given and every row has
    produced it (a row that finished first runs on; cut it at its [EOS]).
    """
    idx = _checked_prompt(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, "generate")
    steps = _sample_steps(model, idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache, eos_id, None)
    return model.xp.concatenate([idx] + [nxt[:, None] for nxt in steps], axis=1)


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, lock=None,
                    eos_id=None):
    """An iterator over the new tokens, one host int64 array (B,) per step: the tokens that
    ``generate`` appends with the same arguments and seed, as soon as each is sampled.

    The arguments are checked here, before the first token. Each stream owns its
    key/value caches and random generator, so several may run at once on one model (a
    server's requests); give them all the same ``lock`` (a ``threading.Lock``), held
    around each forward, because the modules keep per-forward state for backward on
    themselves and two forwards at once would overwrite each other's.
    """
    idx = _checked_prompt(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, "generate_stream")
    steps = _sample_steps(model, idx, max_new_tokens, temperature, top_k, top_p, seed, True, eos_id, lock)
    return (to_numpy(nxt).astype("int64") for nxt in steps)


# ---------------------------------------------------------------------------
# beam search
# ---------------------------------------------------------------------------


def _host_log_softmax(logits):
    """log softmax of (B, V) logits, in float64 on the host (beam scores add up many of them)."""
    x = to_numpy(logits).astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _reorder_caches(caches, parents):
    """Row i of every cache becomes a copy of row parents[i] (beams that survive, duplicated where they branch)."""
    for cache in caches:
        cache.k = cache.k[parents]
        cache.v = cache.v[parents]


def _next_logits(model, prompt, tokens, caches, use_cache):
    """Next-token logits (n, V) of each beam prompt + tokens[i]; feeds the caches where they still apply."""
    block = model.config.block_size
    n = tokens.shape[0]
    seqs = np.concatenate([np.repeat(prompt[None], n, axis=0), tokens], axis=1)
    if not use_cache or seqs.shape[1] > block:
        # past the context the positions shift: recompute the window, as generate() does
        return model.forward(seqs[:, -block:])[0][:, -1, :], None
    if caches is None:  # prefill: the prompt once, shared by every beam
        caches = model.new_kv_caches(1)
        return model.forward(prompt[None], kv_caches=caches)[0][:, -1, :], caches
    return model.forward(seqs[:, -1:], kv_caches=caches)[0][:, -1, :], caches


def _top_candidates(scores, n):
    """Indices of the n highest scores, best first, ties to the lower index (as argmax), in O(len) time.

    2k candidates always leave k that do not end the beam (each beam has one
    eos candidate). Partitioning finds the n-th score; everything at least as
    high is kept, so ties at the cut are decided by index, not by chance.
    """
    if n >= scores.size:
        return np.argsort(-scores, kind="stable")
    cut = np.partition(scores, scores.size - n)[scores.size - n]
    keep = np.flatnonzero(scores >= cut)
    return keep[np.lexsort((keep, -scores[keep]))][:n]


def beam_search(model, idx, beam_width=4, max_new_tokens=100, length_penalty=1.0, eos_id=None, use_cache=True):
    """The ``beam_width`` most probable continuations of one prompt, kept ``beam_width`` at a time.

    ``idx`` is one prompt: (T,) or (1, T) token ids. Each step extends every
    live beam by every token, scores the candidates by their total
    log-probability ``sum log p(token | prefix)`` and keeps the best
    ``beam_width``. A candidate ending in ``eos_id`` (among the top
    ``beam_width``) is finished; it leaves the beam with the score

        score = log p(new tokens) / len(new tokens) ** length_penalty

    (0: raw log-probability, which favours short answers; 1: mean log-prob per
    token). Beams still running after ``max_new_tokens`` are scored the same
    way. The search stops early once ``beam_width`` hypotheses are finished
    and no live beam can beat the worst of them any more (log-probabilities
    only fall, so a live beam's best possible score is bounded).

    Returns ``(sequences, scores)``, best first: up to ``beam_width`` host
    int64 arrays (the prompt, then the new tokens, ending with ``eos_id``
    where finished) and their float scores. Width 1 is greedy decoding, and
    ends at the first ``eos_id`` greedy picks. With ``use_cache`` each step runs one token per beam
    against key/value caches reordered to follow the surviving beams.
    """
    prompt = np.asarray(to_numpy(idx) if hasattr(idx, "shape") else idx)
    check_int(prompt, "beam_search: idx")
    prompt = prompt.astype(np.int64)
    if prompt.ndim == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"beam_search: idx must be one prompt, (T,) or (1, T) with T >= 1, got shape {prompt.shape}")
    if int(beam_width) < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    V = model.config.vocab_size
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {V})")
    if max_new_tokens == 0:
        return [prompt.copy()], [0.0]
    k, alpha = int(beam_width), float(length_penalty)
    if not -10 <= alpha <= 10:  # (beyond, n ** alpha overflows for long outputs; nan fails this too)
        raise ValueError(f"length_penalty must be a number in [-10, 10], got {length_penalty}")

    def score(logp, n_new):
        return logp / n_new ** alpha

    tokens = np.zeros((1, 0), dtype=np.int64)  # the live beams' new tokens
    logps = np.zeros(1)                          # and their log-probabilities
    finished = []                                # (score, tokens) of beams that emitted eos_id
    caches = None
    with model.evaluating():
        for step in range(max_new_tokens):
            logits, caches = _next_logits(model, prompt, tokens, caches, use_cache)
            cand = (logps[:, None] + _host_log_softmax(logits)).ravel()
            order = _top_candidates(cand, 2 * k)
            parents, new = [], []
            for rank, c in enumerate(order.tolist()):
                parent, token = divmod(c, V)
                if token == eos_id:
                    if rank < k:  # an eos below the top k would not have been kept as a beam either
                        finished.append((score(cand[c], step + 1), np.append(tokens[parent], token)))
                    continue
                parents.append(parent)
                new.append(token)
                if len(parents) == k:
                    break
            finished = sorted(finished, key=lambda f: -f[0])[:k]
            if not parents or k == 1 and finished:
                # (width 1 is greedy decoding, whatever the length penalty: its one hypothesis ends at
                # the first eos_id it picks, as Hugging Face's num_beams=1 does, instead of racing a
                # second-best continuation that a longer mean log-prob could make win)
                tokens, logps = tokens[:0], logps[:0]
                break
            parents = np.asarray(parents)
            tokens = np.concatenate([tokens[parents], np.asarray(new)[:, None]], axis=1)
            logps = cand[parents * V + np.asarray(new)]
            if caches is not None:
                _reorder_caches(caches, model.backend.asarray(parents))
            if len(finished) == k and step + 1 < max_new_tokens:
                # The best a live beam can still reach: its log-prob can only fall, and
                # divided by n ** alpha it is highest at the longest length (alpha >= 0)
                # or at the next one (alpha < 0).
                n_best = max_new_tokens if alpha >= 0 else step + 2
                if finished[-1][0] >= score(logps.max(), n_best):
                    tokens, logps = tokens[:0], logps[:0]
                    break
    pool = finished + [(score(lp, tokens.shape[1]), t) for lp, t in zip(logps.tolist(), tokens)]
    pool.sort(key=lambda f: -f[0])  # stable: earlier (finished, higher-ranked) hypotheses win ties
    pool = pool[:k]
    return [np.concatenate([prompt, t]) for _, t in pool], [float(s) for s, _ in pool]


def sequence_logprob(model, idx, continuation):
    """log p(continuation | idx), summed over its tokens (float64), each token seen with at most block_size before it."""
    prompt, cont = np.asarray(to_numpy(idx)).reshape(-1), np.asarray(to_numpy(continuation)).reshape(-1)
    check_int(prompt, "sequence_logprob: idx")  # a float id would be truncated to a different token
    if cont.size:  # (an empty list is float64 to NumPy)
        check_int(cont, "sequence_logprob: continuation")
    if prompt.size == 0:
        raise ValueError("sequence_logprob: idx must hold at least one token to condition on")
    prompt, cont = prompt.astype(np.int64), cont.astype(np.int64)
    seq = np.concatenate([prompt, cont])
    block = model.config.block_size
    with model.evaluating():
        total = 0.0
        for i in range(len(prompt), len(seq)):  # one forward per token: clear, and this is for checking
            logp = _host_log_softmax(model.forward(seq[None, max(0, i - block) : i])[0][:, -1, :])[0]
            total += logp[seq[i]]
    return float(total)


# GPT's decoding methods are these functions (their first argument is the model, so they bind as
# methods): the models sit below this module and never import it; ``import npflux`` loads this module,
# so every GPT has them.
GPT.generate = generate
GPT.beam_search = beam_search

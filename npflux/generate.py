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
    """One token id per row of logits (B, V); temperature 0 is greedy (argmax).

    ``rng`` is one random Generator for the whole batch, or a list of B, one per
    row: then row b's draw comes from its own stream, so its samples do not
    depend on which rows share its batch.
    """
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
    if isinstance(rng, (list, tuple)):
        u = xp.concatenate([r.random((1, 1), dtype=cdf.dtype) for r in rng])
    else:
        u = rng.random((logits.shape[0], 1), dtype=cdf.dtype)
    u = u * cdf[:, -1:]
    return xp.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, vocab_size):
    """Every sampling argument checked up front, so a bad one fails even where it would go unused."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:  # it could never be sampled
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {vocab_size})")


def _checked_prompts(model, idx, name):
    """``(prompts, ragged)``: the prompts as host int64 arrays, and whether they came as a list.

    A (B, T) array is B prompts of one length; a list (or tuple) holds prompts
    of any lengths, each a sequence of token ids (at least one).
    """
    if isinstance(idx, (list, tuple)) and (len(idx) == 0 or not np.isscalar(idx[0])):
        if len(idx) == 0:
            raise ValueError(f"{name}: the list of prompts is empty")
        prompts = []
        for i, p in enumerate(idx):
            p = np.asarray(to_numpy(p) if hasattr(p, "shape") else p)
            if p.size:
                check_int(p, f"{name}: prompt {i}")
            if p.ndim != 1 or p.size == 0:
                raise ValueError(f"{name}: prompt {i} must be a 1-d sequence of at least one token id, "
                                 f"got shape {p.shape}")
            prompts.append(p.astype(np.int64))
        return prompts, True
    check_int(idx, f"{name}: idx")
    arr = np.asarray(to_numpy(idx) if hasattr(idx, "shape") else idx)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name}: idx must be (B, T) with T >= 1, or a list of prompts, got shape {arr.shape}")
    return [row.astype(np.int64) for row in arr], False


def row_seeds(seed, n):
    """Each row's own seed: a list gives them one by one; an int s gives row b the seed s + b
    (so row b alone, with seed s + b, samples the same tokens); None leaves every row unseeded."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"seed: {len(seed)} seeds for {n} prompts")
        return list(seed)
    return [None if seed is None else int(seed) + b for b in range(n)]


# ---------------------------------------------------------------------------
# a batch of sequences, each decoded as if alone
# ---------------------------------------------------------------------------


class Sequence:
    """One sequence being decoded: its tokens, its sampling settings, its own random generator.

    ``finish_reason`` is None while it runs, then "stop" (it produced ``eos_id``,
    which ends it) or "length" (``max_new_tokens`` reached). ``fed`` is how many
    of ``tokens`` its cache row holds.
    """

    def __init__(self, model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 eos_id=None):
        _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, model.config.vocab_size)
        if len(prompt) == 0:
            raise ValueError("Sequence: the prompt must hold at least one token (there is nothing to condition on)")
        self.tokens, self.n_prompt = [int(t) for t in prompt], len(prompt)
        self.max_new_tokens, self.eos_id = int(max_new_tokens), eos_id
        self.sampling = (float(temperature), top_k, top_p)
        self.rng, self.seed = model.backend.rng(seed), seed
        self.fed, self.finish_reason = 0, None if max_new_tokens > 0 else "length"

    @property
    def new_tokens(self):
        return self.tokens[self.n_prompt:]

    def _to_feed(self, block, use_cache):
        """(restart, tokens to feed): the whole window from position 0 when the cache is empty,
        unused, or full (past block_size the positions shift, as generate() has always done), else
        only what the cache lacks."""
        if not use_cache or self.fed == 0 or len(self.tokens) > block:
            return True, self.tokens[-block:]
        return False, self.tokens[self.fed:]

    def _took(self, token):
        self.fed = len(self.tokens)
        self.tokens.append(token)
        if self.eos_id is not None and token == self.eos_id:
            self.finish_reason = "stop"
        elif len(self.tokens) - self.n_prompt >= self.max_new_tokens:
            self.finish_reason = "length"


class DecodeBatch:
    """Sequences of different lengths decoded together: one forward per step for all that decode.

    Rows are right-padded (see ``nn.RowLayout``): row i of the key/value caches
    holds sequence i's positions from 0, as it would alone; each row feeds only
    what its cache lacks (its whole prompt on its first step, one token after),
    so a sequence can join at any step and leave as soon as it finishes,
    without waiting for the others. All rows that feed one token share one
    forward; a step where some rows feed more (a prompt that joined) runs
    those in a second forward (see ``step``). The live rows are kept at the
    front of the caches: one that leaves is replaced by the last. A server's
    scheduler and ``generate`` over a list of prompts both decode this way.

    ``lock`` (a ``threading.Lock`` or None) is held around each forward, with
    the model in eval mode: its modules keep per-forward state on themselves.
    """

    def __init__(self, model, capacity, use_cache=True, lock=None):
        if capacity < 1:
            raise ValueError(f"DecodeBatch: capacity must be >= 1, got {capacity}")
        self.model, self.capacity, self.use_cache = model, int(capacity), use_cache
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.caches = model.new_kv_caches(self.capacity) if use_cache else None
        self.rows = []

    def __len__(self):
        return len(self.rows)

    def add(self, seq):
        """Seq joins at the next step (it must not have finished already)."""
        if len(self.rows) >= self.capacity:
            raise RuntimeError(f"DecodeBatch is full ({self.capacity} rows)")
        seq.fed = 0
        self.rows.append(seq)

    def remove(self, seq):
        """Seq leaves now; the last row moves into its place (its cache row with it)."""
        i, last = self.rows.index(seq), len(self.rows) - 1
        if i != last and self.caches is not None:
            for cache in self.caches:
                cache.move_row(last, i)
        self.rows[i] = self.rows[last]
        self.rows.pop()

    def step(self):
        """Every row's next token; returns [(seq, token)], and removes the rows that finished.

        Rows feeding one token (decoding) share one forward. Rows feeding more
        (a prompt that just joined, a window recomputed past block_size) take a
        second one, so a long prompt does not pad every decoding row to its
        length: padded, B rows of T tokens cost B * T, where decoding needs B.
        """
        if not self.rows:
            return []
        block = self.model.config.block_size
        feeds = [seq._to_feed(block, self.use_cache) for seq in self.rows]
        counts = np.array([len(toks) for _, toks in feeds], dtype=np.int64)
        for b, (restart, _) in enumerate(feeds):
            if restart and self.caches is not None:
                for cache in self.caches:
                    cache.reset_row(b)
        groups = [np.flatnonzero(counts == 1), np.flatnonzero(counts > 1)]
        if min(len(g) for g in groups) == 0:
            groups = [np.arange(len(self.rows))]  # all alike: one forward over rows 0..B-1
        logits = [self._forward(g, [feeds[b][1] for b in g], counts[g]) for g in groups]
        tokens = np.empty(len(self.rows), dtype=np.int64)
        for g, lg in zip(groups, logits):
            tokens[g] = self._sample(lg, g)
        out = []
        for seq, token in zip(list(self.rows), tokens.tolist()):
            seq._took(token)
            out.append((seq, token))
        for seq in [s for s in self.rows if s.finish_reason is not None]:
            self.remove(seq)
        return out

    def _forward(self, rows, feeds, counts):
        """The next-token logits (n, V) of the given rows: their feeds right-padded, one forward."""
        idx = np.zeros((len(rows), int(counts.max())), dtype=np.int64)
        for i, toks in enumerate(feeds):
            idx[i, : len(toks)] = toks
        # eval mode for the forward; a model already in it (a server's) skips the walk over its modules
        mode = self.model.evaluating() if self.model.training else contextlib.nullcontext()
        with self.lock, mode:
            logits, _ = self.model.forward(idx, kv_caches=self.caches, lengths=counts,
                                           cache_rows=rows if self.caches is not None else None)
        xp = self.model.xp
        return logits[xp.arange(len(rows)), self.model.backend.asarray(counts - 1)]  # each row's last real token

    def _sample(self, logits, rows):
        """One token for each of ``rows`` (logits (n, V)), host int64: rows with the same settings
        are sampled together, each from its own random generator."""
        tokens = np.empty(len(rows), dtype=np.int64)
        groups = {}
        for i, b in enumerate(rows):
            groups.setdefault(self.rows[b].sampling, []).append(i)
        for (temperature, top_k, top_p), members in groups.items():
            picked = logits[self.model.backend.asarray(members)] if len(members) < len(rows) else logits
            rngs = [self.rows[rows[i]].rng for i in members]
            tokens[members] = to_numpy(sample_next(picked, temperature, top_k, top_p, rngs))
        return tokens


def _sequences(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id):
    seeds = row_seeds(seed, len(prompts))
    return [Sequence(model, p, max_new_tokens, temperature, top_k, top_p, s, eos_id) for p, s in zip(prompts, seeds)]


def _decode_steps(model, seqs, use_cache, lock):
    """Yield, per step, the (B,) host int64 tokens of every sequence: -1 for one that has finished."""
    batch = DecodeBatch(model, len(seqs), use_cache=use_cache, lock=lock)
    where = {id(s): b for b, s in enumerate(seqs)}
    for seq in seqs:
        if seq.finish_reason is None:
            batch.add(seq)
    while len(batch):
        step = np.full(len(seqs), -1, dtype=np.int64)
        for seq, token in batch.step():
            step[where[id(seq)]] = token
        yield step


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, use_cache=True,
             eos_id=None):
    """Sampled continuations (model in eval mode), of a (B, T) array or of a list of prompts.

    - idx (B, T) int -> (B, T + n) on the model's backend: n = max_new_tokens,
      or fewer when ``eos_id`` is given and every row has produced it (a row
      that finished first runs on; cut it at its [EOS]).
    - idx a list of prompts of any lengths -> a list of host int64 arrays, each
      the prompt and its new tokens, ending at its own ``eos_id`` or after
      ``max_new_tokens``.

    Either way each row is decoded as if alone: its positions count from its
    own start, it never sees another row or padding, and it samples from its own
    generator (``seed``: an int s gives row b the seed s + b; a list gives one
    seed per row). So row b equals ``generate(model, [prompt_b], ..., seed=s_b)``
    — the same tokens, up to the rounding of a batched forward (see the tests).
    """
    prompts, ragged = _checked_prompts(model, idx, "generate")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, model.config.vocab_size)
    seqs = _sequences(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id if ragged else None)
    steps = _decode_steps(model, seqs, use_cache, None)
    if ragged:
        for _ in steps:
            pass
        return [np.asarray(s.tokens, dtype=np.int64) for s in seqs]
    done = np.zeros(len(seqs), dtype=bool)
    for step in steps:  # rows run on past eos_id; all stop once every row has produced it
        if eos_id is not None:
            done |= step == eos_id
            if done.all():
                break
    n = min(len(s.new_tokens) for s in seqs)
    out = np.array([s.tokens[: s.n_prompt + n] for s in seqs], dtype=getattr(idx, "dtype", np.int64))
    return model.backend.asarray(out)


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, lock=None,
                    eos_id=None):
    """An iterator over the new tokens, one host int64 array (B,) per step: the tokens that
    ``generate`` appends with the same arguments and seed, as soon as each is sampled.

    With a list of prompts, a row that has finished (its ``eos_id``, or its
    ``max_new_tokens``) shows -1 from the next step on, and the stream ends
    when every row has. The arguments are checked here, before the first token.
    Each stream owns its key/value caches and random generators, so several may
    run at once on one model; give them all the same ``lock`` (a
    ``threading.Lock``), held around each forward, because the modules keep
    per-forward state for backward on themselves and two forwards at once would
    overwrite each other's.
    """
    prompts, ragged = _checked_prompts(model, idx, "generate_stream")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, model.config.vocab_size)
    seqs = _sequences(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id if ragged else None)
    steps = _decode_steps(model, seqs, True, lock)
    return steps if ragged else _until_all_ended(steps, eos_id)


def _until_all_ended(steps, eos_id):
    """A (B, T) stream: every row runs on past eos_id, and the stream ends once all have produced it."""
    done = None
    for step in steps:
        yield step
        if eos_id is not None:
            done = (step == eos_id) if done is None else (done | (step == eos_id))
            if done.all():
                return


# ---------------------------------------------------------------------------
# beam search
# ---------------------------------------------------------------------------


def _host_log_softmax(logits):
    """log softmax of (B, V) logits, in float64 on the host (beam scores add up many of them)."""
    x = to_numpy(logits).astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Beams:
    """One prompt's beam search: its live beams, their log-probabilities, its finished hypotheses.

    ``advance`` takes the next-token log-probabilities of the live beams and
    keeps the best ``k`` extensions (the search described in ``beam_search``);
    ``done`` is set once nothing can change the result.
    """

    def __init__(self, prompt, k, max_new_tokens, alpha, eos_id, vocab_size):
        self.prompt, self.k, self.max_new_tokens, self.alpha = prompt, k, max_new_tokens, alpha
        self.eos_id, self.V = eos_id, vocab_size
        self.tokens = np.zeros((1, 0), dtype=np.int64)  # the live beams' new tokens
        self.logps = np.zeros(1)                          # and their log-probabilities
        self.finished = []                                # (score, tokens) of beams that emitted eos_id
        self.step, self.done = 0, max_new_tokens == 0

    def score(self, logp, n_new):
        return logp / n_new ** self.alpha

    def sequences(self):
        """The live beams as whole sequences (prompt + new tokens), one host array each."""
        return [np.concatenate([self.prompt, t]) for t in self.tokens]

    def advance(self, logp):
        """Keep the best k extensions of the live beams (logp: their (n, V) log-probabilities);
        returns each new live beam's parent (an index into the old ones)."""
        k, V, step = self.k, self.V, self.step
        cand = (self.logps[:, None] + logp).ravel()
        parents, new = [], []
        for rank, c in enumerate(_top_candidates(cand, 2 * k).tolist()):
            parent, token = divmod(c, V)
            if token == self.eos_id:
                if rank < k:  # an eos below the top k would not have been kept as a beam either
                    self.finished.append((self.score(cand[c], step + 1), np.append(self.tokens[parent], token)))
                continue
            parents.append(parent)
            new.append(token)
            if len(parents) == k:
                break
        self.finished = sorted(self.finished, key=lambda f: -f[0])[:k]
        self.step = step + 1
        if not parents or k == 1 and self.finished:
            # (width 1 is greedy decoding, whatever the length penalty: its one hypothesis ends at
            # the first eos_id it picks, as Hugging Face's num_beams=1 does, instead of racing a
            # second-best continuation that a longer mean log-prob could make win)
            return self._stop()
        parents = np.asarray(parents)
        self.tokens = np.concatenate([self.tokens[parents], np.asarray(new)[:, None]], axis=1)
        self.logps = cand[parents * V + np.asarray(new)]
        if self.step >= self.max_new_tokens:
            self.done = True
        elif len(self.finished) == k:
            # The best a live beam can still reach: its log-prob can only fall, and
            # divided by n ** alpha it is highest at the longest length (alpha >= 0)
            # or at the next one (alpha < 0).
            n_best = self.max_new_tokens if self.alpha >= 0 else self.step + 1
            if self.finished[-1][0] >= self.score(self.logps.max(), n_best):
                return self._stop()
        return parents

    def _stop(self):
        self.tokens, self.logps, self.done = self.tokens[:0], self.logps[:0], True
        return np.zeros(0, dtype=np.int64)

    def result(self):
        if self.max_new_tokens == 0:
            return [self.prompt.copy()], [0.0]
        pool = self.finished + [(self.score(lp, self.tokens.shape[1]), t) for lp, t in zip(self.logps.tolist(), self.tokens)]
        pool.sort(key=lambda f: -f[0])  # stable: earlier (finished, higher-ranked) hypotheses win ties
        pool = pool[: self.k]
        return [np.concatenate([self.prompt, t]) for _, t in pool], [float(s) for s, _ in pool]


def _beam_logits(model, seqs, caches):
    """Next-token log-probabilities (n, V) of every row's sequence, in ONE right-padded forward.

    Each row feeds what its cache row lacks (the prompt on the first step, then
    one token); a row past block_size recomputes its last block from position 0,
    as generate() does, and without caches every row does.
    """
    block = model.config.block_size
    feeds = []
    for r, seq in enumerate(seqs):
        held = int(caches[0].lengths[r]) if caches is not None else 0
        if caches is None or held == 0 or len(seq) > block:
            if caches is not None:
                for cache in caches:
                    cache.reset_row(r)
            feeds.append(seq[-block:])
        else:
            feeds.append(seq[held:])
    counts = np.array([len(f) for f in feeds], dtype=np.int64)
    idx = np.zeros((len(seqs), int(counts.max())), dtype=np.int64)
    for r, f in enumerate(feeds):
        idx[r, : len(f)] = f
    logits, _ = model.forward(idx, kv_caches=caches, lengths=counts)
    return _host_log_softmax(logits[model.xp.arange(len(seqs)), model.backend.asarray(counts - 1)])


def _beam_prompts(idx):
    """(prompts as host int64 arrays, whether a list of several was given)."""
    if isinstance(idx, (list, tuple)) and idx and not np.isscalar(idx[0]):
        many = [np.asarray(to_numpy(p) if hasattr(p, "shape") else p) for p in idx]
    else:
        one = np.asarray(to_numpy(idx) if hasattr(idx, "shape") else idx)
        many = [one[0] if one.ndim == 2 and one.shape[0] == 1 else one]
    for i, p in enumerate(many):
        if p.size:
            check_int(p, "beam_search: idx")
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"beam_search: idx must be one prompt, (T,) or (1, T) with T >= 1, or a list of them; "
                             f"prompt {i} has shape {p.shape}")
    return [p.astype(np.int64) for p in many], isinstance(idx, (list, tuple)) and len(many) > 0 and \
        not np.isscalar(idx[0])


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
    """The ``beam_width`` most probable continuations of a prompt, kept ``beam_width`` at a time.

    ``idx`` is one prompt: (T,) or (1, T) token ids; or a list of prompts of any
    lengths, searched together (every live beam of every prompt in one forward
    per step, right-padded, each prompt's beams in their own cache rows), each
    with the result it would have alone. Each step extends every live beam by
    every token, scores the candidates by their total log-probability
    ``sum log p(token | prefix)`` and keeps the best ``beam_width``. A
    candidate ending in ``eos_id`` (among the top ``beam_width``) is finished;
    it leaves the beam with the score

        score = log p(new tokens) / len(new tokens) ** length_penalty

    (0: raw log-probability, which favours short answers; 1: mean log-prob per
    token). Beams still running after ``max_new_tokens`` are scored the same
    way. A prompt's search stops early once ``beam_width`` hypotheses are
    finished and no live beam can beat the worst of them any more
    (log-probabilities only fall, so a live beam's best possible score is
    bounded).

    Returns ``(sequences, scores)``, best first: up to ``beam_width`` host
    int64 arrays (the prompt, then the new tokens, ending with ``eos_id``
    where finished) and their float scores; for a list of prompts, a list of
    such pairs. Width 1 is greedy decoding, and ends at the first ``eos_id``
    greedy picks. With ``use_cache`` each step runs one token per beam against
    key/value caches reordered to follow the surviving beams.
    """
    prompts, many = _beam_prompts(idx)
    if int(beam_width) < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    V = model.config.vocab_size
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {V})")
    k, alpha = int(beam_width), float(length_penalty)
    if not -10 <= alpha <= 10:  # (beyond, n ** alpha overflows for long outputs; nan fails this too)
        raise ValueError(f"length_penalty must be a number in [-10, 10], got {length_penalty}")
    searches = [_Beams(p, k, max_new_tokens, alpha, eos_id, V) for p in prompts]
    caches = model.new_kv_caches(k * len(prompts)) if use_cache and max_new_tokens > 0 else None
    with model.evaluating():
        while live := [b for b in searches if not b.done]:
            rows = [seq for b in live for seq in b.sequences()]
            logp = _beam_logits(model, rows, caches)
            order, start = [], 0  # the cache rows of the next step: each prompt's surviving beams, in order
            for b in live:
                n = b.tokens.shape[0]
                parents = b.advance(logp[start : start + n])
                if not b.done:  # a finished search's rows leave the batch
                    order.extend((start + parents).tolist())
                start += n
            if caches is not None and order:
                for cache in caches:
                    cache.take_rows(model.backend.asarray(order))
    results = [b.result() for b in searches]
    return results if many else results[0]


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

"""Sampling from a GPT: greedy, temperature, top-k, top-p, with a key/value cache.

With the cache, the prompt is run once (prefill) and each new token is one
forward of length 1 that attends to the cached keys and values: O(T) work per
token instead of O(T^2). When the sequence reaches block_size the positions
shift, the cache no longer applies, and the window is recomputed, exactly as
the uncached path crops to the last block_size tokens, so both give the same
tokens.
"""
from .backend import check_int, get_array_module


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
    if temperature == 0:
        return xp.argmax(logits, axis=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    cdf = xp.cumsum(probs, axis=-1)
    u = rng.random((logits.shape[0], 1), dtype=cdf.dtype) * cdf[:, -1:]
    return xp.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, use_cache=True):
    """idx (B, T) int -> (B, T + max_new_tokens) with sampled continuations (model in eval mode)."""
    check_int(idx, "generate: idx")
    xp = model.xp
    idx = model.backend.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate: idx must be (B, T) with T >= 1, got shape {idx.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    # checked up front, so a bad argument fails even when it would go unused (greedy, 0 tokens)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rng = model.backend.rng(seed)
    block = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        caches, fed = None, 0  # fed: how many tokens of idx the caches hold
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model.forward(idx[:, -block:])
            else:
                if caches is None or idx.shape[1] > block:
                    # (re)start: prefill with the last `block` tokens
                    caches = model.new_kv_caches(idx.shape[0])
                    window = idx[:, -block:]
                    logits, _ = model.forward(window, kv_caches=caches)
                else:
                    logits, _ = model.forward(idx[:, fed:], kv_caches=caches)
                fed = idx.shape[1]
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, rng)
            idx = xp.concatenate([idx, nxt[:, None].astype(idx.dtype)], axis=1)
    finally:
        model.train(was_training)
    return idx


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, lock=None):
    """An iterator over the new tokens, one host int64 array (B,) per step: the tokens that
    ``generate`` appends with the same arguments and seed, as soon as each is sampled.

    The arguments are checked here, before the first token. Each stream owns its
    key/value caches and random generator, so several may run at once on one model (a
    server's requests); give them all the same ``lock`` (a ``threading.Lock``), held
    around each forward, because the modules keep per-forward state for backward on
    themselves and two forwards at once would overwrite each other's. Under the lock the
    model runs in eval mode.
    """
    import contextlib

    from .backend import to_numpy

    check_int(idx, "generate_stream: idx")
    idx = model.backend.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate_stream: idx must be (B, T) with T >= 1, got shape {idx.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    lock = lock if lock is not None else contextlib.nullcontext()

    def tokens(idx):
        xp, rng, block = model.xp, model.backend.rng(seed), model.config.block_size
        caches, fed = None, 0  # as in generate: restart the caches when the window slides
        for _ in range(max_new_tokens):
            with lock:
                was_training = model.training
                model.eval()
                try:
                    if caches is None or idx.shape[1] > block:
                        caches = model.new_kv_caches(idx.shape[0])
                        logits, _ = model.forward(idx[:, -block:], kv_caches=caches)
                    else:
                        logits, _ = model.forward(idx[:, fed:], kv_caches=caches)
                finally:
                    model.train(was_training)
            fed = idx.shape[1]
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, rng)
            idx = xp.concatenate([idx, nxt[:, None].astype(idx.dtype)], axis=1)
            yield to_numpy(nxt).astype("int64")

    return tokens(idx)

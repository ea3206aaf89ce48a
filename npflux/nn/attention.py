"""Multi-head attention: self-attention (causal or not) and cross-attention."""
from .. import ops
from ..backend import get_backend
from .layers import INIT_STD, Dropout, Linear, _host_rng
from .module import Module

np = get_backend("numpy").xp  # the host's array module: per-row lengths, offsets and index arrays live there


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Preallocated to ``max_len`` so each decoding step writes one slot instead
    of copying the whole history. Two ways to fill it:

    - aligned: ``append(k, v)`` adds the same number of positions to every row
      (``length`` counts them);
    - per row: ``append(k, v, rows)`` with a ``RowLayout`` writes each row's
      real tokens at that row's own next positions, so the rows of one batch
      hold sequences of different lengths (``lengths``, one per row), each
      laid out exactly as it would be alone. A batch that mixes requests of
      different lengths (a server's) decodes this way.
    """

    def __init__(self, xp, batch, n_head, max_len, head_dim, dtype):
        # zeros, not empty: a per-row batch reads slots past a short row's end (masked, weight 0),
        # and 0 * v is 0 only when v is finite; uninitialised memory may hold NaN or inf
        self.k = xp.zeros((batch, n_head, max_len, head_dim), dtype=dtype)
        self.v = xp.zeros((batch, n_head, max_len, head_dim), dtype=dtype)
        self.length = 0
        self.lengths = np.zeros(batch, dtype=np.int64)

    def append(self, k, v, rows=None):
        """Store new keys and values (B, H, T, D); return every stored one (B, H, Tk, D).

        With ``rows`` (a ``RowLayout``), only each row's real tokens are stored, and
        the keys returned run to the longest row's end (``rows.n_keys``); the layout's
        mask hides what lies beyond each row's own end.
        """
        if rows is not None:
            return self._append_rows(k, v, rows)
        T = k.shape[2]
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"KV cache is full ({self.k.shape[2]} positions)")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        self.lengths[:] = self.length
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def _append_rows(self, k, v, rows):
        if rows.ends.max(initial=0) > self.k.shape[2]:
            raise ValueError(f"KV cache is full ({self.k.shape[2]} positions)")
        # k (B, H, T, D) -> (B, T, H, D): [b, t] picks the (N, H, D) real tokens, and
        # self.k[row, :, slot] with row, slot index arrays is (N, H, D) too.
        if rows.uniform:
            B, T, off = len(rows.ends), k.shape[2], int(rows.offsets[0])
            self.k[:B, :, off : off + T] = k
            self.v[:B, :, off : off + T] = v
            self.lengths[:B] = rows.ends
            self.length = None
            return self.k[:B, :, : rows.n_keys], self.v[:B, :, : rows.n_keys]
        b, t, slot = rows.device_index
        cache_row = rows.device_cache_rows[b] if rows.device_cache_rows is not None else b
        self.k[cache_row, :, slot] = k.transpose(0, 2, 1, 3)[b, t]
        self.v[cache_row, :, slot] = v.transpose(0, 2, 1, 3)[b, t]
        self.lengths[rows.cache_rows] = rows.ends
        self.length = None  # the rows differ now: only ``lengths`` holds
        if rows.device_cache_rows is None:  # rows 0..B-1: a view
            return self.k[: len(rows.ends), :, : rows.n_keys], self.v[: len(rows.ends), :, : rows.n_keys]
        return self.k[rows.device_cache_rows, :, : rows.n_keys], self.v[rows.device_cache_rows, :, : rows.n_keys]

    def reset_row(self, row):
        """Row ``row`` starts over (a new sequence, or a window recomputed from position 0)."""
        self.lengths[row] = 0

    def take_rows(self, rows):
        """Rows 0..n-1 become copies of rows ``rows`` (n of them; repeats allowed): beam search's
        surviving beams, duplicated where they branch."""
        n = len(rows)
        self.k[:n] = self.k[rows]
        self.v[:n] = self.v[rows]
        self.lengths[:n] = self.lengths[np.asarray(rows.get() if hasattr(rows, "get") else rows)]

    def move_row(self, src, dst):
        """Row ``dst`` becomes a copy of row ``src`` (keeps a batch's live rows at the front)."""
        n = int(self.lengths[src])
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]
        self.lengths[dst] = n


class RowLayout:
    """Where the tokens of a right-padded batch sit, when each row is a sequence of its own.

    Row b of a (B, T) input holds ``counts[b]`` real tokens, then padding. They
    are positions ``offsets[b] .. offsets[b] + counts[b] - 1`` of row b's own
    sequence (``offsets[b]``: how many its cache already holds; 0 without a
    cache). So each row's positions count from its own start, and

        query i of row b may see key j  iff  j <= offsets[b] + i  and  j < offsets[b] + counts[b]

    (causal within the row, and blind to the row's padding). ``cache_rows``: the
    cache rows the batch's rows are (default 0..B-1), so a forward may feed a
    subset of a batch's sequences. Why right padding:
    a row's tokens then sit at the same cache slots as they would alone, so a
    row can join a running batch, leave it, or restart its window without
    moving any other row; left padding aligns the rows' ends, which needs every
    row to grow in lockstep. Padding queries see their row's real keys (never
    nothing, so no NaN) and their outputs are ignored.
    """

    def __init__(self, xp, offsets, counts, T, n_keys=None, max_position=None, cache_rows=None):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.offsets.shape != self.counts.shape or self.offsets.ndim != 1:
            raise ValueError(f"RowLayout: offsets {self.offsets.shape} and counts {self.counts.shape} must be (B,)")
        if (self.counts < 0).any() or (self.counts > T).any() or (self.offsets < 0).any():
            raise ValueError(f"RowLayout: counts must lie in [0, {T}] and offsets be >= 0")
        self.ends = self.offsets + self.counts
        self.n_keys = int(self.ends.max(initial=0)) if n_keys is None else n_keys
        pos = self.offsets[:, None] + np.arange(T)                  # (B, T): each row counts from its start
        if max_position is not None:
            pos = np.minimum(pos, max_position)                      # (padding only: real ones were checked)
        self.positions = xp.asarray(pos)
        B = len(self.counts)
        contiguous = cache_rows is None or np.array_equal(cache_rows, np.arange(B))
        self.cache_rows = np.arange(B) if contiguous else np.asarray(cache_rows, dtype=np.int64)
        self.device_cache_rows = None if contiguous else xp.asarray(self.cache_rows)
        # Every row at the same offset with no padding (one prompt, or a step of equal rows): the mask
        # is then the plain causal one aligned at the end, which attention applies faster as a bias,
        # and the cache takes the new keys as one slice.
        self.uniform = bool(B and contiguous and (self.counts == T).all() and (self.offsets == self.offsets[0]).all()
                            and self.n_keys == int(self.offsets[0]) + T)
        self.mask = None
        if not self.uniform:
            j = np.arange(self.n_keys)
            mask = (j <= pos[:, :, None]) & (j < self.ends[:, None, None])  # (B, T, Tk)
            self.mask = xp.asarray(mask[:, None])                          # (B, 1, T, Tk): every head alike
        b, t = np.nonzero(np.arange(T) < self.counts[:, None])             # the real tokens
        self.device_index = (xp.asarray(b), xp.asarray(t), xp.asarray(pos[b, t]))


def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, C/H)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D), the inverse of split_heads."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


class MultiHeadAttention(Module):
    """Multi-head scaled dot-product attention with an output projection.

    Self-attention (``cross=False``) projects q, k, v from x with ONE fused
    matrix ``c_attn`` (C, 3C), GPT-2's layout. Cross-attention (``cross=True``)
    projects q from x with ``q_proj`` (C, C) and k, v from a separate source
    ``context`` with ``kv_proj`` (C, 2C). ``c_proj`` mixes the heads.
    All heads go through one batched matmul: q, k, v are (B, H, T, D).
    """

    def __init__(self, dim, n_head, causal=False, cross=False, bias=True, qkv_bias=True, dropout=0.0,
                 proj_std=INIT_STD, rng=None, dropout_rng=None, backend=None, dtype=None):
        super().__init__(backend, dtype)
        if n_head <= 0 or dim % n_head != 0:
            raise ValueError(f"model width {dim} is not divisible by the number of heads {n_head}")
        if causal and cross:
            raise ValueError("cross-attention is not causal (every output may see the whole source)")
        rng = _host_rng(rng)
        self.n_head, self.causal, self.cross = n_head, causal, cross
        kw = dict(rng=rng, backend=backend, dtype=dtype)
        if cross:
            self.q_proj = Linear(dim, dim, bias=qkv_bias, **kw)
            self.kv_proj = Linear(dim, 2 * dim, bias=qkv_bias, **kw)
        else:
            self.c_attn = Linear(dim, 3 * dim, bias=qkv_bias, **kw)
        self.c_proj = Linear(dim, dim, bias=bias, std=proj_std, **kw)
        self.dropout = Dropout(dropout, rng=dropout_rng, backend=backend, dtype=dtype)
        self.weights = None

    def forward(self, x, context=None, mask=None, kv_cache=None, rows=None):
        """x (B, T, C); context (B, S, C) for cross-attention; mask broadcastable to (B, H, T, S).

        ``rows`` (self-attention only): a ``RowLayout``, when the rows of x are
        sequences of different lengths (right-padded). Its mask then replaces
        the causal one, which aligns every row at the same end.

        ``kv_cache``: in self-attention it gathers the keys and values of every
        position fed so far; in cross-attention it holds the context's, projected
        at the first call and read back at the later ones (a decoder then
        projects its memory once per source, not once per step).
        """
        if x.ndim != 3:
            raise ValueError(f"attention input must be (B, T, C), got shape {x.shape}")
        H = self.n_head
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context (the encoder output)")
            q = split_heads(self.q_proj.forward(x), H)
            if kv_cache is not None and kv_cache.length:
                cached = (kv_cache.k.shape[0], kv_cache.length)
                if tuple(context.shape[:2]) != cached:
                    raise ValueError(f"the cross-attention cache holds a context of (B, S) = {cached}, "
                                     f"got one of {tuple(context.shape[:2])}")
                k, v = kv_cache.k[:, :, : kv_cache.length], kv_cache.v[:, :, : kv_cache.length]
            else:
                k, v = (split_heads(a, H) for a in self._split(self.kv_proj.forward(context), 2))
                if kv_cache is not None:
                    k, v = kv_cache.append(k, v)
        else:
            q, k, v = (split_heads(a, H) for a in self._split(self.c_attn.forward(x), 3))
            if kv_cache is not None:
                k, v = kv_cache.append(k, v, rows)
        causal = self.causal
        if rows is not None:
            if mask is not None:
                raise ValueError("attention: give either a mask or a RowLayout, not both")
            mask, causal = (None, True) if rows.uniform else (rows.mask, False)
        y, self.attn_cache = ops.attention_forward(q, k, v, causal=causal, mask=mask)
        self.weights = self.attn_cache[3]  # (B, H, T, S), kept for heat maps and activation capture
        return self.dropout.forward(self.c_proj.forward(merge_heads(y)))

    @staticmethod
    def _split(a, n):
        C = a.shape[-1] // n
        return [a[..., i * C : (i + 1) * C] for i in range(n)]

    def backward(self, dy):
        """Returns dx for self-attention, (dx, dcontext) for cross-attention."""
        xp, H = self.xp, self.n_head
        dy_heads = split_heads(self.c_proj.backward(self.dropout.backward(dy)), H)
        if self.cross:
            dq, dk, dv = ops.attention_backward(dy_heads, self.attn_cache)
            dx = self.q_proj.backward(merge_heads(dq))
            dcontext = self.kv_proj.backward(xp.concatenate([merge_heads(dk), merge_heads(dv)], axis=-1))
            return dx, dcontext
        # dq, dk, dv land straight in the three column blocks of dqkv (B, T, 3C), the
        # layout c_attn's backward wants, instead of being merged and concatenated after.
        q = self.attn_cache[0]
        dqkv = xp.empty(q.shape[:1] + q.shape[2:3] + (3 * q.shape[1] * q.shape[3],), dtype=q.dtype)
        ops.attention_backward(dy_heads, self.attn_cache, out=[split_heads(a, H) for a in self._split(dqkv, 3)])
        return self.c_attn.backward(dqkv)

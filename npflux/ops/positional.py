"""Sinusoidal positional encoding (Vaswani et al., 2017)."""
from ..backend import get_backend, resolve_dtype


def sinusoidal_encoding(seq_len, dim, base=10000.0, dtype=None, xp=None):
    """PE[p, 2i] = sin(p / base^(2i/dim)),  PE[p, 2i+1] = cos(p / base^(2i/dim)).

    Returns a (seq_len, dim) array of ``dtype`` (float32 by default) in the
    array module ``xp`` (NumPy by default). It has no parameters, so a layer
    that adds it to its input passes the gradient straight through.
    """
    if seq_len < 0 or dim <= 0:
        raise ValueError(f"sinusoidal_encoding: need seq_len >= 0 and dim > 0, got {seq_len}, {dim}")
    if base <= 0:
        raise ValueError(f"sinusoidal_encoding: base must be positive, got {base}")
    xp = xp or get_backend("numpy").xp
    dtype = resolve_dtype(dtype)
    pos = xp.arange(seq_len, dtype="float64")[:, None]
    two_i = xp.arange(0, dim, 2, dtype="float64")[None, :]
    angle = pos / base ** (two_i / dim)
    pe = xp.empty((seq_len, dim), dtype="float64")
    pe[:, 0::2] = xp.sin(angle)
    pe[:, 1::2] = xp.cos(angle[:, : dim // 2])
    return pe.astype(dtype)

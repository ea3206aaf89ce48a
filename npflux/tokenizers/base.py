"""What every tokenizer shares: equality by vocabulary, and checking ids before decoding."""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy


class Tokenizer:
    """Base of the tokenizers: a subclass defines ``type``, ``vocab_size``,
    ``encode``, ``decode``, ``to_dict``/``from_dict`` and ``_identity()``, the
    data that fixes its ids (two tokenizers with equal identities give the
    same ids for every text, so they compare equal and hash alike).
    """

    type = None

    def _identity(self):
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def __eq__(self, other) -> bool:
        return isinstance(other, type(self)) and other._identity() == self._identity()

    def __hash__(self) -> int:
        return hash((self.type, self._identity()))

    def _checked_ids(self, ids) -> np.ndarray:
        """``ids`` (a list, or a NumPy/CuPy integer array) as a flat host array, every id in the vocabulary."""
        ids = to_numpy(ids).reshape(-1) if hasattr(ids, "shape") else np.asarray(list(ids), dtype=np.int64)
        if ids.size and ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"id(s) out of range for vocabulary of size {self.vocab_size}: "
                             f"{sorted(set(ids[bad].tolist()))[:10]}")
        return ids

"""Moved to ``npflux.training.seq2seq``; every name stays importable from here for one release."""
import sys as _sys

from .training import seq2seq as _moved

# The old module name is the new module itself, so ``import npflux.train_seq2seq`` and attribute
# patches reach the code that runs.
_sys.modules[__name__] = _moved

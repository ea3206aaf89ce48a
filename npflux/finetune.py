"""Moved to ``npflux.training.lora``; every name stays importable from here for one release."""
import sys as _sys

from .training import lora as _moved

# The old module name is the new module itself, so ``import npflux.finetune`` and attribute
# patches reach the code that runs.
_sys.modules[__name__] = _moved

"""npflux: transformer language models from scratch on NumPy / CuPy.

Every layer has a hand-written forward and backward pass (``npflux.ops``),
modules compose them (``npflux.nn``), models compose modules
(``npflux.models``). Nothing computes a gradient for us.
"""
from . import settings  # noqa: F401  (npflux.settings.override(...))
from . import memory

memory.keep_freed_memory()  # before the first array: see npflux.memory
from .backend import get_backend
from .models import GPT, GPTConfig, Seq2SeqConfig, Seq2SeqTransformer, load_gpt2_safetensors
from . import generate as _generate  # noqa: E402,F401  (attaches GPT.generate and GPT.beam_search)

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Seq2SeqConfig", "Seq2SeqTransformer", "get_backend", "load_gpt2_safetensors",
           "__version__"]

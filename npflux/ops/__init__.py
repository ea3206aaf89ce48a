"""Pure functions: ``*_forward(...) -> (out, cache)`` and ``*_backward(dout, cache) -> grads``.

Each file holds one family, its backward beside its forward with the
derivation in the docstring. Every op takes its array module from its inputs,
so it runs unchanged on NumPy and CuPy arrays.
"""
from .activations import gelu_backward, gelu_forward, relu_backward, relu_forward
from .attention import attention_backward, attention_forward, causal_mask
from .cross_entropy import cross_entropy_backward, cross_entropy_forward
from .distillation import distillation_backward, distillation_forward
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .positional import sinusoidal_encoding
from .softmax import softmax_backward, softmax_forward
from .span import span_loss_backward, span_loss_forward

__all__ = [
    "attention_backward", "attention_forward", "causal_mask",
    "cross_entropy_backward", "cross_entropy_forward",
    "distillation_backward", "distillation_forward",
    "dropout_backward", "dropout_forward",
    "embedding_backward", "embedding_forward",
    "gelu_backward", "gelu_forward",
    "layernorm_backward", "layernorm_forward",
    "linear_backward", "linear_forward",
    "relu_backward", "relu_forward",
    "sinusoidal_encoding",
    "softmax_backward", "softmax_forward",
    "span_loss_backward", "span_loss_forward",
]

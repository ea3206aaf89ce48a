"""Element-wise activations: GELU (tanh form, as GPT-2) and ReLU."""
import math

from ..backend import check_float, get_array_module

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    This is torch.nn.functional.gelu(x, approximate="tanh"), GPT-2's form.
    """
    check_float(x, "gelu: x")
    xp = get_array_module(x)
    t = xp.tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x, t = cache
    dudx = _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx)


def relu_forward(x, out=None):
    """relu(x) = max(x, 0).  ``out=x`` computes it in place (the caller must own x).

    The cache is the output itself: y > 0 exactly where x > 0, so the
    backward needs no separate mask (and the next layer keeps y anyway).
    """
    check_float(x, "relu: x")
    xp = get_array_module(x)
    y = xp.maximum(x, 0, out=out)
    return y, y


def relu_backward(dy, cache, out=None):
    """d relu / dx = 1 where x > 0, else 0 (the subgradient at 0 is 0, as PyTorch).

    ``out=dy`` writes the result over dy (the caller must own dy).
    """
    xp = get_array_module(dy)
    return xp.multiply(dy, cache > 0, out=out)

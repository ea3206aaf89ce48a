"""The textbook ops: each formula written once, as in the derivation, with no speed tricks.

Read these first. The ops that npflux runs (``ops.layernorm``, ``ops.attention``,
``ops.activations``, ``ops.cross_entropy``) compute the same functions faster:
chunked so that a piece stays in the CPU cache, split over worker threads,
reductions done as matrix-vector products, temporaries reused in place. Each
fast op is tested equal to its version here (tests/test_reference.py), to a
tolerance derived from the different order of the floating-point operations,
as llm.c keeps ``matmul_forward_naive`` beside the fast kernel and cs231n's
``layers.py`` stands beside ``fast_layers.py``.

The caches here are private to this module: pair a reference forward with
the reference backward.
"""
import math

from ..backend import get_array_module

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)."""
    xp = get_array_module(x)
    t = xp.tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x, t = cache
    dudx = _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx)


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * xhat + beta,  xhat = (x - mean) / sqrt(var + eps), over the last axis (biased var)."""
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean) * rstd
    return gamma * xhat + beta, (xhat, rstd, gamma)


def layernorm_backward(dy, cache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma;
    dgamma = sum dy * xhat, dbeta = sum dy over every axis but the last."""
    xhat, rstd, gamma = cache
    g = dy * gamma
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    lead = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


def softmax_forward(x):
    """y_i = exp(x_i - max x) / sum_j exp(x_j - max x) over the last axis."""
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dy, cache):
    """dx_i = y_i (dy_i - sum_j dy_j y_j)."""
    y = cache
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def cross_entropy_forward(logits, targets):
    """loss = mean over rows of -log softmax(logits)[target] (no ignored targets here)."""
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    probs, _ = softmax_forward(z)
    rows = xp.arange(z.shape[0])
    loss = -xp.log(probs[rows, t]).mean()
    return loss, (probs, t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(z) - onehot(t)) / N."""
    probs, t, shape = cache
    xp = get_array_module(probs)
    onehot = xp.zeros_like(probs)
    onehot[xp.arange(probs.shape[0]), t] = 1.0
    return (dloss * (probs - onehot) / probs.shape[0]).reshape(shape)


def attention_forward(q, k, v, causal=False):
    """out = softmax(q k^T / sqrt(D), future keys masked when causal) v, for (B, H, T, D) inputs."""
    xp = get_array_module(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.swapaxes(-1, -2)) * scale
    if causal:
        Tq, Tk = scores.shape[-2:]
        scores = xp.where(xp.tri(Tq, Tk, k=Tk - Tq, dtype=bool), scores, -xp.inf)
    P, _ = softmax_forward(scores)
    return P @ v, (q, k, v, P, scale)


def attention_backward(dout, cache):
    """dv = P^T dout;  dP = dout v^T;  dS = softmax backward of dP;  dq = scale dS k;  dk = scale dS^T q."""
    q, k, v, P, scale = cache
    dv = P.swapaxes(-1, -2) @ dout
    dS = softmax_backward(dout @ v.swapaxes(-1, -2), P)
    return scale * (dS @ k), scale * (dS.swapaxes(-1, -2) @ q), dv


def distillation_forward(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5):
    """loss = alpha T^2 mean_n KL(softmax(t_n/T) || softmax(s_n/T)) + (1 - alpha) mean_n -log softmax(s_n)[y_n]
    (no ignored targets here)."""
    xp = get_array_module(student_logits)
    V = student_logits.shape[-1]
    s, t, y = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), targets.reshape(-1)
    T = temperature
    p, _ = softmax_forward(t / T)
    q, _ = softmax_forward(s / T)
    kl = (p * (xp.log(p) - xp.log(q))).sum(axis=-1).mean()
    hard, ce_cache = cross_entropy_forward(s, y)
    return alpha * T * T * kl + (1 - alpha) * hard, (p, q, ce_cache, T, alpha, student_logits.shape)


def distillation_backward(dloss, cache):
    """dstudent = dloss * (alpha T (q - p) / N + (1 - alpha) (softmax(s) - onehot(y)) / N)."""
    p, q, ce_cache, T, alpha, shape = cache
    soft = alpha * T * (q - p) / p.shape[0]
    return (dloss * soft + cross_entropy_backward((1 - alpha) * dloss, ce_cache)).reshape(shape)

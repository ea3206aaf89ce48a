"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student's logits fitted to a teacher's, softened.

    p = softmax(t / T)          the teacher's distribution at temperature T
    q = softmax(s / T)          the student's, at the same temperature
    KL_n = sum_v p_v (log p_v - log q_v)
    loss = alpha * T^2 * (1/N) sum_n KL_n  +  (1 - alpha) * (1/N) sum_n -log softmax(s_n)[y_n]

over the N positions whose target ``y`` is not ``ignore_index``. The T^2
keeps the soft term's gradient on the scale of the hard term's as T grows
(the gradient of KL / T^2 scales as 1/T^2: see the backward). ``alpha = 1``
is pure distillation, ``alpha = 0`` the plain cross-entropy of the labels.
"""
from ..backend import check_float, check_int, get_array_module
from .cross_entropy import flat_targets
from .softmax import log_softmax_rows as _log_softmax


def distillation_forward(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5, ignore_index=-100,
                         teacher_grad=False):
    """The loss above as a 0-d array of the student's dtype, and the cache.

    student_logits and teacher_logits (..., V) of the same shape and dtype,
    targets (...) integers in [0, V) or ``ignore_index``. ``teacher_grad``:
    the backward also returns the teacher's gradient (None otherwise: in
    training the teacher is frozen and nothing needs it; the checks use it).
    If every target is ignored the loss and the gradients are 0.
    """
    check_float(student_logits, "distillation: student_logits")
    check_float(teacher_logits, "distillation: teacher_logits")
    check_int(targets, "distillation: targets")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation: student logits {student_logits.shape} and teacher logits "
                         f"{teacher_logits.shape} differ in shape (a teacher with another vocabulary?)")
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(f"distillation: student logits are {student_logits.dtype}, teacher logits "
                        f"{teacher_logits.dtype}; cast the teacher's to the student's dtype")
    if student_logits.shape[:-1] != targets.shape:
        raise ValueError(f"distillation: logits {student_logits.shape} need targets of shape "
                         f"{student_logits.shape[:-1]}, got {targets.shape}")
    if not float(temperature) > 0:
        raise ValueError(f"distillation: temperature must be > 0, got {temperature}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"distillation: alpha must be in [0, 1], got {alpha}")
    xp = get_array_module(student_logits)
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    y_safe, valid = flat_targets(xp, targets, V, ignore_index, "distillation")
    T, a = float(temperature), float(alpha)
    count = int(valid.sum())
    weight = valid.astype(s.dtype) / max(count, 1)          # 1/N on the rows that count, 0 elsewhere

    log_p = _log_softmax(xp, t / T)                         # teacher, softened
    log_q = _log_softmax(xp, s / T)                         # student, softened
    p = xp.exp(log_p)
    kl = (p * (log_p - log_q)).sum(axis=-1)                 # KL(p || q) per row, >= 0
    log_hard = log_q if T == 1.0 else _log_softmax(xp, s)   # student at T = 1, for the labels
    nll = -log_hard[xp.arange(s.shape[0]), y_safe]
    loss = a * T * T * (kl * weight).sum() + (1.0 - a) * (nll * weight).sum()
    cache = (p, log_p, log_q, log_hard, kl, y_safe, weight, T, a, student_logits.shape,
             bool(teacher_grad))
    return xp.asarray(loss, dtype=student_logits.dtype), cache


def distillation_backward(dloss, cache):
    """(dstudent_logits, dteacher_logits or None).

    Student. d KL / d s = (q - p) / T (softmax cross-entropy against the
    soft targets p, through s / T), so the soft term gives
    alpha * T^2 * (q - p) / T = alpha * T (q - p); the hard term the usual
    (1 - alpha) (softmax(s) - onehot(y)); each row times 1/N.

    Teacher (only when the forward was asked ``teacher_grad``). With
    a = log p - log q, d KL / d t_j = (1/T) sum_i dp_i/du_j (a_i + 1) =
    (1/T) p_j (a_j - KL), since sum_i dp_i/du_j = 0; the soft term gives
    alpha * T * p (a - KL), the hard term nothing.
    """
    p, log_p, log_q, log_hard, kl, y_safe, weight, T, a, shape, teacher_grad = cache
    xp = get_array_module(p)
    row = weight * float(dloss)                             # float(): a float64 dloss keeps float32 float32
    q = xp.exp(log_q)
    hard = xp.exp(log_hard) if log_hard is not log_q else q.copy()
    hard[xp.arange(hard.shape[0]), y_safe] -= 1.0
    ds = (a * T) * (q - p) + (1.0 - a) * hard
    ds *= row[:, None]
    dt = None
    if teacher_grad:
        dt = (a * T) * p * ((log_p - log_q) - kl[:, None]) * row[:, None]
        dt = dt.reshape(shape)
    return ds.reshape(shape), dt

"""distill(): a small GPT (the student) trained to match a larger one's softened predictions (the teacher).

    teacher = load_teacher("out-s2/ckpt", student_config)        # any GPT checkpoint; refused before
                                                                 # training if its vocabulary differs
    model, state = distill(student_config, cfg, Distillation(teacher, temperature=2.0, alpha=0.5),
                           train_ids, val_ids, tokenizer)

Each step, for a batch (x, y):

    teacher logits  t = teacher(x)              eval mode (no dropout); its backward never runs
    student logits  s = student(x)
    loss = alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(s, y)   npflux.ops.distillation
    dloss/ds -> student.backward_from_logits

This is ``npflux.training.gpt.train`` with the loss swapped (its ``objective``):
the same loop, evaluations (the labels' cross-entropy, so a distilled
student's val loss compares with one trained alone), checkpoints, log,
plot and ``resume``. The checkpoint's kind is ``gpt-distilled``: a GPT
(everything that reads a GPT reads it) whose config also records the
teacher (path and SHA-256 of its weights), the temperature and alpha.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..checkpoint import GPT_KINDS, MODEL_FILE, load_model, sha256_file
from ..models import GPTConfig
from .gpt import TrainConfig, train
from .loop import evaluating


def load_teacher(path, student_config: GPTConfig | None = None, tokenizer=None, backend=None, dtype=None):
    """(teacher model, its tokenizer) from a GPT checkpoint, checked against the student before any work.

    Refused with one line: a checkpoint of another kind (a seq2seq model, an
    SAE, a reader); a vocabulary of another size than ``student_config``'s;
    a tokenizer that numbers the tokens differently from ``tokenizer``.
    """
    teacher, teacher_tokenizer, _ = load_model(path, backend=backend, dtype=dtype, expect=GPT_KINDS)
    if student_config is not None and teacher.config.vocab_size != student_config.vocab_size:
        raise ValueError(f"distill: the teacher {path} has a vocabulary of {teacher.config.vocab_size} tokens, "
                         f"the student {student_config.vocab_size}; distillation compares their predictions token "
                         f"by token, so both need the same vocabulary")
    if tokenizer is not None and teacher_tokenizer is not None and tokenizer.to_dict() != teacher_tokenizer.to_dict():
        raise ValueError(f"distill: the teacher {path} numbers its tokens differently from the student's "
                         f"tokenizer; train the student with the teacher's (npflux distill does)")
    return teacher, teacher_tokenizer


@dataclass
class Distillation:
    """The distillation objective of ``train``: teacher logits on the fly, ``ops.distillation``'s loss and backward."""

    teacher: object
    temperature: float = 2.0
    alpha: float = 0.5
    teacher_path: str | None = None

    kind = "gpt-distilled"
    config_key = "distill"

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"distill: temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill: alpha must be in [0, 1], got {self.alpha}")
        self._cache = None

    @property
    def config(self) -> dict:
        """What the checkpoint records (and what ``resume`` must find again)."""
        teacher = {"model": self.teacher.config.to_dict()}
        if self.teacher_path is not None:
            teacher["path"] = str(self.teacher_path)
            teacher["sha256"] = sha256_file(f"{self.teacher_path}/{MODEL_FILE}")
        return {"temperature": float(self.temperature), "alpha": float(self.alpha), "teacher": teacher}

    def teacher_logits(self, x, dtype):
        with evaluating(self.teacher):
            logits, _ = self.teacher.forward(x)
        return logits.astype(dtype, copy=False)

    def loss(self, student, batch):
        x, y = batch
        t = self.teacher_logits(x, student.dtype)
        s, _ = student.forward(x)
        loss, self._cache = ops.distillation_forward(s, t, student.backend.asarray(y), self.temperature, self.alpha)
        return loss

    def backward(self, student, scale):
        dlogits, _ = ops.distillation_backward(scale, self._cache)
        self._cache = None
        student.backward_from_logits(dlogits)


def distill(model_config: GPTConfig, cfg: TrainConfig, objective: Distillation, train_data, val_data, tokenizer=None,
            resume=False, log=print, overwrite=False):
    """Train the student ``model_config`` under ``objective``; returns (model, TrainState), as ``train``."""
    if objective.teacher.config.vocab_size != model_config.vocab_size:
        raise ValueError(f"distill: the teacher has a vocabulary of {objective.teacher.config.vocab_size} tokens, "
                         f"the student {model_config.vocab_size}; both need the same vocabulary")
    if (cfg.block_size or model_config.block_size) > objective.teacher.config.block_size:
        raise ValueError(f"distill: the student reads {cfg.block_size or model_config.block_size} tokens at a time, "
                         f"the teacher only {objective.teacher.config.block_size}")
    return train(model_config, cfg, train_data, val_data, tokenizer=tokenizer, resume=resume, log=log,
                 overwrite=overwrite, objective=objective)

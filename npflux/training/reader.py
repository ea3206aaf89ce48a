"""train_reader(): the extractive reader on synthetic question/answer pairs, through the one training step.

    vocab  = the words that 20,000 generated examples repeat (the templates' grammar; never an invented word)
    for step in range(steps):
        batch of fresh examples from SyntheticQA(seed)   (an endless stream: nothing is seen twice)
        train_step(reader, AdamW, [batch])                 span loss, backward, clip, step
        every eval_interval steps: exact match / F1 on held-out synthetic examples (another seed),
                                   and a checkpoint (kind "reader": weights, ReaderConfig, the vocabulary,
                                   optimizer, the generator's state) that --resume continues

The labelled questions over ``neuraflux_corpus.txt`` are never used here
(benchmarks/qa_reader.py evaluates on them).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import optim
from ..backend import get_backend, resolve_dtype
from ..checkpoint.outdir import claim_output
from ..models.reader import Reader, ReaderConfig
from ..nn.layers import reseed_dropout
from ..tasks.qa import SyntheticQA, exact_match, read_pairs, token_f1
from ..tokenizers.words import ReaderVocab, collate
from .loop import RunLog, progress, train_step


@dataclass
class ReaderTrainConfig:
    out_dir: str = "out-reader"
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_iters: int | None = None    # default: 100 steps, or a tenth of a shorter run
    min_lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_examples: int = 300
    vocab_examples: int = 20_000
    min_count: int = 20
    n_buckets: int = 1024
    seed: int = 1337
    backend: str | None = None
    dtype: str = "float32"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_interval", "eval_examples", "vocab_examples", "min_count",
                     "n_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.warmup_iters is None:
            self.warmup_iters = min(100, self.steps // 10)
        if not 0 <= self.warmup_iters <= self.steps:
            raise ValueError(f"warmup_iters must be in [0, steps {self.steps}], got {self.warmup_iters}")


def example_batch(vocab, examples, block_size):
    """``collate``'s batch for generated examples, with the answer's first and last word as targets
    ([CLS], 0, for an example without an answer). An answer cut off by the block is skipped."""
    windows, starts, ends = [], [], []
    for ex in examples:
        w = vocab.encode(ex.question, ex.passage, block_size)[0]
        if ex.answer is None:
            s = e = 0
        else:
            pos = [k for k, o in enumerate(w["offsets"]) if o is not None and ex.answer_start <= o[0] < ex.answer_end]
            if not pos or w["offsets"][pos[-1]][1] != ex.answer_end:
                continue
            s, e = pos[0], pos[-1]
        windows.append(w)
        starts.append(s)
        ends.append(e)
    return collate(windows, starts, ends)


def evaluate_reader(reader, vocab, examples, threshold=0.0):
    """Exact match and token F1 (SQuAD's) of the reader's answers; "no answer" counts right only where there is none."""
    em = f1 = 0.0
    spans = read_pairs(reader, vocab, [(ex.question, ex.passage) for ex in examples])
    for ex, span in zip(examples, spans):
        answer = span.text if span.score > threshold else None
        if ex.answer is None or answer is None:
            em += float(answer == ex.answer)
            f1 += float(answer == ex.answer)
        else:
            em += exact_match(answer, ex.answer)
            f1 += token_f1(answer, ex.answer)
    return em / len(examples), f1 / len(examples)


# what a resumed run must share with the checkpoint's. The rest may change: eval_interval, progress, and
# steps (with the warmup it implies), which moves the cosine schedule's end, as npflux train's --max-iters does
_RESUME_FIELDS = ("batch_size", "learning_rate", "min_lr", "weight_decay", "grad_clip", "eval_examples",
                  "vocab_examples", "min_count", "n_buckets", "seed", "dtype")


def train_reader(model_config: dict | None, cfg: ReaderTrainConfig, log=print, overwrite=False, resume=False):
    """Train a reader; returns (reader, vocab, history). ``model_config``: ReaderConfig fields but vocab_size.

    A checkpoint (weights, optimizer, the question generator's state) is written at every
    evaluation; ``resume=True`` continues the one in ``cfg.out_dir`` and ends with the weights
    a run straight through would have (tests/test_reader.py)."""
    from ..checkpoint import load_checkpoint, rng_from_json, rng_state_to_json
    from ..checkpoint.kinds import save_reader

    out = Path(cfg.out_dir)
    ckpt_dir = out / "ckpt"
    claim = claim_output(ckpt_dir, kind="reader", resume=resume, overwrite=overwrite, companions=[out / "log.jsonl"],
                         log=log)
    gen = SyntheticQA(cfg.seed)
    ckpt = load_checkpoint(ckpt_dir) if resume else None
    if ckpt is None:
        sample = gen.take(cfg.vocab_examples)
        vocab = ReaderVocab.build([t for ex in sample for t in (ex.question, ex.passage)], cfg.min_count, cfg.n_buckets)
        config = ReaderConfig(vocab_size=vocab.size, **(model_config or {}))
    else:
        vocab, config = _check_resume(ckpt, ckpt_dir, model_config, cfg)
    backend = get_backend(cfg.backend)
    reader = Reader(config, seed=cfg.seed, backend=backend, dtype=resolve_dtype(cfg.dtype))
    opt = optim.AdamW(reader.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                      decay_filter=optim.nanogpt_decay)
    history, start = [], 1
    if ckpt is not None:
        reader.load_state_dict(ckpt.model_state)
        opt.load_state_dict(ckpt.optimizer_state)
        gen.rng = rng_from_json(ckpt.rng_state["questions"])
        history, start = list(ckpt.extra["history"]), ckpt.step + 1
        log(f"resumed from {ckpt_dir} at step {ckpt.step}")
    held_out = SyntheticQA(cfg.seed + 1).take(cfg.eval_examples)
    claim.begin()
    out.mkdir(parents=True, exist_ok=True)
    run_log = RunLog(out / "log.jsonl", kept=history)
    log(f"reader: {reader.num_parameters():,} parameters; vocabulary {len(vocab.words)} words + "
        f"{vocab.n_buckets} hash buckets; {cfg.steps} steps of {cfg.batch_size} fresh examples")

    def save(step):
        save_reader(ckpt_dir, reader, vocab, train=asdict(cfg), extra={"history": history},
                    optimizer_state=opt.state_dict(), step=step, rng_state={"questions": rng_state_to_json(gen.rng)})

    bar = progress(cfg.steps, enabled=cfg.progress, initial=start - 1)
    reader.train()
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for step in range(start, cfg.steps + 1):
        opt.lr = optim.cosine_with_warmup(step - 1, cfg.learning_rate, cfg.warmup_iters, cfg.steps, cfg.min_lr)
        if config.dropout:  # the step's masks depend on (seed, step) alone: a resumed run draws the same ones
            reseed_dropout(reader, int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
        batch = example_batch(vocab, gen.take(cfg.batch_size), config.block_size)
        loss, _ = train_step(reader, opt, [(batch,)], grad_clip=cfg.grad_clip)
        if bar:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            em, f1 = evaluate_reader(reader, vocab, held_out)
            reader.train()
            entry = {"step": step, "train_loss": loss, "exact_match": em, "f1": f1,
                     "seconds": time.perf_counter() - t0}
            history.append(entry)
            run_log.append(entry)
            save(step)  # a checkpoint per evaluation: an interrupted run resumes from the last one
            msg = f"step {step}: loss {loss:.4f}, held-out synthetic exact match {em:.3f}, F1 {f1:.3f}"
            bar.write(msg) if bar else log(msg)
    if bar:
        bar.close()
    if not history or history[-1]["step"] != cfg.steps:  # resumed at the last step: nothing ran, nothing written
        save(cfg.steps)
    claim.complete()
    return reader, vocab, history


def _check_resume(ckpt, ckpt_dir, model_config, cfg):
    """The checkpoint's vocabulary and ReaderConfig, once it is known to be this run's; else one-line errors."""
    from ..checkpoint import CheckpointError
    from ..tokenizers.words import ReaderVocab

    if ckpt.optimizer_state is None or not isinstance(ckpt.rng_state, dict) or "questions" not in ckpt.rng_state:
        raise CheckpointError(f"--resume: {ckpt_dir} holds a finished reader without its optimizer and question "
                              f"generator state (written before --resume existed); train into another --out-dir")
    saved = ckpt.config.get("train", {})
    differing = [f"{k} {saved.get(k)!r} (asked: {getattr(cfg, k)!r})" for k in _RESUME_FIELDS
                 if k in saved and saved[k] != getattr(cfg, k)]
    config = ReaderConfig.from_dict(ckpt.config["reader"])
    asked = {**config.to_dict(), **(model_config or {})}
    differing += [f"{k} {v!r} (asked: {asked[k]!r})" for k, v in config.to_dict().items() if asked[k] != v]
    if differing:
        raise ValueError(f"--resume: {ckpt_dir} was trained with other settings: {', '.join(differing)}; resume "
                         f"with the checkpoint's settings, or train into another --out-dir")
    if ckpt.step > cfg.steps:
        raise ValueError(f"--resume: {ckpt_dir} is at step {ckpt.step}, beyond --steps {cfg.steps}; --steps "
                         f"counts from step 0: pass a number above {ckpt.step} to train on")
    return ReaderVocab.from_dict(ckpt.config["vocab"]), config


__all__ = ["ReaderTrainConfig", "evaluate_reader", "example_batch", "train_reader"]

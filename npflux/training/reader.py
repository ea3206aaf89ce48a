"""train_reader(): the extractive reader on synthetic question/answer pairs, through the one training step.

    vocab  = the words that 20,000 generated examples repeat (the templates' grammar; never an invented word)
    for step in range(steps):
        batch of fresh examples from SyntheticQA(seed)   (an endless stream: nothing is seen twice)
        train_step(reader, AdamW, [batch])                 span loss, backward, clip, step
        every eval_interval steps: exact match / F1 on held-out synthetic examples (another seed)
    save: checkpoint kind "reader" (weights, ReaderConfig, the vocabulary)

The labelled questions over ``neuraflux_corpus.txt`` are never used here
(benchmarks/qa_reader.py evaluates on them).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import optim
from ..backend import get_backend, resolve_dtype
from ..checkpoint.outdir import claim_output
from ..models.reader import Reader, ReaderConfig
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


def train_reader(model_config: dict | None, cfg: ReaderTrainConfig, log=print, overwrite=False):
    """Train a reader; returns (reader, vocab, history). ``model_config``: ReaderConfig fields but vocab_size."""
    from ..checkpoint.kinds import save_reader

    out = Path(cfg.out_dir)
    claim = claim_output(out / "ckpt", kind="reader", overwrite=overwrite, companions=[out / "log.jsonl"],
                         can_resume=False, log=log)
    gen = SyntheticQA(cfg.seed)
    sample = gen.take(cfg.vocab_examples)
    vocab = ReaderVocab.build([t for ex in sample for t in (ex.question, ex.passage)], cfg.min_count, cfg.n_buckets)
    config = ReaderConfig(vocab_size=vocab.size, **(model_config or {}))
    backend = get_backend(cfg.backend)
    reader = Reader(config, seed=cfg.seed, backend=backend, dtype=resolve_dtype(cfg.dtype))
    opt = optim.AdamW(reader.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                      decay_filter=optim.nanogpt_decay)
    held_out = SyntheticQA(cfg.seed + 1).take(cfg.eval_examples)
    claim.begin()
    out.mkdir(parents=True, exist_ok=True)
    run_log = RunLog(out / "log.jsonl")
    log(f"reader: {reader.num_parameters():,} parameters; vocabulary {len(vocab.words)} words + "
        f"{vocab.n_buckets} hash buckets; {cfg.steps} steps of {cfg.batch_size} fresh examples")
    history = []
    bar = progress(cfg.steps, enabled=cfg.progress)
    reader.train()
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        opt.lr = optim.cosine_with_warmup(step - 1, cfg.learning_rate, cfg.warmup_iters, cfg.steps, cfg.min_lr)
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
            msg = f"step {step}: loss {loss:.4f}, held-out synthetic exact match {em:.3f}, F1 {f1:.3f}"
            bar.write(msg) if bar else log(msg)
    if bar:
        bar.close()
    save_reader(out / "ckpt", reader, vocab, train=asdict(cfg), extra={"history": history})
    claim.complete()
    return reader, vocab, history


__all__ = ["ReaderTrainConfig", "evaluate_reader", "example_batch", "train_reader"]

"""Training an encoder-decoder on a generated task with teacher forcing; exact-match evaluation; checkpoints.

A task (e.g. ``npflux.tasks.DateTask``) provides ``tokenizer``, ``pad_id /
bos_id / eos_id``, ``src_block_size / tgt_block_size``, ``sample(rng, n)``,
``heldout()`` and ``encode_batch(pairs)``. Each step draws a fresh batch
from the training split: the decoder reads BOS + target and is trained to
predict target + EOS at every position at once (teacher forcing).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import optim
from ..backend import get_backend, resolve_dtype
from ..checkpoint import load_seq2seq, save_seq2seq  # noqa: F401  (their home is npflux.checkpoint; old names kept)
from ..checkpoint.outdir import claim_output
from ..models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from .loop import progress as progress_bar
from .loop import Diverged, RunLog, train_step


@dataclass
class Seq2SeqTrainConfig:
    out_dir: str = "out-seq2seq"
    batch_size: int = 64
    max_iters: int = 3000
    learning_rate: float = 2e-3
    warmup_iters: int = 100
    min_lr: float = 1e-4
    weight_decay: float = 0.01
    beta2: float = 0.98
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_size: int = 500     # held-out examples decoded (greedy) at each evaluation
    seed: int = 0
    dtype: str = "float32"
    backend: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "max_iters", "eval_interval", "eval_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_iters <= self.max_iters:
            raise ValueError(f"warmup_iters must be in [0, max_iters], got {self.warmup_iters}")


def model_config_for(task, **overrides) -> Seq2SeqConfig:
    """A Seq2SeqConfig sized to ``task``'s vocabulary, lengths and special ids."""
    base = dict(src_vocab_size=task.vocab_size, tgt_vocab_size=task.vocab_size, src_block_size=task.src_block_size,
                tgt_block_size=task.tgt_block_size, pad_id=task.pad_id, bos_id=task.bos_id, eos_id=task.eos_id)
    return Seq2SeqConfig(**{**base, **overrides})


def translate(model, tokenizer, sources, beam_size=1, batch_size=256, progress=False):
    """Decode each source string (greedy when beam_size is 1); returns the output strings."""
    c = model.config
    outputs = []
    batches = range(0, len(sources), batch_size)
    bar = progress_bar(len(batches), enabled=progress, unit="batch", desc=f"decoding (beam {beam_size})", leave=False)
    for i in batches:
        chunk = sources[i : i + batch_size]
        ids = [tokenizer.encode_array(s) for s in chunk]
        for s, a in zip(chunk, ids):
            if not 1 <= len(a) <= c.src_block_size:
                raise ValueError(f"source {s!r} has {len(a)} tokens; the model reads 1..{c.src_block_size}")
            if (a == c.pad_id).any():  # it would be masked as padding: the model would not read it
                raise ValueError(f"source {s!r} holds the padding token (id {c.pad_id})")
        src = np.full((len(ids), max(len(a) for a in ids)), c.pad_id, dtype=np.int64)
        for j, a in enumerate(ids):
            src[j, : len(a)] = a
        for out in model.beam_decode(src, beam_size=beam_size):
            outputs.append(tokenizer.decode(out))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return outputs


def exact_match(model, tokenizer, pairs, beam_size=1, batch_size=256, progress=False):
    """(fraction of pairs whose decoded source equals the target exactly, the outputs)."""
    outputs = translate(model, tokenizer, [s for s, _ in pairs], beam_size=beam_size, batch_size=batch_size,
                        progress=progress)
    correct = sum(o == t for o, (_, t) in zip(outputs, pairs))
    return correct / max(len(pairs), 1), outputs


def bleu_chrf(outputs, targets) -> dict:
    """Corpus BLEU and chrF of ``outputs`` against one reference each, by sacrebleu (Post, 2018), the standard
    implementation: its default settings (BLEU: 13a tokenisation, 4-grams, exponential smoothing off at the
    corpus level; chrF: character 6-grams, beta 2), each on 0-100, with sacrebleu's signature of the settings."""
    import sacrebleu  # here: only the commands that score translations load it

    if len(outputs) != len(targets):
        raise ValueError(f"bleu_chrf: {len(outputs)} outputs for {len(targets)} targets")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(list(outputs), [list(targets)]), chrf.corpus_score(list(outputs), [list(targets)])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def train_seq2seq(model_config: Seq2SeqConfig, cfg: Seq2SeqTrainConfig, task, log=print, overwrite=False):
    """Train on fresh batches of ``task``; returns (model, history). Writes ``out_dir/ckpt`` and ``log.jsonl``.

    Every ``eval_interval`` steps (and at the end) the first ``eval_size``
    held-out pairs are decoded greedily, their exact-match accuracy logged,
    and the checkpoint written (so a stopped run keeps its last evaluation's).
    The learning rate warms up linearly, then follows a cosine to ``min_lr``.
    Another run's checkpoint or log in ``out_dir`` is refused before any work
    unless ``overwrite`` (``npflux.checkpoint.outdir``); a non-finite loss or
    gradient norm stops the run (``Diverged``) with the last evaluation's checkpoint kept.
    """
    out = Path(cfg.out_dir)
    claim = claim_output(out / "ckpt", kind="seq2seq", overwrite=overwrite, companions=[out / "log.jsonl"],
                         can_resume=False, log=log)
    backend = get_backend(cfg.backend)
    model = Seq2SeqTransformer(model_config, seed=cfg.seed, backend=backend, dtype=resolve_dtype(cfg.dtype))
    opt = optim.AdamW(model.params, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay,
                      decay_filter=optim.nanogpt_decay)
    rng = np.random.default_rng(cfg.seed)
    eval_pairs = task.heldout()[: cfg.eval_size]
    log(f"model: {model.num_parameters():,} parameters, backend {backend.name}, {model.dtype}; "
        f"batch {cfg.batch_size}, {cfg.max_iters} steps")
    history = []
    claim.begin()
    out.mkdir(parents=True, exist_ok=True)
    run_log = RunLog(out / "log.jsonl")
    bar = progress_bar(cfg.max_iters, enabled=cfg.progress)
    train_time = 0.0  # seconds spent in training steps (evaluations excluded)

    def evaluate(step, loss):
        accuracy, _ = exact_match(model, task.tokenizer, eval_pairs)
        entry = {"step": step, "loss": loss, "heldout_exact_match": accuracy, "train_seconds": round(train_time, 2)}
        history.append(entry)
        run_log.append(entry)
        msg = f"step {step}: loss {loss:.4f}, held-out exact match {accuracy:.4f} ({len(eval_pairs)} greedy)"
        bar.write(msg) if bar else log(msg)
        # a checkpoint at every evaluation: a run stopped part-way keeps its last one
        save_seq2seq(out / "ckpt", model, task.tokenizer, step=step,
                     extra={"history": history, "train": dataclasses.asdict(cfg), "task_seed": getattr(task, "seed", None)})

    model.train()
    loss = float("nan")
    for step in range(cfg.max_iters):
        if step and step % cfg.eval_interval == 0:
            evaluate(step, loss)
            model.train()
        t0 = time.perf_counter()
        opt.lr = optim.cosine_with_warmup(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr)
        src, tgt_in, targets = task.encode_batch(task.sample(rng, cfg.batch_size))
        try:
            loss, _ = train_step(model, opt, [(src, tgt_in, targets)], grad_clip=cfg.grad_clip)
        except Diverged as exc:
            if bar:
                bar.close()
            kept = f"the checkpoint of step {history[-1]['step']} is kept" if history else "no checkpoint was written"
            raise Diverged(f"training diverged at step {step}: {exc} (learning rate {opt.lr:.3g}); {kept}: "
                           f"lower --learning-rate") from None
        train_time += time.perf_counter() - t0
        if bar:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
    evaluate(cfg.max_iters, loss)
    claim.complete()
    if bar:
        bar.close()
    return model, history

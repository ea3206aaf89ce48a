"""The training loop: batches, forward, backward, AdamW, evaluation, checkpoints.

    for step in range(max_iters):
        every eval_interval steps: estimate train/val loss, log, maybe stop early
        lr = schedule(step); dropout reseeded from (seed, step)
        zero_grad; for each micro-batch: forward, backward(1/grad_accum)
        clip; optimizer.step
        every checkpoint_interval steps: save (atomically)

Everything that decides what happens next (weights, AdamW moments, step,
the batch sampler's random state, the early-stopping record) is in the
checkpoint, and dropout's masks follow from (seed, step), so ``resume=True`` continues exactly where it stopped.

Under ``mpiexec -n N`` (``parallel``, ``npflux.distributed``) every rank runs
this same loop on its rows of each batch; ``train_step``'s ``sync`` hook sums
the gradients over the ranks, and rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import optim
from ..backend import get_backend, resolve_dtype, to_numpy
from ..checkpoint import GPT_KINDS, CheckpointError, load_checkpoint, load_model, rng_from_json, rng_state_to_json, save_checkpoint
from ..checkpoint.outdir import claim_output
from ..data import get_batch
from ..distributed import DataParallel, DataParallelSync, ZeroAdamW, flat_buffers, shard_range, stop_all_on_error
from ..models import GPT, GPTConfig
from ..nn.layers import reseed_dropout
from .loop import Diverged, RunLog, evaluating, plot_losses, progress, train_step, windows_loss

# The published hyperparameters of each preset (the char-level gpt.py for
# s1/s2, nanoGPT's shakespeare_char for shakespeare-n).
TRAIN_PRESETS = {
    "shakespeare-s1": dict(batch_size=16, max_iters=5000, eval_interval=100, eval_iters=200, learning_rate=1e-3),
    "shakespeare-s2": dict(batch_size=16, max_iters=5000, eval_interval=100, eval_iters=200, learning_rate=1e-3),
    "shakespeare-n": dict(batch_size=64, max_iters=5000, eval_interval=500, eval_iters=200, learning_rate=1e-3,
                          lr_schedule="cosine", warmup_iters=100, min_lr=1e-4, beta2=0.99, weight_decay=0.1,
                          decay_matrices_only=True, grad_clip=1.0),
    # nanoGPT's README CPU command: --max_iters=2000 --lr_decay_iters=2000 --eval_iters=20 and its
    # shakespeare_char config (lr 1e-3, warmup 100, cosine to 1e-4, beta2 0.99, eval every 250).
    "nanogpt-cpu": dict(batch_size=12, max_iters=2000, eval_interval=250, eval_iters=20, learning_rate=1e-3,
                        lr_schedule="cosine", warmup_iters=100, min_lr=1e-4, beta2=0.99, weight_decay=0.1,
                        decay_matrices_only=True, grad_clip=1.0),
    # Sized for about 10 minutes on one shared CPU thread (README, NeuraFlux section), not for the best loss.
    "neuraflux": dict(batch_size=16, max_iters=500, eval_interval=100, eval_iters=10, learning_rate=2e-3,
                      lr_schedule="cosine", warmup_iters=50, min_lr=2e-4, beta2=0.99, weight_decay=0.1,
                      decay_matrices_only=True, grad_clip=1.0),
}
# The tokenizer a preset trains with when --tokenizer is not given.
PRESET_TOKENIZERS = {"neuraflux": "bpe"}


@dataclass
class TrainConfig:
    out_dir: str = "out"
    batch_size: int = 16
    block_size: int | None = None      # default: the model's block_size
    max_iters: int = 5000
    eval_interval: int = 100
    eval_iters: int = 200
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"      # "constant" or "cosine" (linear warmup, cosine decay)
    warmup_iters: int = 100
    min_lr: float | None = None        # cosine floor; default learning_rate / 10
    weight_decay: float = 0.01         # torch.optim.AdamW's default
    decay_matrices_only: bool = False  # nanoGPT's grouping: no decay on biases and norms
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0             # 0 disables clipping
    grad_accum: int = 1
    checkpoint_interval: int = 1000    # 0: only at the end
    early_stopping_patience: int = 0   # evaluations without val improvement before stopping; 0 disables
    seed: int = 1337
    backend: str | None = None
    dtype: str = "float32"
    progress: bool = True
    doc_sep: str | None = None         # how the corpus was cut into [BOS] doc [EOS] documents (recorded for eval)

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "grad_accum"):
            if getattr(self, name) < 1 and not (name == "max_iters" and self.max_iters == 0):
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # nan compares false with everything: a NaN learning rate would train to NaN without one error
        for name, ok, rule in (("learning_rate", lambda v: v >= 0, ">= 0"), ("min_lr", lambda v: v >= 0, ">= 0"),
                               ("weight_decay", lambda v: v >= 0, ">= 0"), ("grad_clip", lambda v: v >= 0, ">= 0"),
                               ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)")):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{name} must be a finite number {rule}, got {value}")
        if self.lr_schedule == "cosine" and not 0 <= self.warmup_iters <= self.max_iters:
            # (refused here, before any work: the schedule would fail at the first step, after the
            # output directory was claimed)
            raise ValueError(f"the cosine schedule warms up for warmup_iters {self.warmup_iters} steps, which must "
                             f"be in [0, max_iters {self.max_iters}]: pass --warmup-iters (at most {self.max_iters})")

    def lr_at(self, step: int) -> float:
        if self.lr_schedule == "constant":
            return optim.constant(step, self.learning_rate)
        min_lr = self.learning_rate / 10 if self.min_lr is None else self.min_lr
        return optim.cosine_with_warmup(step, self.learning_rate, self.warmup_iters, self.max_iters, min_lr)


@dataclass
class TrainState:
    """What the loop carries from step to step (and what a checkpoint must restore)."""
    step: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0
    history: list = field(default_factory=list)


def _check_resume_state(ckpt, ckpt_dir):
    """What --resume reads from meta.json beyond the arrays, checked before anything is loaded: a damaged
    or hand-edited field is a one-line error naming it, never a traceback or a silent restart."""
    where = f"--resume: {ckpt_dir}/meta.json"
    if not isinstance(ckpt.step, int) or ckpt.step < 0:
        raise CheckpointError(f"{where} has step {ckpt.step!r}; a step is a whole number >= 0")
    if ckpt.optimizer_state is None:
        raise CheckpointError(f"{where} holds no optimizer state: it cannot continue a run "
                              f"(sample from it, or fine-tune it with npflux finetune)")
    if not isinstance(ckpt.rng_state, dict) or not isinstance(ckpt.rng_state.get("batch"), dict):
        raise CheckpointError(f"{where} has no batch sampler state (rng_state.batch) to continue from")
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else None
    train_state = extra.get("train_state") if extra else None
    fields = {f.name for f in dataclasses.fields(TrainState)} - {"step"}
    if not isinstance(train_state, dict) or set(train_state) != fields:
        raise CheckpointError(f"{where} has no training state (extra.train_state with {sorted(fields)}) to continue from")
    if not isinstance(train_state["history"], list) or not all(isinstance(e, dict) for e in train_state["history"]):
        raise CheckpointError(f"{where}: extra.train_state.history must be a list of log entries")


def estimate_loss(model, data, eval_iters, batch_size, block_size, seed, comm=None):
    """Mean loss over ``eval_iters`` random batches, in eval mode (no dropout).

    The batches come from their own generator seeded with ``seed``, so an
    evaluation does not disturb the training batches (and resuming does not
    change what was evaluated). With a communicator of N ranks
    (``npflux.distributed``), every rank draws every batch but computes only
    every N-th, and the sum goes over the ranks: the same batches, 1/N of the
    work each, and every rank gets the same number (early stopping agrees).
    """
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    rng = get_backend("numpy").rng(seed)
    total = 0.0
    with evaluating(model):
        for i in range(eval_iters):
            x, y = get_batch(data, batch_size, block_size, rng)
            if i % size == rank:
                _, loss = model.forward(x, y)
                total += float(loss)
    return (comm.sum(total) if comm is not None else total) / eval_iters


def make_optimizer(model, cfg: TrainConfig, parallel: DataParallel | None = None):
    """AdamW with the run's settings; with ``parallel.zero`` 1, its moments sharded over the ranks."""
    decay = optim.nanogpt_decay if cfg.decay_matrices_only else None
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, decay_filter=decay)
    if parallel is not None and parallel.zero:
        return ZeroAdamW(model, parallel.comm, **kwargs)
    return optim.AdamW(model.params, **kwargs)


def model_from_checkpoint(directory, backend=None, dtype=None):
    """(model, tokenizer, checkpoint) from a GPT checkpoint (plain, int8 or LoRA adapter), on any backend.

    Kept for one release: it is ``npflux.checkpoint.load_model(directory, backend, dtype, expect=GPT_KINDS)``,
    which also says clearly when the directory holds another kind (a seq2seq model, an SAE).
    """
    return load_model(directory, backend, dtype, expect=GPT_KINDS)


def train(model_config: GPTConfig, cfg: TrainConfig, train_data, val_data, tokenizer=None, resume=False,
          log=print, overwrite=False, parallel: DataParallel | None = None, objective=None):
    """Train a GPT on host token arrays; returns (model, TrainState). Writes into ``cfg.out_dir``.

    ``objective``: what each step minimises, when not the next token's
    cross-entropy: an object with ``kind`` (the checkpoint kind it saves),
    ``config`` (a dict saved in the checkpoint's config under ``kind``'s
    key ``config_key``, and checked on ``resume``), ``loss(model, batch)`` and
    ``backward(model, scale)`` (``npflux.training.distill.Distillation``). The
    evaluations stay the cross-entropy of the labels, so runs compare.

    ``out_dir/ckpt`` is the latest checkpoint, ``out_dir/log.jsonl`` one JSON
    line per evaluation, ``out_dir/loss.png`` the loss curves. A checkpoint
    (or log) of another run there is refused before any work unless
    ``resume`` continues it or ``overwrite`` replaces it
    (``npflux.checkpoint.outdir``). A non-finite loss or gradient norm stops
    the run with ``Diverged``: nothing is saved after it, the last good
    checkpoint stays, and log.jsonl and loss.png mark the step.

    ``parallel`` (``npflux.distributed.DataParallel``): train data-parallel
    over the ranks of its communicator, every rank calling ``train`` alike.
    ``cfg.batch_size`` is the global batch, split over the ranks, so a run
    is the same run (to rounding) on any number of ranks and resumes on any
    number. Rank 0 alone prints, writes the log, the plot and the
    checkpoints; evaluation is split over the ranks. An error on one rank
    stops every rank (``distributed.stop_all_on_error``).
    """
    parallel = parallel if parallel is not None else DataParallel()
    with stop_all_on_error(parallel.comm, collective=(Diverged,)):
        return _train(model_config, cfg, train_data, val_data, tokenizer, resume, log, overwrite, parallel,
                      objective)


def _silent(*args, **kwargs):
    """The ``log`` of ranks other than 0: one voice per job."""


def _train(model_config, cfg, train_data, val_data, tokenizer, resume, log, overwrite, parallel, objective):
    comm = parallel.comm
    lead = comm.rank == 0  # rank 0 prints and writes; the others compute
    log = log if lead else _silent
    out = Path(cfg.out_dir)
    ckpt_dir, log_path = out / "ckpt", out / "log.jsonl"
    kind = objective.kind if objective is not None else "gpt"
    claim = claim_output(ckpt_dir, kind=kind, resume=resume, overwrite=overwrite, companions=[log_path],
                         log=log) if lead else None
    if cfg.batch_size < comm.size:
        raise ValueError(f"batch_size {cfg.batch_size} cannot be split over {comm.size} ranks: the batch is the "
                         f"global one, at least one row per rank")
    backend = get_backend(cfg.backend)
    dtype = resolve_dtype(cfg.dtype)
    block_size = cfg.block_size or model_config.block_size
    if block_size > model_config.block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's {model_config.block_size}")

    model = GPT(model_config, seed=cfg.seed, backend=backend, dtype=dtype)
    opt = make_optimizer(model, cfg, parallel)
    batch_rng = get_backend("numpy").rng(cfg.seed)
    state = TrainState()
    saved_step = None  # the step of the checkpoint on disk that this run may fall back to

    if resume:
        ckpt = load_checkpoint(ckpt_dir)  # (after an interrupted save: the previous version, with a warning)
        saved = GPTConfig.from_dict(ckpt.config["model"])
        if saved != model_config:
            differing = ", ".join(f"{f.name} {getattr(saved, f.name)!r} (asked: {getattr(model_config, f.name)!r})"
                                  for f in dataclasses.fields(saved)
                                  if getattr(saved, f.name) != getattr(model_config, f.name))
            raise ValueError(f"--resume: the checkpoint's model differs from the one asked for in {differing}; "
                             f"resume with the checkpoint's settings, or train into another --out-dir")
        _check_resume_state(ckpt, ckpt_dir)
        if objective is not None and ckpt.config.get(objective.config_key) != objective.config:
            raise CheckpointError(f"--resume: {ckpt_dir} was trained with {objective.config_key} "
                                  f"{ckpt.config.get(objective.config_key)}, not {objective.config}")
        if cfg.max_iters < ckpt.step:  # (training would stop at once and write the checkpoint back as if it ran)
            raise ValueError(f"--resume: {ckpt_dir} is at step {ckpt.step}, beyond --max-iters {cfg.max_iters}; "
                             f"--max-iters counts from step 0: pass a number above {ckpt.step} to train on")
        if cfg.max_iters == ckpt.step:
            log(f"{ckpt_dir} is already at step {ckpt.step} = --max-iters: nothing to train, nothing written")
            model.load_state_dict(ckpt.model_state)
            return model, TrainState(step=ckpt.step, **ckpt.extra["train_state"])
        model.load_state_dict(ckpt.model_state)
        opt.load_state_dict(ckpt.optimizer_state)
        try:
            batch_rng = rng_from_json(ckpt.rng_state["batch"], backend=get_backend("numpy"))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"--resume: {ckpt_dir}/meta.json has a batch sampler state that cannot be "
                                  f"restored ({type(exc).__name__}: {exc})") from exc
        state = TrainState(step=ckpt.step, **ckpt.extra["train_state"])
        saved_step = ckpt.step
        log(f"resumed from {ckpt_dir} at step {state.step}")
    rows = shard_range(cfg.batch_size, comm.rank, comm.size)  # this rank's rows of every global batch
    sync = DataParallelSync(model, parallel, rows[1] - rows[0], cfg.batch_size) if comm.size > 1 else None
    if comm.size > 1:
        comm.bcast(flat_buffers(model)[0])  # built from one seed alike; rank 0's bits make sure of it
    comm.barrier()  # every rank has read the checkpoint before rank 0 writes anything
    run_log = None
    if lead:
        claim.begin()  # every refusal is behind us: from here on the run writes
        out.mkdir(parents=True, exist_ok=True)
        run_log = RunLog(log_path, kept=state.history)  # lines past the checkpoint belonged to a run that died

    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum
    log(f"model: {model.num_parameters():,} parameters ({model.size_mb():.2f} MB), backend {backend.name}, {dtype}; "
        f"{tokens_per_step} tokens per step")
    if comm.size > 1:
        log(f"data parallel: {comm.size} ranks ({comm.name}), {rows[1] - rows[0]} rows of the batch of "
            f"{cfg.batch_size} on rank 0, gradients {parallel.describe()}")
    if isinstance(opt, ZeroAdamW):
        mine, whole = opt.moment_bytes()
        log(f"ZeRO-1: AdamW moments {mine / 1e6:.2f} MB on rank 0 (unsharded: {whole / 1e6:.2f} MB per rank)")

    def evaluate(step):
        train_loss = estimate_loss(model, train_data, cfg.eval_iters, cfg.batch_size, block_size,
                                   cfg.seed + 2 * step + 1, comm)
        val_loss = estimate_loss(model, val_data, cfg.eval_iters, cfg.batch_size, block_size, cfg.seed + 2 * step + 2, comm)
        for name, value in (("train", train_loss), ("validation", val_loss)):
            if not math.isfinite(value):
                raise Diverged(f"the {name} loss is {value:.4g}")
        entry = {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": cfg.lr_at(min(step, cfg.max_iters)),
                 "time": time.time()}
        state.history.append(entry)
        if run_log:
            run_log.append(entry)
        if val_loss < state.best_val:
            state.best_val, state.evals_since_best = val_loss, 0
        else:
            state.evals_since_best += 1
        return entry

    def save():
        nonlocal saved_step
        optimizer_state = opt.state_dict()  # (a collective under ZeRO: every rank takes part)
        saved_step = state.step
        if not lead:
            return
        save_checkpoint(
            ckpt_dir, model_state=model.state_dict(),
            config={"model": model_config.to_dict(), "train": dataclasses.asdict(cfg),
                    **({objective.config_key: objective.config} if objective is not None else {})},
            tokenizer=tokenizer.to_dict() if tokenizer is not None else None,
            optimizer_state=optimizer_state, step=state.step,
            rng_state={"batch": rng_state_to_json(batch_rng),
                       "dropout": None},  # masks are reseeded from (seed, step) at every step
            extra={"train_state": {"best_val": state.best_val, "evals_since_best": state.evals_since_best,
                                   "history": state.history}},
            kind=kind,  # save_gpt's layout, plus what resuming needs
        )

    has_dropout = model_config.dropout > 0
    bar = progress(cfg.max_iters, enabled=cfg.progress and lead, initial=state.step)
    model.train()
    stopped_early = False
    t_last, tokens_since = time.perf_counter(), 0
    try:
        while state.step < cfg.max_iters:
            step = state.step
            if step % cfg.eval_interval == 0 and (not state.history or state.history[-1]["step"] != step):
                e = evaluate(step)
                msg = f"step {step}: train loss {e['train_loss']:.4f}, val loss {e['val_loss']:.4f}"
                bar.write(msg) if bar else log(msg)
                t_last, tokens_since = time.perf_counter(), 0  # tokens/s counts training, not evaluation
                if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                    log(f"early stopping at step {step}: no val improvement in {state.evals_since_best} evaluations")
                    stopped_early = True
                    break

            opt.lr = cfg.lr_at(step)
            if has_dropout:  # the step's masks depend on (seed, step) alone: resume draws the same ones
                # (each rank its own masks: its rows are other rows; so dropout is not bit-comparable across N)
                key = [cfg.seed, step] if comm.size == 1 else [cfg.seed, step, comm.rank]
                reseed_dropout(model, int(np.random.SeedSequence(key).generate_state(1)[0]))
            micro_batches = [get_batch(train_data, cfg.batch_size, block_size, batch_rng, rows=rows)
                             for _ in range(cfg.grad_accum)]
            hooks = {} if objective is None else {"loss": lambda batch: objective.loss(model, batch),
                                                  "backward": lambda scale: objective.backward(model, scale)}
            loss, _ = train_step(model, opt, micro_batches, grad_clip=cfg.grad_clip, sync=sync, **hooks)
            state.step += 1
            tokens_since += tokens_per_step

            if bar:
                now = time.perf_counter()
                if now - t_last > 0.5:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_since / (now - t_last):,.0f}", refresh=False)
                    t_last, tokens_since = now, 0
                bar.update(1)
            if cfg.checkpoint_interval and state.step % cfg.checkpoint_interval == 0 and state.step < cfg.max_iters:
                save()

        if not stopped_early:
            e = evaluate(state.step)
            msg = f"step {state.step}: train loss {e['train_loss']:.4f}, val loss {e['val_loss']:.4f}"
            bar.write(msg) if bar else log(msg)
    except Diverged as exc:
        if bar:
            bar.close()
        entry = {"step": state.step, "diverged": str(exc), "lr": opt.lr, "time": time.time()}
        if lead:
            run_log.append(entry)
            plot_losses(state.history + [entry], out / "loss.png", log=log)
        backups = claim.backups if lead else ()
        kept = (f"the last good checkpoint {ckpt_dir} (step {saved_step}) is kept" if saved_step is not None else
                "no checkpoint was written" + "".join(f"; the replaced one waits in {b}" for b in backups))
        again = "--resume" if saved_step is not None else "run again with --overwrite (this run's log is there)"
        raise Diverged(f"training diverged at step {state.step}: {exc} (learning rate {opt.lr:.3g}); {kept}. "
                       f"Lower --learning-rate, set --grad-clip or train in float32, then {again}") from None
    if bar:
        bar.close()
    save()
    if lead:
        claim.complete()
        plot_losses(state.history, out / "loss.png", log=log)
    return model, state


def evaluate_text(model, tokenizer, text, batch_size=16, doc_sep=None, progress=False):
    """Loss (nats/token), perplexity and bits per character of ``text``.

    The text is tokenized as training saw it (``npflux.data.pack_documents``:
    ``[BOS] doc [EOS]`` per document, split at ``doc_sep``, for tokenizers
    that have those marks) and cut into non-overlapping windows of
    block_size + 1 tokens, each predicting its last block_size tokens (a
    remainder shorter than a window is left out). Bits per character divide
    the total loss in bits by the number of characters of the text those
    predicted tokens stand for (``npflux.data.count_chars``: an [EOS] counts
    as the separator it replaced), so models with different tokenizers can be
    compared on the same text. ``progress``: a bar over the batches on stderr.
    """
    import numpy as _host  # host-side token ids only

    from ..data import count_chars, pack_documents

    if not text:  # BPE would still score [EOS] after [BOS]: a loss over no characters at all
        raise ValueError("evaluate_text: the text is empty")
    ids = _host.asarray(pack_documents(tokenizer, text, doc_sep), dtype=_host.int64)
    if len(ids) < 2:
        raise ValueError("evaluate_text: the text must hold at least two tokens")
    T = min(model.config.block_size, len(ids) - 1)
    n_windows = (len(ids) - 1) // T
    mean = windows_loss(model, ids, batch_size, progress_label="eval" if progress else None)  # every window holds T predicted tokens: the per-token mean
    total_tokens = n_windows * T
    total_loss = mean * total_tokens
    predicted = ids[1 : n_windows * T + 1]
    chars = count_chars(tokenizer, predicted, doc_sep)
    if doc_sep and len(predicted) == len(ids) - 1 and getattr(tokenizer, "eos_id", None) == ids[-1]:
        chars -= len(doc_sep)  # the last document's [EOS] replaced no separator
    return {"loss": mean, "perplexity": math.exp(mean), "bits_per_char": total_loss / math.log(2) / max(chars, 1),
            "tokens": total_tokens, "chars": chars}

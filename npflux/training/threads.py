"""Data parallelism over the cores of one process: a step's batch rows split between replicas of the model.

NumPy runs each element-wise operation on one core. ``parallel_map`` splits
the larger ones over the worker threads, but a small model's step is hundreds
of small operations, and every split pays a hand-off between threads (about
90 µs on a 2-core VM) while the rest run on one core. Here the split is made
once per step instead, at the top: worker thread k runs the WHOLE forward and
backward of its share of the batch rows on replica k of the model, with a
single-threaded BLAS, and the replicas' gradients are added afterwards. It is
MPI's data parallelism (``npflux.distributed``) inside one process, with the
all-reduce replaced by an addition in shared memory.

Replica k is a model of the same structure whose parameters ARE the model's
arrays (``Module.share_parameters_of``): an optimizer step is seen by every
replica at once, and only the gradients are its own. Replica 0 is the model
itself, run on the calling thread.

The same gradient as one pass over the batch. Cross-entropy is a mean over
the N targets that are not ignored; share k holds N_k of them and its mean
loss L_k, so the batch's loss is sum_k (N_k / N) L_k, and each replica's
backward is scaled by N_k / N. Only the order of the sums over the batch
rows differs (a weight's gradient sums share by share, then the shares are
added), so results agree with the one-pass step to rounding, not to the bit;
two runs with the same thread count agree to the bit.

Dropout: each replica draws its masks from a generator seeded, at every
step, from the model's own generator, so a run stays reproducible from its
seed (and a resumed run draws the same masks), but the masks differ from
those of an unsplit step.

When it runs (``settings.split_batch``): "auto" splits where each thread's
share of the step's matrix products is at least ``MIN_SPLIT_FLOP``. Measured
on a 2-core AMD EPYC (Zen 4), 2 threads, float32, in one process each way in turn
(the benchmark harness's numbers with and without the split: docs/benchmarks.md):
nanoGPT's CPU model (12×64 tokens, 0.8M parameters, 1.9 GFLOP a share)
39.1 → 31.3 ms a step, shakespeare-s2 (16×32, 2.7M, 4.1 GFLOP a share)
70.9 → 68.0 ms, but shakespeare-s1 (16×32, 0.2M, 0.3 GFLOP a share)
9.6 → 13.0 ms: there the two threads mostly wait for each other's Python.
Only where it is the same computation: the model's own forward and
backward (no custom loss), one process (no MPI sync), NumPy on the CPU, and
a model that can be rebuilt from its config (a GPT, not one whose layers
were swapped for LoRA's).
"""
from __future__ import annotations

import weakref

import numpy as np

from .. import settings
from ..distributed import flat_buffers, shard_range
from ..nn.layers import reseed_dropout
from ..parallel import num_threads, one_thread, parallel_map, row_chunks

MIN_SPLIT_FLOP = 1e9       # a thread's share of the step's matrix products below this stays unsplit (see above)
IGNORE_INDEX = -100        # cross_entropy_forward's default: targets it leaves out of the mean

# model -> (what it was built for, its BatchSplit or None where the model could not be replicated)
_REPLICAS = weakref.WeakKeyDictionary()


class BatchSplit:
    """``model`` and ``n - 1`` replicas sharing its parameters; ``forward_backward`` runs a batch split over them."""

    def __init__(self, model, n: int):
        self.model = model
        self.replicas = [_replica(model) for _ in range(n - 1)]
        self.n = n
        # The gradients are added buffer to buffer (ValueError without them). Rebinding them rebinds the
        # parameters too (flatten_parameters), and batch_split then builds a new BatchSplit.
        self.flat_grads = [flat_buffers(m)[1] for m in [model] + self.replicas]

    def forward_backward(self, micro_batches, scale: float) -> float:
        """Run every micro-batch's forward and backward with its rows split over the threads; return the sum of
        the micro-batches' mean losses, as ``train_step`` adds them up.

        The model's gradients get every share's contribution (``scale`` times the gradient of the batch's
        mean loss), added into what they hold, as one ``backward(loss_scale=scale)`` would.
        """
        model = self.model
        models = [model] + self.replicas
        for r in self.replicas:
            r.train(model.training)
            r.zero_grad()
            if hasattr(model, "dropout_rng"):  # masks of its own, from the model's stream
                reseed_dropout(r, int(model.dropout_rng.integers(2**63)))
        errors = np.geterr()  # the caller's floating-point error handling, for the workers too (it is per thread)
        total = 0.0
        for idx, targets in micro_batches:
            shares = [shard_range(idx.shape[0], k, self.n) for k in range(self.n)]
            counts = [int((targets[a:b] != IGNORE_INDEX).sum()) for a, b in shares]
            N = sum(counts)
            jobs = [(m, idx[a:b], targets[a:b], c / N) for m, (a, b), c in zip(models, shares, counts) if b > a]

            def run(job):
                m, x, y, weight = job
                with one_thread(), np.errstate(**errors):  # this thread IS one of the workers: its ops stay on it
                    _, loss = m.forward(x, y)
                    m.backward(loss_scale=scale * weight)
                return float(loss) * weight
            total += sum(parallel_map(run, jobs))
        grads = self.flat_grads[0]
        for theirs in self.flat_grads[1:]:
            parallel_map(lambda s: np.add(grads[s], theirs[s], out=grads[s]), row_chunks(np, grads.size))
        return total


def shares(model) -> int:
    """How many shares the split ``train_step`` built for ``model`` has (1: none was built, or the model
    could not be replicated; each step still decides by itself whether to use it)."""
    _, split = _REPLICAS.get(model, (None, None))
    return split.n if split is not None else 1


def _replica(model):
    replica = type(model)(model.config, backend=model.backend, dtype=model.dtype)
    replica.share_parameters_of(model)
    return replica


def batch_split(model, micro_batches, *, custom=False, one_process=True):
    """The ``BatchSplit`` ``train_step`` should run ``micro_batches`` with, or None for the usual one pass.

    ``custom``: the caller gave its own loss, backward or gradients (they are
    not known to split); ``one_process``: no MPI sync (its hooks watch the
    model's own backward).
    """
    mode = settings.get("split_batch")
    n = num_threads()
    if mode is False or n < 2 or custom or not one_process or not _splittable(model, micro_batches):
        return None
    rows = min(int(x.shape[0]) for x, _ in micro_batches)
    if rows < 2:
        return None
    if mode == "auto":
        tokens = rows * int(micro_batches[0][0].shape[1])
        if 6.0 * model.num_parameters() * tokens / min(n, rows) < MIN_SPLIT_FLOP:
            return None
    n = min(n, rows)
    # The replicas hold the model's very arrays: a new thread count, or parameters rebound (by
    # flatten_parameters, or a layer swap), builds them again. The model keeps its arrays alive, so
    # their ids cannot be reused while it holds them.
    key = (n, tuple(map(id, model.params.values())))
    built, split = _REPLICAS.get(model, (None, None))
    if built != key:
        try:
            split = BatchSplit(model, n)
        except (TypeError, ValueError, AttributeError):  # not rebuildable from its config alone: one pass
            split = None
        _REPLICAS[model] = (key, split)
    return split


def _splittable(model, micro_batches) -> bool:
    """A model on the CPU with a config to rebuild it from, fed (idx, targets) host arrays."""
    if not hasattr(model, "config") or getattr(model, "xp", None) is not np:  # CuPy: the device runs ops whole
        return False
    for batch in micro_batches:
        if len(batch) != 2 or not all(isinstance(a, np.ndarray) and a.ndim == 2 for a in batch):
            return False
        idx, targets = batch
        if idx.shape != targets.shape or not (targets != IGNORE_INDEX).any():
            return False
    return True

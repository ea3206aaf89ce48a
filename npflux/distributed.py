"""Data-parallel training over MPI: the gradients averaged across ranks, the optimizer state sharded.

    mpiexec -n N npflux train ...          (pip install -e ".[mpi]": mpi4py and the mpich wheel's mpiexec)

Every rank builds the same model from the same seed, draws its rows of the
global batch (``shard_range``), runs the forward and backward on them, and
the ranks sum their gradients before the optimizer step. npflux keeps every
gradient in one flat buffer (``Module.flatten_parameters``), so that sum is
one ``Allreduce`` of one array, or a few of its slices.

Why a sum gives one process's gradient. The loss of a global batch of B rows
is the mean over its rows; rank r holds b_r of them, and the mean of B rows
is the weighted sum of the ranks' means::

    L = (1/B) sum_rows l  =  sum_r (b_r / B) * L_r       so   dL/dw = sum_r (b_r / B) * dL_r/dw

Each rank scales its backward by its share b_r / B (``GradientSync.share``)
and the all-reduce adds: no division after it, and uneven shares (a batch
of 16 over 3 ranks: 6, 5, 5) are exact too. Only the order of the additions
differs from one process (each rank sums its rows, then the ranks' sums are
added), so results agree to the rounding of that reordering, not bit for bit.

Three ways to make the gradients whole, all behind ``GradientSync.reduce``,
the one hook ``training.loop.train_step`` calls:

- blocking (the reference): after the backward, one ``Allreduce`` of the flat buffer;
- overlapped (the default, as PyTorch's DistributedDataParallel): the buffer
  is cut into buckets of about ``bucket_mb`` from its end, which is where the
  backward starts writing (parameters are stored in forward order, so the
  backward visits them back to front). As soon as the backward has written
  every gradient of a bucket, that bucket's non-blocking ``Iallreduce``
  starts; ``reduce`` waits for them all just before the optimizer step.
  Buckets are views of the buffer, never copies;
- ZeRO stage 1 (``zero=1``): a ``Reduce_scatter`` leaves each rank the sum
  of its own slice of the gradients only; AdamW's moments exist for that
  slice only (``ZeroAdamW``); each rank updates its slice of the parameters
  and an ``Allgatherv`` gives every rank all of them again.

The communicator is an object with a handful of collectives on flat arrays
(``Communicator``). ``LOCAL`` is the one-process one, where every
collective does nothing, so the training loop has no ``if distributed``
branches. ``MPICommunicator`` wraps mpi4py (NumPy arrays, or CuPy arrays
where the MPI is CUDA-aware); ``NCCLCommunicator`` runs the same
collectives on the GPU through ``cupy.cuda.nccl``.

A failing rank must not leave the others waiting forever in a collective:
``stop_all_on_error`` prints the failing rank's error and calls
``MPI_Abort``, which ends every rank of the job. Checkpoints are written by
rank 0 alone and atomically, so the last completed one stays loadable.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

from . import optim, settings
from .backend import flat_base, get_array_module

INSTALL = 'pip install -e ".[mpi]"'


class DistributedUnavailable(ValueError):
    """Distributed training was asked for where MPI (mpi4py) is not installed or not launched."""


def shard_range(total: int, rank: int, size: int):
    """(start, stop) of rank ``rank``'s share when ``total`` items are split over ``size`` ranks.

    Contiguous and as even as can be: the first ``total % size`` ranks get one
    more. Used for a rank's rows of the batch and its slice of the optimizer.
    """
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_counts(total: int, size: int):
    """Every rank's share of ``total`` (the counts of ``shard_range``), and where each starts."""
    ranges = [shard_range(total, r, size) for r in range(size)]
    return [b - a for a, b in ranges], [a for a, _ in ranges]


# ---------------------------------------------------------------------------
# communicators
# ---------------------------------------------------------------------------


class Communicator:
    """The collectives data parallelism needs, on flat contiguous arrays, in place; here for one process.

    With one rank every collective leaves its data as it is, so this class is
    both the interface and the single-process implementation (``LOCAL``).
    """

    rank, size, name = 0, 1, "local"

    def sum(self, value: float) -> float:
        """The sum of a Python float over the ranks (every rank gets it)."""
        return value

    def allreduce(self, buf):
        """``buf`` <- the sum of every rank's ``buf``."""

    def iallreduce(self, buf):
        """Start ``allreduce(buf)``; returns a request with ``wait()`` and ``test()``."""
        return _Done()

    def reduce_scatter(self, buf, counts, out):
        """``out`` <- this rank's part (``counts[rank]`` items, ranks' parts back to back) of the sum of ``buf``."""
        out[...] = buf[: counts[0]]

    def allgather(self, buf, counts, displs):
        """Every rank's part ``buf[displs[r]: displs[r] + counts[r]]`` copied to every rank, in place."""

    def bcast(self, buf, root=0):
        """``buf`` <- rank ``root``'s ``buf``."""

    def barrier(self):
        """Wait until every rank got here."""

    def abort(self, code=1):
        """End every rank of the job."""
        raise SystemExit(code)


class _Done:
    """The request of a collective that finished when it started."""

    def wait(self):
        pass

    def test(self):
        return True


LOCAL = Communicator()


def _sync_device(buf):
    """A CuPy array's pending kernels finished before MPI reads it (MPI knows nothing of CUDA streams)."""
    if type(buf).__module__.startswith("cupy"):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


class MPICommunicator(Communicator):
    """The collectives over an mpi4py communicator (MPI.COMM_WORLD by default).

    NumPy arrays go through mpi4py's buffer interface without copies; CuPy
    arrays through ``__cuda_array_interface__``, which needs a CUDA-aware
    MPI (else use ``NCCLCommunicator``).
    """

    name = "mpi"

    def __init__(self, comm=None):
        MPI = import_mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def sum(self, value):
        return float(self.comm.allreduce(float(value), op=self.MPI.SUM))

    def allreduce(self, buf):
        _sync_device(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def iallreduce(self, buf):
        _sync_device(buf)
        return _MPIRequest(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))

    def reduce_scatter(self, buf, counts, out):
        _sync_device(buf)
        self.comm.Reduce_scatter(buf, out, recvcounts=list(counts), op=self.MPI.SUM)

    def allgather(self, buf, counts, displs):
        _sync_device(buf)
        self.comm.Allgatherv(self.MPI.IN_PLACE, [buf, (list(counts), list(displs))])

    def bcast(self, buf, root=0):
        _sync_device(buf)
        self.comm.Bcast(buf, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


class _MPIRequest:
    def __init__(self, request):
        self.request = request

    def wait(self):
        self.request.Wait()

    def test(self):
        # Testing is also what drives a non-blocking collective forward: MPICH, without an
        # asynchronous progress thread, moves its messages only inside MPI calls.
        return self.request.Test()


class NCCLCommunicator(Communicator):
    """The same collectives on CuPy arrays through NCCL (``cupy.cuda.nccl``), one GPU per rank.

    MPI still starts the job and hands the NCCL id from rank 0 to the others;
    the arrays never leave the GPU. NCCL calls are queued on the current CUDA
    stream, so they follow the backward's kernels without a host
    synchronisation, and ``iallreduce`` returns at once: its request waits on
    the stream. Rank r uses GPU ``r % (GPUs on its node)``.
    """

    name = "nccl"

    def __init__(self, mpi: MPICommunicator | None = None):
        import cupy
        from cupy.cuda import nccl

        self.mpi = mpi or MPICommunicator()
        self.rank, self.size = self.mpi.rank, self.mpi.size
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = self.mpi.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl, self.cupy = nccl, cupy
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _args(self, buf):
        types = {"float16": self.nccl.NCCL_FLOAT16, "float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64}
        return buf.data.ptr, buf.size, types[buf.dtype.name], self.cupy.cuda.get_current_stream().ptr

    def sum(self, value):
        return self.mpi.sum(value)

    def allreduce(self, buf):
        ptr, n, dtype, stream = self._args(buf)
        self.comm.allReduce(ptr, ptr, n, dtype, self.nccl.NCCL_SUM, stream)

    def iallreduce(self, buf):
        self.allreduce(buf)  # queued on the stream: the host goes on at once
        return _StreamRequest(self.cupy.cuda.get_current_stream())

    def reduce_scatter(self, buf, counts, out):
        # NCCL's reduce-scatter takes equal parts; counts from shard_counts differ by at most one,
        # so the sum goes through an all-reduce and each rank keeps its part.
        self.allreduce(buf)
        start = sum(counts[: self.rank])
        out[...] = buf[start: start + counts[self.rank]]

    def allgather(self, buf, counts, displs):
        # One broadcast per rank's part (parts of unequal size, in place).
        for r in range(self.size):
            part = buf[displs[r]: displs[r] + counts[r]]
            ptr, n, dtype, stream = self._args(part)
            self.comm.broadcast(ptr, ptr, n, dtype, r, stream)

    def bcast(self, buf, root=0):
        ptr, n, dtype, stream = self._args(buf)
        self.comm.broadcast(ptr, ptr, n, dtype, root, stream)

    def barrier(self):
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def abort(self, code=1):
        self.mpi.abort(code)


class _StreamRequest:
    def __init__(self, stream):
        self.event = stream.record()

    def wait(self):
        self.event.synchronize()

    def test(self):
        return self.event.done


def import_mpi():
    """mpi4py's MPI module, or a one-line error saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedUnavailable(f"distributed training needs mpi4py and an MPI library ({exc}); "
                                     f"install them with: {INSTALL}") from None
    return MPI


def launched_ranks():
    """How many processes an MPI launcher started this one among (``settings.mpi_ranks``), or None."""
    return settings.get("mpi_ranks")


def world(backend_name: str = "numpy", require: str | None = None) -> Communicator:
    """The communicator of this job: MPI's world when an MPI launcher started us, else ``LOCAL``.

    ``require`` names an option that only makes sense across ranks (``"--zero 1"``):
    outside ``mpiexec`` it is then a one-line error. On the GPU
    (``backend_name="cupy"``) the collectives go through NCCL.
    """
    if launched_ranks() is None:
        if require:
            raise DistributedUnavailable(f"{require} works across MPI ranks: run under mpiexec -n N "
                                         f"(installed by {INSTALL})")
        return LOCAL
    mpi = MPICommunicator()
    return NCCLCommunicator(mpi) if backend_name == "cupy" and mpi.size > 1 else mpi


@contextlib.contextmanager
def stop_all_on_error(comm: Communicator, collective=()):
    """Run a block on every rank; an exception on one rank ends them all, with its message, not a hang.

    The other ranks would wait forever in their next collective for the rank
    that failed, so the failing rank prints ``rank r of N: <error>`` on stderr
    and calls ``MPI_Abort``, which ends every process of the job (mpiexec
    then exits non-zero). Exceptions of the types in ``collective`` are raised
    on every rank at once (a diverged loss is the same number everywhere), so
    they propagate as in one process. With one rank, nothing changes.
    """
    if comm.size == 1:
        yield
        return
    try:
        yield
    except collective:
        raise
    except BaseException as exc:  # noqa: BLE001 -- also KeyboardInterrupt: the job must not hang
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"npflux: rank {comm.rank} of {comm.size} failed: {type(exc).__name__}: {message}; "
              f"stopping every rank", file=sys.stderr, flush=True)
        if settings.get("debug"):
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        comm.abort(1)
        raise


# ---------------------------------------------------------------------------
# the gradient synchronisation train_step calls
# ---------------------------------------------------------------------------


@dataclass
class DataParallel:
    """How to train across the ranks of ``comm``: ``zero`` 0 (plain) or 1 (AdamW's moments sharded);
    ``overlap``: bucketed non-blocking all-reduces during the backward (False: one blocking
    all-reduce after it, the reference); ``bucket_mb``: the buckets' size in MB."""
    comm: Communicator = LOCAL
    zero: int = 0
    overlap: bool = True
    bucket_mb: float = 1.0

    def __post_init__(self):
        if self.zero not in (0, 1):
            raise ValueError(f"zero must be 0 or 1 (ZeRO stage 1: the optimizer state sharded), got {self.zero}")
        if not (self.bucket_mb > 0 and math.isfinite(self.bucket_mb)):
            raise ValueError(f"bucket_mb must be a finite number > 0, got {self.bucket_mb}")

    def describe(self) -> str:
        """How the gradients travel, in words (for the run's log)."""
        if self.zero:
            return "reduce-scattered, AdamW sharded (ZeRO-1)"
        return "all-reduced in buckets during the backward" if self.overlap else "all-reduced after the backward"


class GradientSync:
    """What ``train_step`` asks of the ranks: its share of the batch, and the gradients made whole.

    ``share``: this rank's rows over the global batch's (its backward is scaled
    by it, see the module docstring). ``backward(run, last)`` runs one
    micro-batch's backward; on the last micro-batch of a step the overlapped
    mode starts each bucket's all-reduce as the backward completes it.
    ``reduce(grads)`` returns the gradients the optimizer steps with: all of
    them, summed over the ranks, or (ZeRO) this rank's slice of them.
    ``norm_across`` adds up the squares of a gradient norm over the ranks when
    each holds only a slice (else None). ``wait_seconds`` counts the time spent
    waiting for communication (the benchmark reports it).

    The base class is the one-process case: nothing to do.
    """

    share = 1.0
    norm_across = None
    wait_seconds = 0.0

    def backward(self, run, last):
        run()

    def reduce(self, grads):
        return grads

    def sum(self, value):
        return value


def flat_buffers(model):
    """The model's (flat parameters, flat gradients), the two buffers of ``Module.flatten_parameters``."""
    params, grads = model.params, model.grads
    flat_p, flat_g = flat_base(params.values()), flat_base(grads[n] for n in params)
    if flat_p is None or flat_g is None:
        raise ValueError("data-parallel training needs the model's parameters and gradients in flat buffers "
                         "(Module.flatten_parameters)")
    return flat_p, flat_g


class DataParallelSync(GradientSync):
    """``GradientSync`` across the ranks of ``parallel.comm`` for ``model``, holding ``rows`` of ``batch`` rows."""

    def __init__(self, model, parallel: DataParallel, rows: int, batch: int):
        self.comm, self.parallel = parallel.comm, parallel
        self.share = rows / batch
        self.flat_p, self.flat_g = flat_buffers(model)
        self.wait_seconds = 0.0
        self.zero = ZeroLayout(model.params, self.comm) if parallel.zero else None
        self.norm_across = self.comm.sum if self.zero else None
        self.buckets = buckets(model.params, self.flat_g, int(parallel.bucket_mb * 2**20))
        self._pending, self._next, self._armed = [], 0, False
        if parallel.overlap and not self.zero and self.comm.size > 1:
            for module, start in _leaf_modules(model):
                _after_backward(module, lambda start=start: self._hook(start))

    def sum(self, value):
        return self.comm.sum(value)

    def backward(self, run, last):
        """Run one micro-batch's backward; during the last one, the hooks launch the buckets it completes."""
        if last:
            self._pending, self._next = [], 0
        self._armed = last and self.parallel.overlap and not self.zero and self.comm.size > 1
        try:
            run()
        finally:
            self._armed = False

    # -- overlapped: buckets launched as the backward completes them ----------------------
    def _hook(self, start):
        if self._armed:
            self._launch_down_to(start)

    def _launch_down_to(self, start):
        """The backward has finished every module whose parameters start at ``start`` or later, so the
        gradients from ``start`` to the end of the buffer are final: launch the buckets they fill."""
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= start:
            lo, hi = self.buckets[self._next]
            self._pending.append(self.comm.iallreduce(self.flat_g[lo:hi]))
            self._next += 1
        for request in self._pending:  # drive the ones in flight forward (see _MPIRequest.test)
            request.test()

    def reduce(self, grads):
        t0 = time.perf_counter()
        if self.zero:
            grads = self.zero.reduce_scatter(self.flat_g)
        elif self.parallel.overlap:
            self._launch_down_to(0)  # whatever the hooks did not launch (a module without one)
            for request in self._pending:
                request.wait()
            self._pending = []
        else:
            self.comm.allreduce(self.flat_g)
        self.wait_seconds += time.perf_counter() - t0
        return grads


def buckets(params: dict, flat_g, bucket_bytes: int):
    """(start, stop) slices of the flat gradient buffer, from its end to its start, each at least
    ``bucket_bytes`` (but the last), cut at parameter boundaries: the order the backward fills them."""
    bounds, offset = [], 0
    for p in params.values():
        bounds.append((offset, offset + int(p.size)))
        offset += int(p.size)
    out, stop = [], offset
    for start, _ in reversed(bounds):
        if (stop - start) * flat_g.itemsize >= bucket_bytes:
            out.append((start, stop))
            stop = start
    if stop > 0:
        out.append((0, stop))
    return out


def _leaf_modules(model):
    """(module, offset of its first parameter in the flat buffer) for every module owning parameters."""
    offset, starts = 0, {}
    for module, name, _ in model._owners():
        starts.setdefault(id(module), (module, offset))
        offset += int(module.p[name].size)
    # (a holder of parameters its parent differentiates, as an untied lm_head, has no backward of its own)
    return [(m, start) for m, start in starts.values() if callable(getattr(m, "backward", None))]


def _after_backward(module, callback):
    """Call ``callback()`` each time ``module.backward`` returns: the hook the overlap hangs on.

    The module's own method is kept and wrapped on the instance, so the layer
    code knows nothing of it. Correctness never depends on a hook firing
    (``reduce`` launches what is left), only how early communication starts.
    """
    inner = module.backward

    def backward(*args, **kwargs):
        out = inner(*args, **kwargs)
        callback()
        return out

    object.__setattr__(module, "backward", backward)


# ---------------------------------------------------------------------------
# ZeRO stage 1
# ---------------------------------------------------------------------------


class ZeroLayout:
    """Which slice of the flat buffers each rank owns under ZeRO-1, and that slice as named pieces.

    Rank r owns elements ``[lo, hi)`` (``shard_range`` of the parameter count):
    it receives the summed gradients there, keeps AdamW's moments there only,
    and updates the parameters there. A slice may start or end inside a
    parameter, so its pieces are 1-D views named after the parameter they cut.
    """

    def __init__(self, params: dict, comm: Communicator):
        self.comm = comm
        self.names = list(params)
        self.shapes = {n: p.shape for n, p in params.items()}
        self.total = sum(int(p.size) for p in params.values())
        self.counts, self.displs = shard_counts(self.total, comm.size)
        self.lo, self.hi = shard_range(self.total, comm.rank, comm.size)
        self._recv = None

    def pieces(self, flat):
        """name -> 1-D view of ``flat`` for every parameter that overlaps this rank's slice."""
        out, offset = {}, 0
        for name in self.names:
            size = int(math.prod(self.shapes[name]))
            a, b = max(offset, self.lo), min(offset + size, self.hi)
            if a < b:
                out[name] = flat[a:b]
            offset += size
        return out

    def reduce_scatter(self, flat_g):
        """This rank's slice of the gradients summed over the ranks, written into ``flat_g[lo:hi]``;
        returns it as pieces (the rest of ``flat_g`` is left unreduced: nobody reads it)."""
        if self._recv is None:
            self._recv = get_array_module(flat_g).empty(self.hi - self.lo, dtype=flat_g.dtype)
        self.comm.reduce_scatter(flat_g, self.counts, self._recv)
        flat_g[self.lo: self.hi] = self._recv
        return self.pieces(flat_g)

    def gather(self, flat):
        """Every rank's slice of ``flat`` to every rank (in place)."""
        self.comm.allgather(flat, self.counts, self.displs)


class ZeroAdamW:
    """AdamW with its moments sharded over the ranks (ZeRO stage 1, as llm.c's ``zero_stage 1``).

    Each rank keeps m and v for its slice of the parameters only (1/N of the
    memory), updates that slice from its slice of the summed gradients
    (``ZeroLayout.reduce_scatter``), and the ranks then all-gather the
    parameters. AdamW is element-wise, so the slices' updates are exactly the
    whole update cut in pieces: the same as ``optim.AdamW`` on one process,
    weight decay included (which parameters decay is decided on the whole
    parameter, as there).

    ``state_dict`` and ``load_state_dict`` speak ``optim.AdamW``'s format, the
    whole moments, so a checkpoint does not know how many ranks wrote it;
    ``state_dict`` is a collective (every rank must call it).
    """

    kind = optim.AdamW.kind

    def __init__(self, model, comm: Communicator, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 decay_filter=None):
        params = model.params
        self.flat_p, _ = flat_buffers(model)
        self.layout = ZeroLayout(params, comm)
        decayed = {n: decay_filter is None or bool(decay_filter(n, p)) for n, p in params.items()}
        self.inner = optim.AdamW(self.layout.pieces(self.flat_p), lr=lr, betas=betas, eps=eps,
                                 weight_decay=weight_decay, decay_filter=lambda name, _: decayed[name])

    @property
    def lr(self):
        return self.inner.lr

    @lr.setter
    def lr(self, value):
        self.inner.lr = value

    def moment_bytes(self):
        """(bytes of AdamW moments this rank holds, bytes they would take unsharded)."""
        item = self.flat_p.itemsize
        return 2 * (self.layout.hi - self.layout.lo) * item, 2 * self.layout.total * item

    def step(self, grads):
        """Update this rank's slice from ``grads`` (its pieces), then all-gather the parameters."""
        self.inner.step(grads)
        self.layout.gather(self.flat_p)

    def state_dict(self):
        """``optim.AdamW.state_dict()`` of the whole model (a collective: the moments are all-gathered)."""
        state = {k: v for k, v in self.inner.state_dict().items() if not k.startswith(("m.", "v."))}
        xp = get_array_module(self.flat_p)
        for prefix, pieces in (("m", self.inner.m), ("v", self.inner.v)):
            full = xp.zeros(self.layout.total, dtype=self.flat_p.dtype)
            mine = self.layout.pieces(full)
            for name, piece in pieces.items():
                mine[name][...] = piece
            self.layout.gather(full)
            offset = 0
            for name in self.layout.names:
                shape = self.layout.shapes[name]
                size = int(math.prod(shape))
                state[f"{prefix}.{name}"] = full[offset: offset + size].reshape(shape)
                offset += size
        return state

    def load_state_dict(self, state):
        """Load a whole-model AdamW state dict, keeping this rank's slice of the moments."""
        xp = get_array_module(self.flat_p)
        sliced = {k: v for k, v in state.items() if not k.startswith(("m.", "v."))}
        for prefix in ("m", "v"):
            full = xp.empty(self.layout.total, dtype=self.flat_p.dtype)
            offset = 0
            for name in self.layout.names:
                key = f"{prefix}.{name}"
                if key not in state:
                    raise KeyError(f"optimizer state has no {key!r} (was it saved for another model?)")
                size = int(math.prod(self.layout.shapes[name]))
                if tuple(state[key].shape) != tuple(self.layout.shapes[name]):
                    raise ValueError(f"optimizer state {key!r} has shape {tuple(state[key].shape)}, "
                                     f"parameter has {self.layout.shapes[name]}")
                full[offset: offset + size] = xp.asarray(state[key], dtype=self.flat_p.dtype).reshape(-1)
                offset += size
            sliced.update({f"{prefix}.{n}": piece for n, piece in self.layout.pieces(full).items()})
        self.inner.load_state_dict(sliced)

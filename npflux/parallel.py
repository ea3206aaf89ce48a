"""CPU worker threads and the BLAS's own threads: the one place that sets either.

NumPy runs its element-wise loops on one core. It releases the GIL inside
them and inside BLAS calls, though, so independent pieces of one op (the
batch rows of attention, the row blocks of a layer norm, slices of the
optimizer's flat buffer) can run on several cores from a few Python threads:
``parallel_map``. The BLAS (OpenBLAS in NumPy's wheels; MKL or BLIS in other
builds) has threads of its own; they are found and set through threadpoolctl,
the maintained library for exactly that (any BLAS or OpenMP runtime, on Linux,
macOS and Windows).

The rule that keeps the two from fighting: **at most ``num_threads()`` threads
compute at any moment.** Outside ``parallel_map`` the BLAS may use
``num_threads()`` threads (``set_num_threads`` sets both); inside it each
worker's BLAS call runs on one thread, so the workers alone fill the cores.
``num_threads()`` defaults to the CPUs this process may use (its affinity
mask, not the machine's core count), so npflux never oversubscribes a machine
that gave it fewer.

Who decides the count, first match wins:

1. ``with npflux.settings.override(num_threads=n):`` for that block (the BLAS
   cap follows to ``n`` and is put back after);
2. ``set_num_threads(n)``, for the rest of the process;
3. NPFLUX_NUM_THREADS, then OMP_NUM_THREADS (``npflux.settings``; worked out
   once, on first use, when the BLAS is capped to it);
4. the CPUs this process may use.

A scoped override wins over the process-wide call so that a block asking for
one thread gets one thread whatever a script set earlier; a
``set_num_threads`` inside such a block takes effect when it ends.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy

from . import settings

_NUM_THREADS = None   # set_num_threads
_ENV_THREADS = None   # from the environment, read on first use
_SET_CALLS = 0        # set_num_threads calls so far (an override's undo checks for one inside it)
_POOL = None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def num_threads() -> int:
    """Threads npflux computes with on the CPU: its worker pool's size and its BLAS's thread cap.

    An override of ``num_threads`` in force, else ``set_num_threads(n)``, else
    the environment (read once, on first use), else the CPUs this process may use.
    """
    global _ENV_THREADS
    n = settings.overridden("num_threads")
    if n is not None:
        return n
    if _NUM_THREADS is not None:
        return _NUM_THREADS
    if _ENV_THREADS is None:  # read once: ops ask on every call
        _ENV_THREADS = settings.get("num_threads") or usable_cpus()
        # The BLAS starts as many threads as it sees cores; hold it to npflux's budget.
        blas = blas_threads()
        if blas is not None and blas > _ENV_THREADS:
            set_blas_threads(_ENV_THREADS)
    return _ENV_THREADS


def set_num_threads(n: int):
    """Compute on ``n`` threads: ``n`` workers in parallel ops, and the BLAS capped at ``n``.

    1 runs everything on the calling thread with a single-threaded BLAS.
    Inside a ``settings.override(num_threads=...)`` block the override keeps
    ruling until the block ends; then ``n`` does.
    """
    global _NUM_THREADS, _POOL, _SET_CALLS
    if int(n) < 1:
        raise ValueError(f"need at least one thread, got {n}")
    _NUM_THREADS = int(n)
    _SET_CALLS += 1
    if _POOL is not None and _POOL._max_workers != max(_NUM_THREADS - 1, 1):
        _POOL.shutdown(wait=True)
        _POOL = None
    if settings.overridden("num_threads") is None:
        set_blas_threads(_NUM_THREADS)


def _follow_override(n: int):
    """``settings.override(num_threads=n)``: the BLAS capped at ``n`` for the block.

    Returns the undo, run when the block ends: the BLAS's thread counts as they
    were (whoever set them), unless ``set_num_threads`` ran inside the block,
    whose count then takes over.
    """
    saved, calls = [int(c.get_num_threads()) for c in _blas_controllers()], _SET_CALLS
    set_blas_threads(n)

    def undo():
        if _SET_CALLS != calls:
            set_blas_threads(num_threads())
        else:
            for c, count in zip(_blas_controllers(), saved):
                c.set_num_threads(count)
    return undo


settings.on_override("num_threads", _follow_override)


# ---------------------------------------------------------------------------
# the BLAS's threads, through threadpoolctl
# ---------------------------------------------------------------------------
_BLAS = None  # the BLAS libraries' threadpoolctl controllers, found once


def _blas_controllers():
    """threadpoolctl's controllers of the BLAS libraries loaded in this process ([] without it)."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # a dependency, but never fail a computation for a missing thread knob
            _BLAS = []
        else:
            _BLAS = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    return _BLAS


def blas_info() -> list:
    """What threadpoolctl reports of each BLAS: library, version, kernel (``architecture``), threads."""
    return [c.info() for c in _blas_controllers()]


def blas_threads():
    """The BLAS's thread count now, or None when no BLAS could be found."""
    for c in _blas_controllers():
        return int(c.get_num_threads())
    return None


def set_blas_threads(n: int):
    """Set every loaded BLAS's thread count now; returns the new count (None if no BLAS was found)."""
    for c in _blas_controllers():
        c.set_num_threads(int(n))
    return blas_threads()


_BLAS_LOCK = threading.Lock()
_BLAS_HOLDS = [0, []]  # callers inside parallel_map now, the thread counts to restore after the last


class _single_threaded_blas:
    """The BLAS at one thread while any parallel_map runs (several callers may overlap)."""

    def __enter__(self):
        with _BLAS_LOCK:
            if _BLAS_HOLDS[0] == 0:
                _BLAS_HOLDS[1] = [int(c.get_num_threads()) for c in _blas_controllers()]
                for c in _blas_controllers():
                    c.set_num_threads(1)
            _BLAS_HOLDS[0] += 1

    def __exit__(self, *exc):
        with _BLAS_LOCK:
            _BLAS_HOLDS[0] -= 1
            if _BLAS_HOLDS[0] == 0:
                for c, count in zip(_blas_controllers(), _BLAS_HOLDS[1]):
                    c.set_num_threads(count)


# ---------------------------------------------------------------------------
# the worker pool
# ---------------------------------------------------------------------------
def parallel_map(fn, items):
    """``[fn(item) for item in items]``, spread over the worker threads when there are several.

    Only for work that releases the GIL (NumPy array operations on large
    enough arrays) and whose items write to disjoint memory. An exception in
    any item is raised here.
    """
    global _POOL
    items = list(items)
    n = num_threads()
    # Already on a worker (a parallel op inside a parallel op): waiting for the
    # pool from inside it could deadlock, so run here.
    nested = _on_one_thread()
    if n <= 1 or len(items) <= 1 or nested:
        return [fn(item) for item in items]
    if _POOL is None or _POOL._max_workers < n - 1:  # none yet, or an override asks for more
        from concurrent.futures import ThreadPoolExecutor

        if _POOL is not None:
            _POOL.shutdown(wait=False)  # its threads finish their work and exit
        _POOL = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="npflux", initializer=_mark_worker)
    pool = _POOL
    # The workers already use the cores: a BLAS call inside one must not start
    # more threads of its own (measured: attention of one shakespeare-n layer
    # takes 216 ms with single-threaded BLAS in 2 workers, 1462 ms without this).
    # The items go out in n runs of consecutive items, one per thread, and the
    # calling thread works through the first run itself instead of waiting idle:
    # n - 1 hand-offs per call (each costs tens of microseconds), not one per item.
    size = -(-len(items) // n)
    runs = [items[i : i + size] for i in range(0, len(items), size)]
    with _single_threaded_blas():
        futures = [pool.submit(_run_all, fn, run) for run in runs[1:]]
        try:
            results = _run_all(fn, runs[0])
        finally:
            rest = [f.result() for f in futures]  # wait for all, even after an error here
        for part in rest:
            results.extend(part)
        return results


class _ThreadState(threading.local):
    one_thread = False  # a class default: reading it never raises (getattr's default would, each op)


_LOCAL = _ThreadState()


def _on_one_thread() -> bool:
    """True where parallel work must stay on the calling thread: on a worker, or inside ``one_thread()``."""
    return _LOCAL.one_thread  # asked by every op: a thread-local read, not a thread lookup


def _mark_worker():
    """A pool worker's first act: everything it runs stays on it (``one_thread`` for its whole life)."""
    _LOCAL.one_thread = True


@contextlib.contextmanager
def one_thread():
    """``with one_thread():`` every parallel op in the block runs on the calling thread alone.

    For a caller that already keeps every core busy with work of its own (the
    batch shares of ``npflux.training.threads``): the ops must not queue for
    workers that are busy with the other shares.
    """
    before = _LOCAL.one_thread
    _LOCAL.one_thread = True
    try:
        yield
    finally:
        _LOCAL.one_thread = before


def _run_all(fn, items):
    return [fn(item) for item in items]



_MIN_SPLIT_ELEMENTS = 1 << 18  # below this a second thread costs more than it saves (measured)


def row_chunks(xp, n_rows: int, row_size: int = 1):
    """Slices covering range(n_rows): one per worker thread when the work
    (n_rows * row_size elements) is large enough to pay for threads, else one
    (always one off the CPU, where the device runs the whole array at once)."""
    big = xp is numpy and n_rows * row_size >= _MIN_SPLIT_ELEMENTS and not _on_one_thread()
    parts = min(num_threads(), n_rows) if big else 1
    step = -(-n_rows // max(parts, 1)) if n_rows else 1
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)] or [slice(0, 0)]

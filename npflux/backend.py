"""The one place that knows NumPy from CuPy.

Everything else in npflux asks this module for an array module (``xp``) and
writes ``xp.exp(x)``, ``xp.matmul(a, b)``, ... so the same line runs on the CPU
(NumPy) and on an NVIDIA GPU (CuPy). The array module is taken from the arrays
themselves (``get_array_module``, as Chainer and CuPy do), so an op never needs
to be told which device it runs on.

A backend is chosen by name, ``"numpy"`` or ``"cupy"``, or by the ``backend``
setting (``NPFLUX_BACKEND``, or ``npflux.settings.override(backend=...)``);
NumPy is the default. Asking for CuPy where it is not installed, or where it
finds no GPU, raises ``BackendUnavailable`` with the reason instead of failing
later in some kernel. The rest is what differs between the two array modules:
moving arrays to the host, dtype checks, and the scatter-add whose fast form
is not the same on each.

CPU threads are not a backend's business: the worker pool and the BLAS's
thread count live in ``npflux.parallel``, the environment in
``npflux.settings``. ``num_threads``, ``set_num_threads``, ``parallel_map``,
``row_chunks``, ``blas_threads`` and ``set_blas_threads`` are still importable
from here for one release; import them from ``npflux.parallel``.
"""
from __future__ import annotations

import weakref

import numpy

from . import settings

BACKEND_NAMES = ("numpy", "cupy")
DEFAULT_DTYPE = numpy.dtype("float32")
ONE_HOT_MAX_ROWS = 256  # below this, a one-hot matmul beats sorting (measured)
FLOAT_DTYPES = (numpy.dtype("float16"), numpy.dtype("float32"), numpy.dtype("float64"))


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no GPU)."""


def _import_cupy():
    """Import CuPy and make sure a GPU answers; raise one clear error if not."""
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailable(
            "backend 'cupy' needs CuPy, which is not installed "
            "(pip install 'npflux[gpu]', or a cupy-cudaXXx wheel matching your CUDA)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailable(f"backend 'cupy': CuPy is installed but no CUDA GPU is usable ({exc})") from exc
    if count == 0:  # pragma: no cover - depends on the machine
        raise BackendUnavailable("backend 'cupy': CuPy is installed but no CUDA GPU was found")
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        _import_cupy()
    except BackendUnavailable:
        return False
    return True


class Backend:
    """An array module plus what npflux needs around it: RNG, device moves, dtypes."""

    def __init__(self, name: str):
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
        self.name = name
        self.xp = numpy if name == "numpy" else _import_cupy()

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Backend) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def rng(self, seed=None):
        """A seeded random Generator on this backend (numpy.random.Generator on NumPy)."""
        return self.xp.random.default_rng(seed)

    def asarray(self, x, dtype=None):
        """Put ``x`` on this backend's device (a copy only when it must move)."""
        if self.name == "numpy":
            x = to_numpy(x)
        return self.xp.asarray(x, dtype=dtype)


_BACKENDS: dict = {}


def get_backend(name=None) -> Backend:
    """The backend called ``name``; ``None`` takes the ``backend`` setting (NPFLUX_BACKEND, default "numpy")."""
    if isinstance(name, Backend):
        return name
    if name is None:
        name = settings.get("backend")
    name = name.lower()
    if name not in _BACKENDS:
        _BACKENDS[name] = Backend(name)
    return _BACKENDS[name]


def get_array_module(*arrays):
    """NumPy or CuPy, whichever the given arrays live in (NumPy for plain Python values)."""
    for a in arrays:
        if type(a) is numpy.ndarray:  # the common case, asked by every op: no module-name test
            continue
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return numpy


# Re-exports for one release: the CPU's worker threads and BLAS threads live
# in npflux.parallel; these names stay importable from here for code written before it.
from .parallel import (blas_threads, num_threads, parallel_map, row_chunks,  # noqa: E402,F401
                       set_blas_threads, set_num_threads)


def _data_ptr(a) -> int:
    if type(a).__module__.startswith("cupy"):
        return a.data.ptr
    return a.__array_interface__["data"][0]


def flat_base(arrays):
    """The one 1-D array that ``arrays`` tile in order, back to back, or None.

    Parameters flattened into one buffer (``Module.flatten_parameters``) pass
    this test, so an element-wise update can run once over the whole buffer
    instead of once per array; anything else (a fresh dict of unrelated
    arrays) returns None and takes the per-array path.

    The optimizer and the gradient norm ask this of the same arrays every
    step, and the walk below costs about 2 us an array (100 us for a 51-array
    model, 2% of a small model's step): a yes is remembered for those very
    array objects (held weakly, so an array that dies, and any object that
    later gets its id, is never taken for it). A view's base and place in it
    cannot change, so neither can the answer.
    """
    arrays = list(arrays)
    if not arrays:
        return None
    key = tuple(map(id, arrays))
    known = _FLAT_BASES.get(key)
    if known is not None and all(ref() is a for ref, a in zip(known[0], arrays)):
        return known[1]
    base = _tiled_base(arrays)
    if base is not None:
        if len(_FLAT_BASES) >= _FLAT_BASES_KEPT:
            _FLAT_BASES.clear()
        try:
            _FLAT_BASES[key] = ([weakref.ref(a) for a in arrays], base)
        except TypeError:  # an array type without weak references: asked afresh each time
            pass
    return base


_FLAT_BASES: dict = {}  # ids of the arrays -> (weak references to them, their base)
_FLAT_BASES_KEPT = 64   # models and optimizers alive at once, generously


def _tiled_base(arrays):
    base = arrays[0].base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    ptr, itemsize, used = _data_ptr(base), base.dtype.itemsize, 0
    for a in arrays:
        if a.base is not base or a.dtype != base.dtype or not a.flags.c_contiguous or _data_ptr(a) != ptr + used * itemsize:
            return None
        used += a.size
    return base if used == base.size else None


def backend_of(array) -> Backend:
    """The Backend an array lives on."""
    return get_backend("cupy" if get_array_module(array) is not numpy else "numpy")


def to_numpy(x):
    """A NumPy array holding ``x`` (copied from the GPU when it lives there)."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return numpy.asarray(x)


def resolve_dtype(dtype=None) -> numpy.dtype:
    """A floating NumPy dtype from a dtype or its name; float32 when None."""
    if dtype is None:
        return DEFAULT_DTYPE
    try:
        dt = numpy.dtype(dtype)
    except (TypeError, ValueError, SyntaxError) as exc:  # (numpy parses some strings, "01" a SyntaxError)
        raise TypeError(f"not a dtype: {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"npflux computes in floating point; got dtype {dt} (use float32, or float64 for checks)")
    return dt


def check_float(x, name: str = "input"):
    """Raise a clear TypeError unless ``x`` is a floating-point array."""
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind != "f":
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be a floating-point array, got {got}")


def check_int(x, name: str = "ids"):
    """Raise a clear TypeError unless ``x`` is an integer array."""
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind not in ("i", "u"):
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be an integer array, got {got}")


def scatter_add_rows(out, ids, rows):
    """``out[ids[n]] += rows[n]`` for every n, accumulating repeated ids.

    ``out`` is (V, C), ``ids`` is (N,) and ``rows`` (N, C). Plain fancy-index
    assignment ``out[ids] += rows`` would keep only the last of repeated ids.
    On CuPy, atomic adds (``cupyx.scatter_add``) would sum repeated ids in
    whatever order the threads arrive, so two identical steps could differ in
    the last bits and a resumed run would not repeat the original; npflux
    takes the deterministic ``scatter_add_rows_unique_onehot`` there.
    ``numpy.add.at`` does it right but slowly, so on NumPy a small table (a
    character vocabulary) takes one matrix product with a one-hot matrix
    (about 5x faster than add.at at 16k ids), and a larger one, when there
    are more ids than rows, a single ``bincount`` over flattened (row, column)
    indices (about 2x faster than add.at at 16k ids into 10k rows); with fewer
    ids than rows, add.at is as fast as anything. benchmarks/bench_scatter_add.py
    measures them all. CuPy has an atomic scatter-add kernel.
    """
    xp = get_array_module(out)
    if xp is not numpy:
        return scatter_add_rows_unique_onehot(out, ids, rows)
    if ids.size == 0:
        return out
    if out.shape[0] <= ONE_HOT_MAX_ROWS:
        one_hot = numpy.zeros((ids.size, out.shape[0]), dtype=rows.dtype)
        one_hot[numpy.arange(ids.size), ids] = 1
        out += one_hot.T @ rows
        return out
    V, C = out.shape
    if ids.size < V:
        # Few ids in a large table: bincount would spend its time on the V*C zeros.
        numpy.add.at(out, ids, rows)
        return out
    # One bincount over flat (row, column) indices; it sums in float64, which
    # only makes the float32 result more accurate, and is cast back.
    flat = (ids[:, None] * C + numpy.arange(C)).ravel()
    sums = numpy.bincount(flat, weights=rows.ravel(), minlength=V * C)
    out += sums.reshape(V, C).astype(out.dtype, copy=False)
    return out


_ONEHOT_MAX_ELEMENTS = 1 << 26  # one-hot block size (256 MB of float32) per matrix product


def scatter_add_rows_unique_onehot(out, ids, rows):
    """``out[ids[n]] += rows[n]`` as matrix products, the same bits on every run (any array module).

    The distinct ids U (sorted) and each id's place in them come from one
    sort; then out[U] += onehot^T @ rows, with onehot (N, |U|) holding a 1 at
    (n, place of ids[n]). A matrix product sums in an order fixed by its
    shapes, and out[U] has no repeated index, so nothing depends on timing.
    It costs 2 N |U| C multiply-adds, |U| <= min(N, V); long id lists are
    taken in blocks of rows, added in order.
    """
    xp = get_array_module(out)
    ids = ids.reshape(-1)
    if ids.size == 0:
        return out
    uniq, place = xp.unique(ids, return_inverse=True)
    place = place.reshape(-1)
    acc = xp.zeros((uniq.size, out.shape[1]), dtype=out.dtype)
    step = max(1, _ONEHOT_MAX_ELEMENTS // max(uniq.size, 1))
    for start in range(0, ids.size, step):
        stop = min(start + step, ids.size)
        onehot = xp.zeros((stop - start, uniq.size), dtype=out.dtype)
        onehot[xp.arange(stop - start), place[start:stop]] = 1
        acc += onehot.T @ rows[start:stop]
    out[uniq] += acc
    return out

"""npflux.backend: choosing NumPy or CuPy, dtypes, scatter-add, and the one-backend rule."""
from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npflux
from npflux import backend as B
from npflux.backend import (
    BackendUnavailable,
    check_float,
    check_int,
    cupy_available,
    get_array_module,
    get_backend,
    resolve_dtype,
    scatter_add_rows,
    to_numpy,
)

from conftest import backend_params

PKG = Path(npflux.__file__).resolve().parent


# --------------------------------------------------------------------------
# get_backend
# --------------------------------------------------------------------------
def test_get_backend_numpy_by_name():
    be = get_backend("numpy")
    assert be.name == "numpy" and be.xp is np
    assert get_backend("NumPy") is be  # names are case-insensitive, backends cached
    assert get_backend(be) is be  # a Backend passes through


def test_get_backend_default_is_numpy(monkeypatch):
    monkeypatch.delenv("NPFLUX_BACKEND", raising=False)
    assert get_backend().name == "numpy"
    monkeypatch.setenv("NPFLUX_BACKEND", "")
    assert get_backend().name == "numpy"


def test_get_backend_from_env(monkeypatch):
    monkeypatch.setenv("NPFLUX_BACKEND", "numpy")
    assert get_backend().xp is np
    monkeypatch.setenv("NPFLUX_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        get_backend("jax")


@pytest.mark.skipif(cupy_available(), reason="CuPy and a GPU are available here")
def test_cupy_unavailable_is_clear():
    with pytest.raises(BackendUnavailable, match="cupy"):
        get_backend("cupy")
    assert issubclass(BackendUnavailable, RuntimeError)


def test_cupy_missing_message(monkeypatch):
    """Simulated: CuPy not installed -> BackendUnavailable naming the fix."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    monkeypatch.setattr(B, "_BACKENDS", {})
    with pytest.raises(BackendUnavailable, match="not installed"):
        get_backend("cupy")
    assert not cupy_available()


def test_cupy_without_gpu_message(monkeypatch):
    """Simulated: CuPy imports but the CUDA runtime finds no device."""
    fake = types.ModuleType("cupy")

    def no_device():
        raise RuntimeError("cudaErrorNoDevice")

    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(B, "_BACKENDS", {})
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        get_backend("cupy")

    fake.cuda.runtime.getDeviceCount = lambda: 0
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        get_backend("cupy")


@pytest.mark.parametrize("backend_name", backend_params())
def test_backend_roundtrip(backend_name):
    be = get_backend(backend_name)
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    dev = be.asarray(host)
    assert get_array_module(dev) is be.xp
    assert B.backend_of(dev) == be
    np.testing.assert_array_equal(to_numpy(dev), host)
    a = be.rng(3).standard_normal(4)
    b = be.rng(3).standard_normal(4)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


# --------------------------------------------------------------------------
# get_array_module, dtypes, type checks
# --------------------------------------------------------------------------
def test_get_array_module():
    assert get_array_module(np.zeros(2)) is np
    assert get_array_module(1.0, [1, 2], None) is np
    assert get_array_module() is np


def test_resolve_dtype():
    assert resolve_dtype() == np.float32
    assert resolve_dtype("float64") == np.float64
    assert resolve_dtype(np.float16) == np.float16
    for bad in ("int32", np.int64, "bool", "complex64"):
        with pytest.raises(TypeError):
            resolve_dtype(bad)
    with pytest.raises(TypeError):
        resolve_dtype("not-a-dtype")


def test_check_float_and_int():
    check_float(np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        check_float(np.zeros(2, np.int64), "x")
    with pytest.raises(TypeError):
        check_float([1.0, 2.0])
    check_int(np.zeros(2, np.uint8))
    with pytest.raises(TypeError, match="integer"):
        check_int(np.zeros(2, np.float32))


# --------------------------------------------------------------------------
# scatter_add_rows: repeated ids must ACCUMULATE
# --------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1, 7, B.ONE_HOT_MAX_ROWS, B.ONE_HOT_MAX_ROWS + 1, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_accumulates(V, dtype):
    """Every path equals np.add.at: one-hot (V <= 256), add.at (fewer ids than rows), bincount (more)."""
    rng = np.random.default_rng(V)
    N, C = 500, 3
    ids = rng.integers(0, min(V, 5), N)  # few distinct ids: many repeats
    ids[:3] = V - 1
    rows = rng.standard_normal((N, C)).astype(dtype)
    start = rng.standard_normal((V, C)).astype(dtype)
    expected = start.astype(np.float64)
    np.add.at(expected, ids, rows.astype(np.float64))
    out = start.copy()
    result = scatter_add_rows(out, ids, rows)
    assert result is out  # in place
    assert out.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


@given(V=st.integers(1, 600), N=st.integers(0, 900), seed=st.integers(0, 2**32 - 1))
def test_scatter_add_rows_property(V, N, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, N)
    rows = rng.standard_normal((N, 2))
    expected = np.zeros((V, 2))
    np.add.at(expected, ids, rows)
    out = scatter_add_rows(np.zeros((V, 2)), ids, rows)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)



@given(V=st.integers(1, 600), N=st.integers(0, 900), seed=st.integers(0, 2**32 - 1), small_blocks=st.booleans())
def test_deterministic_scatter_add_equals_add_at(V, N, seed, small_blocks):
    """The sort + one-hot product path (CuPy's, run here on NumPy) sums like np.add.at, blocked or not."""
    saved = B._ONEHOT_MAX_ELEMENTS
    B._ONEHOT_MAX_ELEMENTS = 7 if small_blocks else saved
    try:
        _check_unique_onehot(V, N, seed)
    finally:
        B._ONEHOT_MAX_ELEMENTS = saved


def _check_unique_onehot(V, N, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, N)
    rows = rng.standard_normal((N, 3))
    start = rng.standard_normal((V, 3))
    expected = start.copy()
    np.add.at(expected, ids, rows)
    out = start.copy()
    assert B.scatter_add_rows_unique_onehot(out, ids, rows) is out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_scatter_add_rows_is_the_same_on_every_run(backend):
    """Repeated ids summed in a fixed order: two runs give the same bits (atomics on a GPU would not)."""
    rng = np.random.default_rng(0)
    ids = backend.asarray(rng.integers(0, 3000, 20000))
    rows = backend.asarray(rng.standard_normal((20000, 16)).astype(np.float32))
    runs = [B.to_numpy(scatter_add_rows(backend.xp.zeros((3000, 16), dtype=np.float32), ids, rows)) for _ in range(3)]
    assert all(np.array_equal(r, runs[0]) for r in runs[1:])
    expected = np.zeros((3000, 16))
    np.add.at(expected, B.to_numpy(ids), B.to_numpy(rows).astype(np.float64))
    np.testing.assert_allclose(runs[0], expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Only backend.py imports NumPy or CuPy
# --------------------------------------------------------------------------
def _scanned_files():
    files = []
    for sub in ("ops", "nn", "models"):
        files += sorted((PKG / sub).rglob("*.py"))
    if (PKG / "optim.py").exists():
        files.append(PKG / "optim.py")
    return [f for f in files if f.name != "gradcheck.py"]


def _array_module_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("numpy", "cupy", "cupyx"):
                try:
                    shown = path.relative_to(PKG.parent)
                except ValueError:
                    shown = path
                bad.append(f"{shown}:{node.lineno}: imports {name}")
    return bad


def test_compute_code_never_imports_numpy_or_cupy():
    """Ops, modules, models and the optimizer get their array module from ``npflux.backend``.

    That is what lets the same line run on NumPy and on CuPy: code that did
    ``import numpy`` would silently pull GPU arrays back to the host (or fail
    on them). So no module under npflux/ops, npflux/nn, npflux/models, nor
    npflux/optim.py, may import numpy, cupy or cupyx; it asks
    ``get_array_module(x)`` / ``backend.xp`` instead.

    Allowed elsewhere: backend.py (the one place that knows both),
    gradcheck.py (a float64 host-side checking tool), kernels.py (compiled
    CPU kernels, which ``kernels.use_for`` hands NumPy arrays only), and the host-side I/O
    modules -- data.py, checkpoint.py and tokenizers/ -- which read files and
    build token arrays on the host before anything is put on a device.
    Imports are found with ``ast`` so a docstring mentioning ``import numpy``
    is not a violation.
    """
    files = _scanned_files()
    assert any(f.parent.name == "ops" for f in files), "npflux/ops not found"
    violations = [v for f in files for v in _array_module_imports(f)]
    assert not violations, "array modules imported outside backend.py:\n" + "\n".join(violations)


def test_source_scan_detects_an_import(tmp_path):
    """The scanner itself works (guards against a scan that silently finds nothing)."""
    f = tmp_path / "pkg" / "mod.py"
    f.parent.mkdir()
    f.write_text('"""import numpy in a docstring is fine"""\nimport os\nfrom numpy import linalg\n'
                 'def g():\n    import cupy as cp\nfrom . import backend\n')
    hits = _array_module_imports(f)
    assert len(hits) == 2 and ":3:" in hits[0] and ":5:" in hits[1]


@pytest.fixture
def thread_state():
    """Whatever a test does to npflux's threads (workers and BLAS) is undone after it."""
    from npflux import parallel

    saved = (parallel._NUM_THREADS, parallel._ENV_THREADS, parallel.blas_threads())
    yield parallel
    parallel._NUM_THREADS, parallel._ENV_THREADS = saved[:2]
    if saved[2] is not None:
        parallel.set_blas_threads(saved[2])


def test_parallel_map_order_errors_and_thread_count(monkeypatch, thread_state):
    parallel = thread_state
    monkeypatch.setattr(parallel, "_NUM_THREADS", None)
    monkeypatch.setattr(parallel, "_ENV_THREADS", None)
    monkeypatch.setenv("NPFLUX_NUM_THREADS", "3")
    assert parallel.num_threads() == 3
    monkeypatch.setattr(parallel, "_ENV_THREADS", None)
    monkeypatch.setenv("NPFLUX_NUM_THREADS", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert parallel.num_threads() == 2
    monkeypatch.setattr(parallel, "_ENV_THREADS", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert parallel.num_threads() == parallel.usable_cpus()  # the affinity mask, not the machine's cores
    parallel.set_num_threads(2)
    assert parallel.parallel_map(lambda i: i * i, range(10)) == [i * i for i in range(10)]

    def boom(i):
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        parallel.parallel_map(boom, range(6))
    with pytest.raises(ValueError):
        parallel.set_num_threads(0)


def test_old_backend_names_still_reach_the_thread_control():
    from npflux import backend, parallel

    for name in ("num_threads", "set_num_threads", "parallel_map", "row_chunks", "blas_threads", "set_blas_threads"):
        assert getattr(backend, name) is getattr(parallel, name)


def test_parallel_map_inside_parallel_map_runs_inline(thread_state):
    parallel = thread_state
    parallel.set_num_threads(2)
    inner = lambda i: parallel.parallel_map(lambda j: i * 10 + j, range(3))  # noqa: E731
    assert parallel.parallel_map(inner, range(4)) == [[i * 10 + j for j in range(3)] for i in range(4)]


def test_parallel_map_runs_blas_single_threaded_inside_and_restores(thread_state):
    """Never more computing threads than num_threads(): workers call a one-thread BLAS."""
    parallel = thread_state
    if parallel.blas_threads() is None:
        pytest.skip("no BLAS that threadpoolctl can control is loaded")
    parallel.set_num_threads(2)
    assert parallel.blas_threads() == 2  # set_num_threads caps the BLAS too
    seen = parallel.parallel_map(lambda _: parallel.blas_threads(), range(4))
    assert seen == [1, 1, 1, 1]
    assert parallel.blas_threads() == 2
    parallel.set_num_threads(1)
    assert parallel.blas_threads() == 1


def test_blas_info_names_library_and_kernel():
    from npflux import parallel

    info = parallel.blas_info()
    if not info:
        pytest.skip("no BLAS that threadpoolctl can control is loaded")
    assert all("internal_api" in d and "num_threads" in d for d in info)

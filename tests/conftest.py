"""Shared pytest fixtures and settings for the npflux test suite.

- ``torch``: PyTorch, the test oracle (the tests that need it skip without it).
- ``backend`` / ``backend_params()``: parametrise a test over the array
  backends; NumPy always runs, CuPy runs only where it imports and sees a GPU
  (otherwise that parameter is *skipped* with a clear reason, never failed).
- Hypothesis runs under the ``npflux`` profile: no deadline (the CI machines
  are shared and slow), 25 examples per property by default; set
  ``NPFLUX_HYPOTHESIS_EXAMPLES=500`` for a deeper search, or
  ``HYPOTHESIS_PROFILE=<name>`` to pick another registered profile.
- ``shared_data_dir``: the folder with the real corpora (``$NPFLUX_DATA_DIR``
  or ``../../shared/data`` next to the checkout), skipped where missing.
- ``dev(x, like=None)`` / ``host(x)``: the suite runs on the default backend
  (``NPFLUX_BACKEND``, NumPy unless set), so a test builds its inputs on the
  host and moves them with ``dev`` (to the default backend, or to the backend
  of ``like``: a module, a Backend, a backend name or an array), and brings
  results back with ``host`` before any NumPy comparison. Both are no-ops on
  NumPy, so a NumPy run checks exactly what it always did.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from npflux import settings as npflux_settings
from npflux.backend import Backend, backend_of, cupy_available, get_backend, to_numpy

# --------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------
settings.register_profile(
    "npflux",
    deadline=None,
    max_examples=npflux_settings.get("hypothesis_examples"),  # NPFLUX_HYPOTHESIS_EXAMPLES
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "npflux"))

# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------
CUPY_SKIP_REASON = "CuPy or a CUDA GPU not available"
_CUPY = None


def _cupy_ok() -> bool:
    global _CUPY
    if _CUPY is None:
        _CUPY = cupy_available()
    return _CUPY


def backend_params():
    """``pytest.param`` objects for every backend name, CuPy skipped where unusable.

    Use as ``@pytest.mark.parametrize("backend_name", backend_params())``.
    """
    return [
        pytest.param("numpy", id="numpy"),
        pytest.param(
            "cupy",
            id="cupy",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not _cupy_ok(), reason=CUPY_SKIP_REASON)],
        ),
    ]


@pytest.fixture(params=backend_params())
def backend(request):
    """A ``npflux.backend.Backend``: NumPy, and CuPy where a GPU is usable."""
    return get_backend(request.param)


@pytest.fixture
def xp(backend):
    """The array module of the ``backend`` fixture."""
    return backend.xp


# --------------------------------------------------------------------------
# Moving test data between the host and the backend under test
# --------------------------------------------------------------------------
def backend_for(like=None) -> Backend:
    """The Backend of ``like``: a Module (or anything with a ``backend``), a Backend, a
    backend name, an array; the default backend (NPFLUX_BACKEND) for None."""
    if like is None or isinstance(like, (str, Backend)):
        return get_backend(like)
    b = getattr(like, "backend", None)
    if isinstance(b, Backend):
        return b
    return backend_of(like)


def dev(x, like=None, dtype=None):
    """``x`` (a host array or value) on the default backend, or on the backend of ``like``.

    A no-op for a NumPy array on NumPy (no copy, same dtype unless ``dtype`` is given).
    """
    return backend_for(like).asarray(x, dtype=dtype)


def host(x):
    """``x`` on the host: a CuPy array becomes a NumPy array (tuples, lists and dicts
    are converted element-wise); anything else, NumPy arrays included, is returned as is."""
    if type(x).__module__.startswith("cupy"):
        return to_numpy(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*(host(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(host(v) for v in x)
    if isinstance(x, dict):
        return {k: host(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------
# Oracles and data
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def torch():
    """PyTorch (CPU is enough); tests using it skip where it is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The directory holding the real corpora; the test skips where it does not exist."""
    path = npflux_settings.get("data_dir") or Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} not found (set NPFLUX_DATA_DIR)")
    return path

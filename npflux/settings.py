"""Every NPFLUX_* environment variable, read in one place, with a scoped override.

Setting              Environment variable        Type      Default
-------------------  --------------------------  --------  -------
backend              NPFLUX_BACKEND              name      "numpy"
    the array backend when none is named (``get_backend()``): "numpy" or "cupy"
num_threads          NPFLUX_NUM_THREADS,         int >= 1  None
                     then OMP_NUM_THREADS
    threads npflux computes with on the CPU: the worker pool and the BLAS's
    cap (``npflux.parallel``); None: the CPUs this process may use
data_dir             NPFLUX_DATA_DIR             path      None
    the folder ``data.find_corpus`` looks in for corpora
debug                NPFLUX_DEBUG                flag      False
    the CLI shows an error's traceback, not just its message
    (a flag is 1/true/yes/on or 0/false/no/off)
numba                NPFLUX_NUMBA                flag      True
    run fused element-wise work (layer norm, AdamW, GELU, ReLU, softmax's
    backward) through Numba-compiled kernels when numba is installed
    (``npflux.kernels``); off: the NumPy path everywhere
split_batch          NPFLUX_SPLIT_BATCH          auto or   "auto"
                                                 flag
    split a training step's batch rows over the worker threads, each thread
    running the whole forward and backward of its rows on a replica of the
    model (``npflux.training.threads``); "auto": where each thread's share
    is large enough to pay (measured); on: wherever the model allows; off: never
reuse_memory         NPFLUX_REUSE_MEMORY         flag      True
    have glibc's malloc keep the memory of freed arrays for the next ones
    instead of returning it to the system, so a training step's arrays do
    not start on fresh pages every step (``npflux.memory``); read once, when
    npflux is imported; nothing off glibc (Linux only)
hypothesis_examples  NPFLUX_HYPOTHESIS_EXAMPLES  int >= 1  25
    examples per Hypothesis property in the test suite (tests/conftest.py)
mpi_ranks            NPFLUX_MPI_RANKS,           int >= 1  None
                     then PMI_SIZE,
                     OMPI_COMM_WORLD_SIZE
    how many processes an MPI launcher started this one among (MPICH's
    mpiexec sets PMI_SIZE, Open MPI's OMPI_COMM_WORLD_SIZE); set, npflux
    train runs data-parallel over MPI (``npflux.distributed``); None: not
    launched by mpiexec, one process, MPI never loaded

``get("num_threads")`` reads a setting: the innermost ``override`` in force,
else the environment, else the default. (For the threads,
``parallel.set_num_threads(n)`` ranks between the two; see ``npflux.parallel``.) ``override`` sets values for one
``with`` block, as Chainer's ``using_config``::

    with npflux.settings.override(num_threads=1, backend="numpy"):
        ...   # one thread, BLAS included; restored when the block ends, also on an error

How values are read. An empty variable counts as unset (``NPFLUX_BACKEND=``
is NumPy). The variables are looked up on every read, a dict lookup, so a
program or test that changes ``os.environ`` is seen at once, as before this
module; parsing and checking a value happens once per text and is cached.
A value that does not parse is an error, never a silent fallback:
``NPFLUX_NUM_THREADS=abc`` or ``0`` raises a one-line ValueError naming the
variable when the setting is first needed. The exception is OMP_NUM_THREADS,
which belongs to OpenMP (it accepts forms like ``4,2`` that npflux does not):
a value there that npflux cannot read is ignored.

Scope. Overrides are process-wide (Chainer's ``global_config``, not its
thread-local ``config``): what ``num_threads`` controls, the BLAS's thread count, is one
number for the whole process, and the worker threads of ``parallel_map``
must see the same settings as the thread that started them. Enter and leave
overrides from one thread (the one driving the computation); nested blocks
restore in order because each puts back exactly what it found.

Settings that act on the process when they change (``num_threads`` moves the
BLAS cap) register an ``on_override`` hook; that is how this module stays
free of npflux imports: it imports nothing but the standard library.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple


# ---------------------------------------------------------------------------
# value types: each takes the environment's text or a Python value, and
# returns the value or raises ValueError saying what was expected
# ---------------------------------------------------------------------------
def _positive_int(value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")
    return text in _TRUE


def _auto_or_flag(value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _flag(value)
    except ValueError:
        raise ValueError(f"expected auto or one of {', '.join(_TRUE + _FALSE)}") from None


def _path(value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError("expected a path")
    return Path(value)


BACKEND_NAMES = ("numpy", "cupy")  # npflux.backend's BACKEND_NAMES (a test keeps them equal)


def _backend(value) -> str:
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------
class Setting(NamedTuple):
    """One row of the table in this module's docstring, which says what each setting means."""
    name: str
    variable: str             # NPFLUX_*: a value that does not parse is an error
    parse: Callable[[Any], Any]
    default: Any
    foreign: tuple = ()       # another program's variables, read when ``variable`` is unset; bad values ignored


SETTINGS = {s.name: s for s in (
    Setting("backend", "NPFLUX_BACKEND", _backend, "numpy"),
    Setting("num_threads", "NPFLUX_NUM_THREADS", _positive_int, None, foreign=("OMP_NUM_THREADS",)),
    Setting("data_dir", "NPFLUX_DATA_DIR", _path, None),
    Setting("debug", "NPFLUX_DEBUG", _flag, False),
    Setting("numba", "NPFLUX_NUMBA", _flag, True),
    Setting("split_batch", "NPFLUX_SPLIT_BATCH", _auto_or_flag, "auto"),
    Setting("reuse_memory", "NPFLUX_REUSE_MEMORY", _flag, True),
    Setting("hypothesis_examples", "NPFLUX_HYPOTHESIS_EXAMPLES", _positive_int, 25),
    Setting("mpi_ranks", "NPFLUX_MPI_RANKS", _positive_int, None, foreign=("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")),
)}


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
_UNSET = object()
_OVERRIDES: dict = {}   # name -> value, the innermost override in force
_PARSED: dict = {}      # name -> (the variables' texts, the value they gave)
_EFFECTS: dict = {}     # name -> [hook(value) -> undo or None], see on_override
_LOCK = threading.Lock()


def _setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise ValueError(f"unknown setting {name!r}; the settings are {', '.join(SETTINGS)}") from None


def get(name: str):
    """The value of setting ``name``: the innermost override, else the environment, else the default."""
    value = _OVERRIDES.get(name, _UNSET)
    if value is not _UNSET:
        return value
    return _from_environment(name)


def _from_environment(name: str):
    """What the environment says of setting ``name`` (its default where it says nothing)."""
    s = _setting(name)
    texts = tuple(os.environ.get(var, "").strip() for var in (s.variable, *s.foreign))
    cached = _PARSED.get(name)
    if cached is not None and cached[0] == texts:
        return cached[1]
    value = s.default
    if texts[0]:
        try:
            value = s.parse(texts[0])
        except ValueError as exc:
            raise ValueError(f"{s.variable}={texts[0]!r}: {exc}") from None
    else:
        for text in texts[1:]:
            try:
                value = s.parse(text)
                break
            except ValueError:
                continue
    _PARSED[name] = (texts, value)
    return value


def overridden(name: str):
    """The value an override in force gives ``name``, or None outside any override of it."""
    return _OVERRIDES.get(name)


# ---------------------------------------------------------------------------
# the scoped override
# ---------------------------------------------------------------------------
def on_override(name: str, hook: Callable):
    """Call ``hook(value)`` whenever an override sets ``name``; it returns a function that undoes
    its effect (or None), called when the block ends, after the old settings are back."""
    _setting(name)
    _EFFECTS.setdefault(name, []).append(hook)


@contextlib.contextmanager
def override(**values):
    """Give settings these values for the duration of a ``with`` block; restored after, also on an error.

    ``with override(num_threads=1): ...`` runs parallel ops inline and the BLAS on
    one thread inside the block. Values are checked as the environment's are.
    """
    checked = {}
    for name, value in values.items():
        s = _setting(name)
        if value is None:
            raise ValueError(f"settings.override({name}=None): an override needs a value")
        try:
            checked[name] = s.parse(value)
        except ValueError as exc:
            raise ValueError(f"settings.override({name}={value!r}): {exc}") from None
    with _LOCK:
        saved = {name: _OVERRIDES.get(name, _UNSET) for name in checked}
        _OVERRIDES.update(checked)
    undos = []
    try:
        for name, value in checked.items():
            for hook in _EFFECTS.get(name, ()):
                undos.append(hook(value))
        yield
    finally:
        with _LOCK:
            for name, old in saved.items():
                if old is _UNSET:
                    del _OVERRIDES[name]
                else:
                    _OVERRIDES[name] = old
        for undo in reversed(undos):
            if undo is not None:
                undo()

"""npflux.settings: the NPFLUX_* variables read in one place, checked, and overridden for a block."""
from __future__ import annotations

import ast
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import npflux
from npflux import backend, data, parallel, settings

PKG = Path(npflux.__file__).resolve().parent
VARIABLES = [v for s in settings.SETTINGS.values() for v in (s.variable, *s.foreign)]


@pytest.fixture
def clean_env(monkeypatch):
    """No setting's variable set: every read gives the default."""
    for var in VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def threads():
    """npflux.parallel with whatever a test does to its threads (workers and BLAS) undone after."""
    saved = (parallel._NUM_THREADS, parallel._ENV_THREADS, parallel.blas_threads())
    yield parallel
    parallel._NUM_THREADS, parallel._ENV_THREADS = saved[:2]
    if saved[2] is not None:
        parallel.set_blas_threads(saved[2])


def needs_blas():
    if parallel.blas_threads() is None:
        pytest.skip("no BLAS that threadpoolctl can control is loaded")


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
def test_defaults(clean_env):
    assert {name: settings.get(name) for name in settings.SETTINGS} == {
        "backend": "numpy", "num_threads": None, "data_dir": None, "debug": False,
        "numba": True, "split_batch": "auto", "reuse_memory": True, "hypothesis_examples": 25, "mpi_ranks": None}


def test_the_docstring_table_lists_every_setting():
    doc = settings.__doc__
    for s in settings.SETTINGS.values():
        assert re.search(rf"^{s.name}\s+{s.variable}", doc, re.M), s.name
        assert all(v in doc for v in s.foreign)


def test_every_npflux_variable_in_the_package_is_in_the_table():
    """A new NPFLUX_* variable anywhere in npflux must get a row (and a reader) here."""
    named = {m for f in PKG.rglob("*.py") for m in re.findall(r"\bNPFLUX_[A-Z_]*[A-Z]\b", f.read_text())}
    assert named <= set(VARIABLES), named - set(VARIABLES)


def test_only_settings_reads_npflux_variables():
    """os.environ / os.getenv with an NPFLUX_ name appear only in settings.py."""
    read = re.compile(r"(environ\.get|environ\[|getenv).*NPFLUX_|NPFLUX_\w*[\"']\s*(not\s+)?in\s+os\.environ")
    readers = {str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
               if f.name != "settings.py" and any(read.search(line) for line in f.read_text().splitlines())}
    assert not readers, readers


def test_backend_names_agree():
    assert settings.BACKEND_NAMES == backend.BACKEND_NAMES


def test_settings_imports_nothing_from_npflux():
    """settings sits below everything: the standard library only, no relative or npflux import."""
    tree = ast.parse((PKG / "settings.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


# --------------------------------------------------------------------------
# reading the environment
# --------------------------------------------------------------------------
def test_environment_values(clean_env, tmp_path):
    env = clean_env
    env.setenv("NPFLUX_BACKEND", " CuPy ")  # only the name is checked: no CuPy import here
    env.setenv("NPFLUX_NUM_THREADS", "3")
    env.setenv("NPFLUX_DATA_DIR", str(tmp_path))
    env.setenv("NPFLUX_DEBUG", "yes")
    env.setenv("NPFLUX_HYPOTHESIS_EXAMPLES", "500")
    assert (settings.get("backend"), settings.get("num_threads"), settings.get("data_dir"),
            settings.get("debug"), settings.get("hypothesis_examples")) == ("cupy", 3, tmp_path, True, 500)
    env.setenv("NPFLUX_DEBUG", "0")
    assert settings.get("debug") is False  # a change to os.environ is seen at once


def test_empty_means_unset(clean_env):
    for var in VARIABLES:
        clean_env.setenv(var, "")
    test_defaults(clean_env)


def test_omp_num_threads_is_the_fallback_and_ignored_when_unreadable(clean_env):
    env = clean_env
    env.setenv("OMP_NUM_THREADS", "2")
    assert settings.get("num_threads") == 2
    env.setenv("NPFLUX_NUM_THREADS", "5")
    assert settings.get("num_threads") == 5  # npflux's own variable first
    env.delenv("NPFLUX_NUM_THREADS")
    for text in ("4,2", "abc", "0"):  # OpenMP's variable, OpenMP's syntax: not npflux's to reject
        env.setenv("OMP_NUM_THREADS", text)
        assert settings.get("num_threads") is None


@pytest.mark.parametrize("var,text", [
    ("NPFLUX_NUM_THREADS", "abc"), ("NPFLUX_NUM_THREADS", "0"), ("NPFLUX_NUM_THREADS", "-2"),
    ("NPFLUX_NUM_THREADS", "2.5"), ("NPFLUX_BACKEND", "tensorflow"), ("NPFLUX_DEBUG", "maybe"),
    ("NPFLUX_HYPOTHESIS_EXAMPLES", "lots"),
])
def test_a_bad_value_is_a_one_line_error_naming_the_variable(clean_env, var, text):
    clean_env.setenv("OMP_NUM_THREADS", "2")  # no silent fallback to it either
    clean_env.setenv(var, text)
    name = next(s.name for s in settings.SETTINGS.values() if s.variable == var)
    with pytest.raises(ValueError) as info:
        settings.get(name)
    message = str(info.value)
    assert message.startswith(f"{var}={text!r}: ") and "\n" not in message


def test_a_bad_thread_count_reaches_the_user_from_num_threads(clean_env, threads):
    threads._NUM_THREADS, threads._ENV_THREADS = None, None
    clean_env.setenv("NPFLUX_NUM_THREADS", "abc")
    with pytest.raises(ValueError, match="NPFLUX_NUM_THREADS='abc'"):
        threads.num_threads()


def test_a_value_is_parsed_once_per_text(clean_env, monkeypatch):
    calls = []
    row = settings.SETTINGS["hypothesis_examples"]
    monkeypatch.setitem(settings.SETTINGS, "hypothesis_examples",
                        row._replace(parse=lambda v: calls.append(v) or row.parse(v)))
    clean_env.setenv("NPFLUX_HYPOTHESIS_EXAMPLES", "7")
    assert [settings.get("hypothesis_examples") for _ in range(3)] == [7, 7, 7] and calls == ["7"]
    clean_env.setenv("NPFLUX_HYPOTHESIS_EXAMPLES", "8")
    assert settings.get("hypothesis_examples") == 8 and calls == ["7", "8"]


def test_unknown_setting_names_are_rejected():
    with pytest.raises(ValueError, match="unknown setting 'num_thread'; the settings are backend, num_threads"):
        settings.get("num_thread")
    with pytest.raises(ValueError, match="unknown setting 'threads'"):
        with settings.override(threads=1):
            pass
    assert settings.overridden("threads") is None


# --------------------------------------------------------------------------
# override
# --------------------------------------------------------------------------
def test_override_sets_and_restores(clean_env):
    clean_env.setenv("NPFLUX_HYPOTHESIS_EXAMPLES", "7")
    with settings.override(hypothesis_examples=9, debug=True):
        assert settings.get("hypothesis_examples") == 9 and settings.get("debug") is True
        assert settings.overridden("hypothesis_examples") == 9
    assert settings.get("hypothesis_examples") == 7 and settings.get("debug") is False
    assert settings.overridden("hypothesis_examples") is None


def test_override_restores_after_an_exception_and_in_order_when_nested(clean_env):
    with pytest.raises(RuntimeError, match="inside"):
        with settings.override(debug=True):
            raise RuntimeError("inside")
    assert settings.get("debug") is False
    with settings.override(hypothesis_examples=2):
        with settings.override(hypothesis_examples=3, debug="on"):
            assert (settings.get("hypothesis_examples"), settings.get("debug")) == (3, True)
            with pytest.raises(KeyError):
                with settings.override(hypothesis_examples=4):
                    raise KeyError("deepest")
            assert settings.get("hypothesis_examples") == 3
        assert (settings.get("hypothesis_examples"), settings.get("debug")) == (2, False)
    assert settings.get("hypothesis_examples") == 25


@pytest.mark.parametrize("values,match", [
    ({"num_threads": 0}, r"settings.override\(num_threads=0\): expected a whole number >= 1"),
    ({"num_threads": True}, "num_threads=True"),
    ({"backend": "jax"}, "unknown backend 'jax'"),
    ({"debug": "perhaps"}, "debug='perhaps'"),
    ({"data_dir": None}, "data_dir=None"),
])
def test_override_checks_its_values(values, match):
    with pytest.raises(ValueError, match=match):
        with settings.override(**values):
            pass
    assert all(settings.overridden(name) is None for name in values)


def test_override_wins_over_the_environment(clean_env, tmp_path):
    clean_env.setenv("NPFLUX_BACKEND", "tensorflow")  # bad, but never read inside the block
    with settings.override(backend="NumPy"):
        assert backend.get_backend().name == "numpy"
    with pytest.raises(ValueError, match="unknown backend"):
        backend.get_backend()
    (tmp_path / "mine.txt").write_text("hello")
    with settings.override(data_dir=str(tmp_path)):
        assert data.find_corpus("mine.txt") == tmp_path / "mine.txt"


# --------------------------------------------------------------------------
# override(num_threads=...): the workers and the BLAS follow
# --------------------------------------------------------------------------
def _where(_):
    return threading.current_thread().name


def test_override_num_threads_1_runs_parallel_map_inline(threads):
    threads.set_num_threads(2)
    caller = threading.current_thread().name
    assert any(name != caller for name in threads.parallel_map(_where, range(4)))
    with settings.override(num_threads=1):
        assert threads.num_threads() == 1
        assert threads.parallel_map(_where, range(4)) == [caller] * 4
        assert threads.row_chunks(np, 1 << 20, 1) == [slice(0, 1 << 20)]
    assert threads.num_threads() == 2
    assert any(name != caller for name in threads.parallel_map(_where, range(4)))


def test_override_num_threads_moves_the_blas_and_restores_it(threads):
    needs_blas()
    threads.set_num_threads(2)
    threads.set_blas_threads(1)  # whoever set it, the block puts back what it found
    with settings.override(num_threads=3):
        assert threads.blas_threads() == 3
        with settings.override(num_threads=1):
            assert threads.blas_threads() == 1
        assert threads.blas_threads() == 3
    assert threads.blas_threads() == 1
    with pytest.raises(RuntimeError):
        with settings.override(num_threads=1):
            threads.set_blas_threads(2)
            raise RuntimeError
    assert threads.blas_threads() == 1 and threads.num_threads() == 2


def test_override_num_threads_is_not_changed_by_set_num_threads_inside(threads):
    threads.set_num_threads(2)
    with settings.override(num_threads=1):
        threads.set_num_threads(3)  # the override keeps ruling until the block ends
        assert threads.num_threads() == 1
        assert parallel.blas_threads() in (None, 1)
    assert threads.num_threads() == 3
    assert parallel.blas_threads() in (None, 3)


def test_override_with_more_threads_than_the_pool_grows_it(threads):
    threads.set_num_threads(2)
    assert threads.parallel_map(lambda i: i, range(4)) == [0, 1, 2, 3]  # a pool of one worker
    with settings.override(num_threads=3):
        assert threads.parallel_map(lambda i: i * i, range(9)) == [i * i for i in range(9)]
        assert threads._POOL._max_workers == 2  # the caller and two workers

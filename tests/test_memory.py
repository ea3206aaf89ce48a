"""npflux.memory: with reuse_memory on, a freed array's memory serves the next array without page faults.

Each case runs in a fresh interpreter, since the allocator is tuned once, when
npflux is imported. The count of minor page faults is the kernel's, so the
test asserts what the tuning is for: a 64 MB array allocated again after one
was freed lands on pages the process already has (glibc's default returns
any array over 32 MB to the kernel when it is freed, so every page of the
next one faults). NumPy asks for 2 MB transparent huge pages for arrays this
large, and the kernel grants them or not by its own settings, so the bounds
are in 2 MB pages, the fewest faults a fresh 64 MB can cost: 32.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator tuning is glibc's (Linux)")

_PROBE = r"""
import json, resource
import numpy as np
import npflux
from npflux import memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

n = 64 << 20
a = np.ones(n // 8)   # float64: 64 MB, every page touched
del a
before = faults()
b = np.ones(n // 8)
print(json.dumps({"applied": memory.keeps_freed_memory(), "faults": faults() - before, "huge_pages": n // (2 << 20)}))
"""


def _probe(value):
    env = dict(os.environ, NPFLUX_REUSE_MEMORY=value)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    on = _probe("1")
    assert on["applied"] is True
    assert on["faults"] < on["huge_pages"] // 4, on  # the same pages again (measured: 0 faults)


def test_off_leaves_glibcs_defaults():
    off = _probe("0")
    assert off["applied"] is False
    assert off["faults"] >= off["huge_pages"], off  # a fresh mapping, faulted page by page (measured: 544)


def test_a_bad_value_is_an_error_at_import():
    env = dict(os.environ, NPFLUX_REUSE_MEMORY="sometimes")
    out = subprocess.run([sys.executable, "-c", "import npflux"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "NPFLUX_REUSE_MEMORY='sometimes'" in out.stderr

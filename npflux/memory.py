"""The C allocator under NumPy's arrays: freed memory stays in the process for the next array.

A training step allocates and frees the same arrays every step: activations,
their gradients, temporaries. NumPy takes their memory from the C library's
``malloc``. On Linux that is glibc's, which by default hands an array of
128 KB or more (its threshold rises with use, to 32 MB at most) to the
kernel's ``mmap`` and gives it back to the kernel when the array is freed,
and gives back the free top of its heap above a similar threshold. The next
step's array then lands on fresh pages: the kernel zeroes each 4 KB page on
first touch (a page fault), and the data starts out of every cache. An
s1 step (16 x 32 tokens) took 7 to 131 such faults, a shakespeare-n step
(64 x 256) 34,000 to 38,000, whose attention weights alone (100 MB) come
fresh from the kernel every step.

``keep_freed_memory()`` raises both thresholds (``mallopt``'s M_MMAP_THRESHOLD
and M_TRIM_THRESHOLD) to ``KEEP_BYTES``, so arrays up to that size come from
the heap and freed memory stays there for the next array: about one fault per
s1 step, under 8,000 per shakespeare-n step. Measured on the 2-core AMD EPYC
of docs/benchmarks.md, each setting in its own processes, alternating: the
s1 step 6% faster (paired median over 8 rounds), the shakespeare-n step 5%
(6.66 against 7.02 s), s2 and nanogpt-cpu no faster; the peak of a process
training s2 251 MB against 237 MB, shakespeare-n's 3,453 against 3,351 MB.

The price is the point: memory a program frees is kept for its own reuse
instead of going back to the system until the process ends. npflux applies
it when imported (setting ``reuse_memory``, NPFLUX_REUSE_MEMORY, on by
default; read once, at import, as the allocator's thresholds cannot be put
back to glibc's adaptive defaults). Elsewhere (macOS, Windows, musl) it does
nothing: their allocators are other programs with other knobs.
"""
from __future__ import annotations

import ctypes
import platform

from . import settings

KEEP_BYTES = 1 << 30  # arrays up to 1 GiB from the heap; larger ones still go to mmap and back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

_STATE = {"applied": None}  # None: not tried yet; then True or False


def _glibc():
    """glibc's handle in this process, or None where the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (see the module docstring); True if it now does.

    Idempotent; False where the setting ``reuse_memory`` is off or the C
    library is not glibc.
    """
    if _STATE["applied"] is None:
        libc = _glibc() if settings.get("reuse_memory") else None
        ok = libc is not None
        if ok:
            # mallopt returns 1 on success; True only where both thresholds took
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(KEEP_BYTES))) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(KEEP_BYTES)))
        _STATE["applied"] = ok
    return _STATE["applied"]


def keeps_freed_memory() -> bool:
    """Whether ``keep_freed_memory`` took effect in this process (False before it ran)."""
    return bool(_STATE["applied"])

"""Keep freed CPU memory in the process, so that every training or sampling step does not page-fault.

A training step of the tiny presets allocates and frees about 90 MB of activations (fp32, batch 32).
glibc's malloc serves each of the larger blocks with its own `mmap` and hands it back with `munmap` on
free (its threshold adapts, but the step's mix of sizes keeps pushing blocks over it, and it trims the
heap's free top as well), so the next step touches fresh pages again: 19,000-23,000 minor page faults
per fp32 step; keeping the memory makes CPU training steps and sampling calls faster (the figures are
in BENCHMARKS.md, "Performance"). Two `mallopt` settings stop
that: blocks up to 32 MB come from the heap, and freed heap memory is kept for reuse instead of being
returned to the operating system. The price is that the process keeps its peak heap (the step's peak is
reached again at the next step anyway).

glibc reads these settings process-wide; other C libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, which is 32 MB on 64-bit systems.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1 << 30  # keep up to 1 GB of freed memory at the top of the heap

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (see the module docstring). Idempotent; returns
    True when the settings are in force, False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on a refused value.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied

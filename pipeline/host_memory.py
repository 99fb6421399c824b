"""Host memory: freed memory kept in the process, not given back to the OS (Linux, glibc).

glibc's malloc serves a request above its mmap threshold (128 KiB, rising to at most
32 MiB) with fresh pages from mmap and unmaps them on free. A CPU training step at a large
batch allocates and frees tensors over 32 MiB again and again, so every step faults them
back in, page by page, each page zeroed by the kernel: at B=2048, L=50 the PyTorch SSD
scan's forward and backward took 560,000 page faults a call and more system time than user
time. With mmap off and the trim threshold at its maximum, freed blocks stay in the heap
and the next step reuses them: a TiM4Rec step on Amazon Beauty's paper config went from
9.2 to 2.3 s on 2 cores. The process's resident memory then stays at its peak (5.8 GiB
against a 4.8 GiB peak there). docs/performance_notes.md, "CPU: freed host memory kept in the
process".

Config key `keep_host_memory` (default True); run.py, test.py, the baselines and the
benchmark apply it once at start. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes a C int
# glibc's own environment variables for the same settings: a user who set one keeps theirs.
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap, no trimming). Returns True
    when applied; False where it does not apply (not Linux with glibc, or the user set
    glibc's MALLOC_* variables). Process-wide and permanent: call it from entry points."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in GLIBC_MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX) == 1

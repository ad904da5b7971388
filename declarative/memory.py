"""Process-wide CPU memory settings that make repeated batched solves faster.

A layer call allocates and frees tensors of a few MiB each (factors, right-hand sides,
gradients). glibc's malloc returns such memory to the operating system when it is freed
(``munmap`` for blocks above its mmap threshold, ``sbrk`` trimming for the top of the
heap), so the next call gets fresh pages and pays a page fault for every 4 KiB it
touches: up to ~4000 faults per forward+backward of the QP benchmark's mid-size shapes
on a 2-core VM, and about none with this setting (``python benchmarks/page_faults.py``;
the time saved there was within that machine's run-to-run noise, 0-15 %, since the
solver already reuses its largest buffers).

:func:`retain_cpu_memory` asks malloc to keep freed memory for reuse instead. It changes
the whole process (every library in it allocates through the same malloc), so it is
never done on import: call it once at program start if the trade (memory the process
keeps in exchange for speed) suits you.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_cpu_memory"]

# mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's upper limit for the mmap threshold on 64-bit systems (32 MiB)
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8


def retain_cpu_memory(keep_mib: int = 1024) -> bool:
    """Keep memory freed by torch in this process for reuse (glibc on Linux).

    Blocks up to 32 MiB are served from the heap instead of fresh mappings, and up to
    ``keep_mib`` MiB of free memory at the top of the heap is kept rather than returned
    to the operating system. Returns True when the settings were applied, False where
    there is no glibc ``mallopt`` (other C libraries and operating systems; nothing is
    changed there).

    Cost: the process's resident memory stays at its high-water mark (up to
    ``keep_mib`` above what is in use) instead of shrinking after each call.
    """
    if not isinstance(keep_mib, int) or isinstance(keep_mib, bool) or keep_mib <= 0:
        raise ValueError(f"keep_mib must be a positive int, got {keep_mib!r}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    keep = min(keep_mib * 1024 * 1024, 2**31 - 1)  # mallopt takes a C int
    # a fixed mmap threshold also stops glibc from moving it (and the trim threshold)
    # with every freed block, which is what made the fault counts vary from run to run
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt semantics to rely on
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt

"""Keep freed heap memory inside the process (glibc), so CPU forward passes stop page-faulting.

A forward pass on CPU allocates and frees activations of a few MB each, hundreds of times. glibc
serves such sizes with mmap and returns them to the OS on free (or trims the heap top), so each
new activation's pages are faulted in again: about 110,000 minor page faults per 1,024-token
SmolLM2 forward on our VM, which showed up as slow element-wise ops. Raising glibc's mmap and
trim thresholds makes freed blocks stay in the heap and be reused (the process keeps its
high-water mark, as a caching allocator would). vLLM's CPU worker gets the same effect by
preloading tcmalloc; we use `mallopt` through ctypes instead of a preloaded library, so nothing
needs installing. No-op on non-glibc platforms.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger("opd.server")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it
# are still mmapped, and returned to the OS on free.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim the heap top below 2 GiB of slack
# glibc's initial mmap and trim thresholds (128 KiB), fixed through its environment variables so
# they cannot adapt: every larger block is mapped on allocation and unmapped on free, so RSS
# follows live memory. For child processes that measure memory or page faults.
FIXED_INITIAL_THRESHOLDS_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed blocks up to 32 MB for reuse. True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if ok:
        logger.info("glibc keeps freed blocks up to %d MB for reuse", MMAP_THRESHOLD_MAX >> 20)
    return ok

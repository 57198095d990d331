"""Process-level speed settings.

glibc's malloc serves large blocks (a batch of activations is megabytes) with mmap and
returns them to the kernel with munmap as soon as they are freed, and trims the heap
eagerly. A training step allocates and frees the same large buffers every time, so by
default every step pays for fresh pages: millions of minor page faults per run and a
throughput that swings by +-30% from run to run on CPUs. Raising the mmap threshold and
the trim threshold keeps those buffers in the heap for reuse. This is the same as
starting Python with MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184
MALLOC_TOP_PAD_=1073741824, done with mallopt(3) at start-up so users need not know.
Set KDISTILL_NO_MALLOPT=1 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator() -> bool:
    """Apply the malloc settings once per process (glibc on Linux only). Returns whether applied."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or os.environ.get("KDISTILL_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        [
            mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # the largest value glibc accepts
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),
            mallopt(_M_TOP_PAD, 1024 * 1024 * 1024),
        ]
    )
    _done = ok
    return ok

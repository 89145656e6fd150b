"""Give freed memory back to the operating system between the steps of a run.

A pass frees its working arrays when it ends, but glibc's allocator keeps much of that memory:
arrays below its mmap threshold (which rises to 32 MB as large arrays are freed) come from the
heap, and a heap with live blocks above the freed ones cannot shrink. The process then carries
the earlier passes' high-water mark into the next one. ``malloc_trim(0)`` returns the free
pages of every heap; where the C library has none (not glibc), this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

_TRIM = None
if sys.platform.startswith("linux"):
    try:
        _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        _TRIM = None


def release() -> None:
    """Collect unreachable Python objects, then hand the allocator's free pages back."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)

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


# below this many bytes of weights a run is left alone: a full collection costs ~0.15-0.25 s in a
# process that has imported PyTorch and transformers (a test suite compressing tiny models
# after every pass), and what a small model's passes free is small
RELEASE_ABOVE = 64 << 20


def release(model_bytes: int | None = None) -> None:
    """Collect unreachable Python objects (an IR graph's removed nodes and values hold each other,
    and their arrays, in cycles), then hand the allocator's free pages back. ``model_bytes``:
    the weights of the model being worked on; nothing is done below RELEASE_ABOVE."""
    if model_bytes is not None and model_bytes < RELEASE_ABOVE:
        return
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)

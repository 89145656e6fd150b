"""graphc.core.freed: memory a step let go goes back to the system before the next step."""

import sys

import numpy as np
import pytest

from graphc.core import freed


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(freed._TRIM is None, reason="no malloc_trim in this C library (not glibc)")
def test_free_heap_pages_between_live_blocks_are_returned():
    """Arrays below the allocator's mmap threshold live on the heap; with every tenth one kept,
    the freed ones between them stay in the process until malloc_trim hands them back."""
    assert sys.platform.startswith("linux")
    blocks = [np.ones(96 * 1024 // 8) for _ in range(3000)]  # ~280 MB of 96 kB heap blocks
    kept = blocks[::10]
    del blocks
    before = _rss()
    freed.release()
    after = _rss()
    assert before - after > 150 << 20, (before, after)
    assert all(float(k[0]) == 1.0 for k in kept)  # the live blocks are untouched


def test_small_models_are_left_alone(monkeypatch):
    """Below RELEASE_ABOVE bytes of weights no collection runs (a full one costs ~0.2 s in a
    process with PyTorch loaded, after every pass of every tiny-model compress)."""
    calls = []
    monkeypatch.setattr(freed.gc, "collect", lambda *a: calls.append("gc") or 0)
    freed.release(freed.RELEASE_ABOVE - 1)
    assert calls == []
    freed.release(freed.RELEASE_ABOVE)
    freed.release()
    assert calls == ["gc", "gc"]

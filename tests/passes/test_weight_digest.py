"""A weight's digest (how quantize-nbits and quantize-gather-block find a tied table's LM head) is
computed a block of rows at a time: the digest of the whole array's C-order bytes, without a
copy of the whole."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from graphc.passes._weights import weight_digest


def _whole(w_t) -> str:
    a = np.ascontiguousarray(w_t, dtype=np.float32)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:24]


@pytest.mark.parametrize("shape", [(4100, 1100), (3, 7), (1, 5), (0, 4)])
def test_the_digest_is_the_whole_arrays(shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    assert weight_digest(w) == _whole(w)
    transposed = np.ascontiguousarray(w.T).T  # a Fortran-ordered view: its C-order bytes
    assert weight_digest(transposed) == _whole(transposed) == _whole(w)
    wide = rng.standard_normal(shape)  # float64: digested as float32, as before
    assert weight_digest(wide) == _whole(wide)
    if w.size:
        other = w.copy()
        other.flat[-1] += 1.0
        assert weight_digest(other) != weight_digest(w)


def test_the_digest_holds_no_copy_of_a_large_weight():
    import tracemalloc

    w = np.random.default_rng(1).standard_normal((8192, 2048)).astype(np.float32)  # 64 MiB
    tracemalloc.start()
    weight_digest(w)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < w.nbytes / 2, peak  # blocks of 16 MiB at most (the whole was two 64 MiB copies)

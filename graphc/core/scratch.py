"""New large weights of a large model kept in a temporary file, not in memory.

A pass that rewrites a float weight (``awq-scale`` scaling every projection of a decoder, for
instance) makes a new array the size of the old one. On a model that streams
(graphc.core.streaming) those arrays would pile up in memory until the model is saved: awq alone
moved most of a 2.3 GB model into anonymous memory. Inside :func:`scratch_weights`,
:func:`~graphc.passes._quant.constant` writes each new float array of at least ``min_bytes`` to
one temporary file and gives the graph an external tensor that maps it, like the input's own
external data: pages are read when a pass reads the weight and can be dropped again
(``release_pages``). The folder is removed when the store is garbage-collected (the result of
``graphc.compress`` keeps it while the result lives) or at exit.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphc.core import tempdirs

MIN_BYTES = 16 << 20
_ALIGN = 64


class ScratchStore:
    def __init__(self, min_bytes: int | None = None) -> None:
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self._dir = tempdirs.folder("graphc-weights-")
        self._name = "weights.bin"
        self._offset = 0
        self.count = 0

    def wants(self, array: np.ndarray) -> bool:
        return array.nbytes >= self.min_bytes and array.dtype.kind == "f" and array.ndim > 0

    def tensor(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        """``array`` written to the store's file, as an external tensor that reads it from there."""
        array = np.ascontiguousarray(array)
        offset = -(-self._offset // _ALIGN) * _ALIGN
        with tempdirs.writing("rewritten weights", self._dir.name), \
                open(os.path.join(self._dir.name, self._name), "ab") as f:
            f.write(b"\0" * (offset - self._offset))
            f.write(memoryview(array).cast("B"))  # no bytes copy of a weight of hundreds of MB
        self._offset = offset + array.nbytes
        self.count += 1
        return ir.ExternalTensor(self._name, offset=offset, length=array.nbytes,
                                 dtype=ir.DataType.from_numpy(array.dtype), shape=ir.Shape(array.shape),
                                 name=name, base_dir=self._dir.name)


_store: contextvars.ContextVar[ScratchStore | None] = contextvars.ContextVar("graphc_scratch", default=None)


@contextlib.contextmanager
def scratch_weights(store: ScratchStore | None) -> Iterator[ScratchStore | None]:
    """New large float weights made inside go to ``store`` (None: they stay in memory)."""
    token = _store.set(store)
    try:
        yield store
    finally:
        _store.reset(token)


def current() -> ScratchStore | None:
    return _store.get()

"""Input moments gathered once a run and shared by the passes that want them.

A calibrated 4-bit recipe on a decoder reads the second moments of the same MatMul inputs three
times: ``awq-scale`` (channel sizes, the error search), ``mixed-precision`` (its GPTQ probes'
Hessians, without the feeds it measures on) and ``quantize-nbits`` (GPTQ's Hessians). Each read
was one full sweep of the float model over every calibration window (SmolLM2-135M: ~3 minutes of
its ~14 on two cores). With a :class:`MomentsCache` in the :class:`~graphc.core.pass_base.PassContext`
the first sweep collects every constant-weight MatMul input at once, and the later passes read
it, provided that the model's activations did not change in between:

- the :class:`~graphc.core.manager.PassManager` empties the cache after a pass that modified the
  model, unless the pass says ``keeps_activations`` (its rewrite leaves every value it does not
  name equal: ``split-vocab``, the planners that only annotate nodes);
- a pass that changes a value by a known per-channel factor (``awq-scale``: x becomes x / s)
  says ``keeps_activations`` and updates that value's entry with :meth:`MomentsCache.rescale`.

Sums are kept, not means, so that a consumer can leave out the first ``n`` feeds (the held-out
feeds of ``mixed-precision``'s probes): :meth:`MomentsCache.prepare` announces those ``n``
before the first sweep, which then also snapshots the sums after ``n`` feeds. Memory is bounded:
a sweep whose sums would pass ``max_bytes`` is not kept (each pass then sweeps for itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from graphc.core import tempdirs

DEFAULT_MAX_BYTES = 4 << 30


class Sums:
    """Running sums of one value's rows: sum x x^T [K, K] (float64), sum |x| [K], rows.

    ``gram`` may live on disk (:meth:`spill`: a streamed sweep's sums, which for a large model
    pass the memory a run may use): it is then read on each access, and what derives from it
    (:meth:`minus`, a rescaled copy) is computed on access too, never held."""

    __slots__ = ("_gram", "abs_sum", "tokens")

    def __init__(self, gram: np.ndarray | Callable[[], np.ndarray], abs_sum: np.ndarray, tokens: int) -> None:
        self._gram, self.abs_sum, self.tokens = gram, abs_sum, tokens

    @property
    def gram(self) -> np.ndarray:
        return self._gram() if callable(self._gram) else self._gram

    @gram.setter
    def gram(self, value: np.ndarray) -> None:
        self._gram = value

    @property
    def spilled(self) -> bool:
        return callable(self._gram)

    def spill(self, folder: SpillFolder) -> None:
        """Keep ``gram`` in ``folder`` instead of memory."""
        if not self.spilled:
            self._gram = folder.keep(self._gram)

    def snapshot(self, folder: SpillFolder) -> Sums:
        """A copy whose ``gram`` is on disk (written from this one's, never copied in memory)."""
        return Sums(self._gram if self.spilled else folder.keep(self._gram), self.abs_sum.copy(), self.tokens)

    def copy(self) -> Sums:
        return Sums(self._gram if self.spilled else self._gram.copy(), self.abs_sum.copy(), self.tokens)

    def fresh_gram(self) -> np.ndarray:
        """``gram`` as an array the caller owns (a spilled one is read anew on every access)."""
        return self._gram() if self.spilled else self._gram.copy()

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a:b of ``gram`` as an array the caller owns: of a spilled (or derived) one, read
        and computed for those rows alone, the same numbers as ``gram[a:b]``."""
        if isinstance(self._gram, LazyGram):
            return self._gram.rows(a, b)
        return (self._gram() if self.spilled else self._gram)[a:b].copy()

    def minus(self, other: Sums) -> Sums:
        abs_sum, tokens = self.abs_sum - other.abs_sum, self.tokens - other.tokens
        if self.spilled or other.spilled:  # computed on access, in place: two K x K arrays at most
            size = len(self.abs_sum)
            return Sums(LazyGram(lambda a, b: np.subtract(g := self.rows(a, b), other.rows(a, b), out=g), size),
                        abs_sum, tokens)
        return Sums(self.gram - other.gram, abs_sum, tokens)

    def scaled(self, inv: np.ndarray) -> Sums:
        """The sums of x * inv (per channel)."""
        if self.spilled:
            def rows(a: int, b: int) -> np.ndarray:  # row by row: the in-memory form's gram * outer(inv, inv), bit for bit
                g = self.rows(a, b)
                for i in range(a, b):
                    g[i - a] *= inv[i] * inv
                return g

            return Sums(LazyGram(rows, len(self.abs_sum)), self.abs_sum * inv, self.tokens)
        return Sums(self.gram * np.outer(inv, inv), self.abs_sum * inv, self.tokens)

    def nbytes(self) -> int:
        return (0 if self.spilled else self.gram.nbytes) + self.abs_sum.nbytes


class LazyGram:
    """A K x K float64 matrix computed when asked for, whole (``lazy()``) or by rows
    (``lazy.rows(a, b)``): a spilled gram read from its file, or one derived from it (a
    difference, a rescaled copy). Each element is computed by the same operations either way, so
    rows give the whole matrix's numbers; rows let a consumer build a float32 copy of a large
    Hessian without holding its float64 form (an 11008-wide one is ~1 GB)."""

    def __init__(self, rows: Callable[[int, int], np.ndarray], size: int) -> None:
        self.rows, self.size = rows, size

    def __call__(self) -> np.ndarray:
        return self.rows(0, self.size)

    def float32(self, block: int = 256) -> np.ndarray:
        """The matrix as float32, built a block of rows at a time."""
        out = np.empty((self.size, self.size), np.float32)
        for a in range(0, self.size, block):
            rows = self.rows(a, min(a + block, self.size))
            out[a:a + len(rows)] = rows
        return out


class SpillFolder:
    """A temporary folder of arrays, removed once nothing reads from it any more (each loader
    holds the folder)."""

    def __init__(self) -> None:
        self._dir = tempdirs.folder("graphc-moments-")
        self._count = 0

    def keep(self, array: np.ndarray) -> LazyGram:
        """``array`` (C-ordered, 2-D) written to the folder; read back whole or by rows."""
        import os

        path = os.path.join(self._dir.name, f"{self._count}.npy")
        self._count += 1
        array = np.ascontiguousarray(array)
        with tempdirs.writing("calibration sums", self._dir.name):
            np.save(path, array)
        with open(path, "rb") as f:  # where the data starts, after the .npy header
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"internal: a spilled gram is {shape}, fortran={fortran}")
        folder = self  # the reader keeps the folder (and its files) alive
        width = int(shape[1])

        def rows(a: int, b: int) -> np.ndarray:
            assert folder is not None
            b = min(b, int(shape[0]))
            with open(path, "rb") as f:
                f.seek(offset + a * width * dtype.itemsize)
                return np.fromfile(f, dtype=dtype, count=max(b - a, 0) * width).reshape(max(b - a, 0), width)

        return LazyGram(rows, int(shape[0]))


def feed_key(feeds: Sequence[Any]) -> tuple[int, ...]:
    """Which feeds (by identity: passes slice one list of feed dicts, never copy them)."""
    return tuple(id(f) for f in feeds)


class MomentsCache:
    """Sums of every collected value over one list of calibration feeds, plus snapshots after
    the first ``n`` feeds for each announced ``n`` (see the module doc)."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.held_out: set[int] = set()
        self.feeds: list[Any] = []
        self.sweeps = 0  # full sweeps run while this cache was attached (for stats and tests)
        self.hits = 0
        self.clear()

    def prepare(self, feeds: Sequence[Any] | None, held_out: Iterable[int] = ()) -> None:
        """The run's calibration feeds (the list sweeps cover), and the ``n`` for which consumers
        will ask for them without their first ``n`` feeds."""
        self.feeds = list(feeds or [])
        self.held_out.update(int(n) for n in held_out if int(n) > 0)

    def sweep_for(self, feeds: Sequence[Any]) -> list[Any] | None:
        """The feeds a sweep should cover to answer a request for ``feeds`` (the run's whole
        list, when the request is it or it without an announced head), else None: not cached."""
        key, full = feed_key(feeds), feed_key(self.feeds)
        if full and (key == full or any(key == full[n:] for n in self.held_out)):
            return self.feeds
        return None

    def clear(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._total: dict[str, Sums] = {}
        self._heads: dict[int, dict[str, Sums]] = {}

    def __len__(self) -> int:
        return len(self._total)

    # ------------------------------------------------------------------ reading
    def lookup(self, names: Iterable[str], feeds: Sequence[Any]) -> dict[str, Sums] | None:
        """The sums of every named value over exactly ``feeds``, or None when the cache cannot
        give all of them (other feeds, a value not collected, a snapshot not taken)."""
        if self._key is None:
            return None
        names = list(names)
        if any(n not in self._total for n in names):
            return None
        key = feed_key(feeds)
        if key == self._key:
            return {n: self._total[n] for n in names}
        skip = len(self._key) - len(key)
        if skip in self._heads and key == self._key[skip:]:
            head = self._heads[skip]
            return {n: self._total[n].minus(head[n]) for n in names}
        return None

    # ------------------------------------------------------------------ writing
    def fits(self, sizes: Iterable[int]) -> bool:
        """Whether sums of values with these channel counts (with their snapshots) stay in bounds."""
        per_copy = sum(8 * k * (k + 1) for k in sizes)
        return per_copy * (1 + len(self.held_out)) <= self.max_bytes

    def store(self, feeds: Sequence[Any], total: dict[str, Sums], heads: dict[int, dict[str, Sums]]) -> None:
        self._key = feed_key(feeds)
        self._total = dict(total)
        self._heads = {n: dict(h) for n, h in heads.items()}
        self.sweeps += 1

    def rescale(self, name: str, s: np.ndarray) -> None:
        """The value ``name`` became x / s (per channel, its last axis): its sums follow exactly."""
        inv = 1.0 / np.asarray(s, np.float64)
        for table in (self._total, *self._heads.values()):
            sums = table.get(name)
            if sums is not None:
                table[name] = sums.scaled(inv)

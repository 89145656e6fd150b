"""Where a pass's independent work items run: in this process, or on Ray workers.

Calibrating recipes spend most of their time in measurements that do not depend on each
other (one sensitivity probe per layer and candidate precision). A pass hands such work to
``context.executor.map(fn, items, shared=...)`` and gets the results back **in input order**,
whatever order the workers finish in, so that every reduction over them (sums, plans, ties)
is the one a single process makes and the written model is byte-identical.

- ``fn(shared, item)`` is a module-level function (workers import it by name);
- ``shared`` is what every item needs and is too large to send with each (the model, the
  calibration feeds): :class:`LocalExecutor` hands it over as is, :class:`RayExecutor` puts it
  in Ray's object store once and sends each task a reference (numpy arrays are then read
  zero-copy from shared memory by the workers of a node);
- ``items`` may be a generator: it is consumed once, in order (the Ray executor submits each
  item as it comes, so workers start while the rest is computed);
- ``labels`` name the items in errors ("layer encoder.layer.3.output.dense"), and
  ``on_result(index, result)`` is called as each result arrives, in arrival order (progress).

This module never imports Ray: :func:`make_executor` imports :mod:`graphc.core.ray_executor` only
when workers or a cluster address are asked for, so a run without them loads no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from graphc.core.errors import DistributedError, GraphcError, UnsupportedError

T = TypeVar("T")
R = TypeVar("R")

OnResult = Callable[[int, Any], None]


class Executor(Protocol):
    """What a pass may rely on."""

    # ONNX Runtime / BLAS threads a work item may use (None: the library's default, every core)
    threads_per_item: int | None
    # whether every worker reads this process's files (temporary folders, mapped weights): work
    # that hands files over (a streamed model's probes) needs it; an executor without the
    # attribute is taken not to
    single_node: bool

    @property
    def workers(self) -> int: ...

    def map(self, fn: Callable[[Any, T], R], items: Iterable[T], *, shared: Any = None,
            labels: Sequence[str] | None = None, on_result: OnResult | None = None) -> list[R]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Every item in this process, one after the other (the default: no extra dependency)."""

    threads_per_item: int | None = None
    single_node = True  # workers read this process's files (temporary folders, mapped weights)

    @property
    def workers(self) -> int:
        return 1

    def map(self, fn: Callable[[Any, T], R], items: Iterable[T], *, shared: Any = None,
            labels: Sequence[str] | None = None, on_result: OnResult | None = None) -> list[R]:
        results: list[R] = []
        for i, item in enumerate(items):
            try:
                result = fn(shared, item)
            except GraphcError:
                raise
            except MemoryError:
                raise DistributedError(f"{_label(labels, i)}: out of memory") from None
            results.append(result)
            if on_result is not None:
                on_result(i, result)
        return results

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "LocalExecutor()"


def _label(labels: Sequence[str] | None, i: int) -> str:
    return labels[i] if labels is not None and i < len(labels) else f"work item {i}"


def make_executor(workers: int | None = None, ray: str | None = None) -> Executor | None:
    """The executor for ``--workers N`` / ``--ray auto|ADDRESS`` (None when neither is given:
    passes then run their work in this process). Connecting happens here, before any work, so
    that an unreachable cluster or a missing Ray fails in one line with nothing written."""
    if workers is None and not ray:
        return None
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UnsupportedError(f"workers={workers!r}; a positive number of worker processes")
    if workers is not None and ray:
        raise UnsupportedError("workers and ray are exclusive: --workers N starts a local Ray instance with N CPUs, "
                               "--ray ADDRESS uses the CPUs of a running cluster")
    from graphc.core.ray_executor import RayExecutor

    return RayExecutor(address=ray or None, workers=workers)


def resolve(executor: Executor | None) -> Executor:
    """``executor``, or a :class:`LocalExecutor` when there is none."""
    return executor if executor is not None else LocalExecutor()

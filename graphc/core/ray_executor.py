"""The Ray executor: a pass's independent work items on the CPUs of a Ray cluster.

Imported only when ``--workers``/``--ray`` (or ``compress(workers=..., ray=...)``) asks for
it; Ray itself is the optional extra ``graphc[distributed]``.

- ``RayExecutor(workers=N)`` starts a local Ray instance with N CPUs (no dashboard) and stops
  it on :meth:`close`; ``RayExecutor(address="auto" | "HOST:PORT" | "ray://HOST:PORT")``
  connects to a running cluster (every node must have the same graphc installed: workers
  import the work functions by name) and only disconnects. An address that does not answer
  fails here, in one line, before any work.
- The shared object of a ``map`` is ``ray.put`` once; each task is sent its reference and the
  item only. One task is one CPU; ONNX Runtime inside it runs one thread
  (``threads_per_item``) so N workers on N cores do not oversubscribe them.
- A worker process that dies (killed, crashed, OOM-killed by Ray's memory monitor) has its task
  retried (``max_retries``); an exception raised by the work itself is not retried (it would
  fail again) and surfaces as one :class:`~graphc.core.errors.DistributedError` naming the item.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from graphc.core.errors import DistributedError, GraphcError, MissingDependencyError
from graphc.core.executor import OnResult, _label

INSTALL_HINT = "pip install graphc[distributed]"
CONNECT_TIMEOUT_S = 3.0


def import_ray():
    """``ray``, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError(f"--workers/--ray need Ray, which is not installed ({INSTALL_HINT}): {e}") from None
    return ray


def _call(fn: Callable[[Any, Any], Any], shared: Any, item: Any) -> Any:
    """The task every work item runs as (Ray resolves ``shared``'s reference before the call)."""
    return fn(shared, item)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) within ``timeout`` seconds, else a
    DistributedError: ``ray.init`` itself keeps retrying an unreachable address for a minute."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"--ray {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DistributedError(f"cannot reach the Ray cluster at {address} ({reason}); nothing was done") from None


class RayExecutor:
    """Work items as Ray tasks, one CPU each, results in input order."""

    threads_per_item: int | None = 1

    def __init__(self, address: str | None = None, workers: int | None = None, *, max_retries: int = 3) -> None:
        ray = import_ray()
        self._ray = ray
        self.max_retries = max_retries
        self.address = address
        self._initialized_here = False
        if ray.is_initialized() and address is None and workers is None:
            pass  # the caller's own ray.init: use it, leave it running
        else:
            if address not in (None, "auto"):
                check_reachable(address)
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": "ERROR", "ignore_reinit_error": False}
            if address is None:
                kwargs["num_cpus"] = workers
            else:
                kwargs["address"] = address
            if ray.is_initialized():
                raise DistributedError("Ray is already initialized in this process: pass executor=RayExecutor() "
                                       "to use that instance, or call ray.shutdown() first")
            try:
                with _native_stderr_hidden():  # Ray's C++ client logs a line a second while it retries
                    ray.init(**kwargs)
            except ConnectionError:
                if address != "auto":
                    raise DistributedError(f"cannot reach the Ray cluster at {address}; nothing was done") from None
                raise DistributedError("--ray auto: no running Ray cluster found on this machine (start one with "
                                       "`ray start --head`, or give its address); nothing was done") from None
            except Exception as e:  # noqa: BLE001 - RuntimeError, ValueError from Ray
                where = f"the Ray cluster at {address}" if address else f"a local Ray instance with {workers} CPUs"
                raise DistributedError(f"cannot start or reach {where}: {_one_line(e)}; nothing was done") from None
            self._initialized_here = True
        self._task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(_call)

    @property
    def workers(self) -> int:
        """CPUs of the cluster (tasks that can run at once)."""
        return int(self._ray.cluster_resources().get("CPU", 1))

    @property
    def single_node(self) -> bool:
        """Whether every worker runs on one machine (and so reads this process's files)."""
        return len([n for n in self._ray.nodes() if n.get("Alive")]) <= 1

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[Any], *, shared: Any = None,
            labels: Sequence[str] | None = None, on_result: OnResult | None = None) -> list[Any]:
        ray = self._ray
        shared_ref = ray.put(shared)  # once: every task gets the reference, not a copy
        # submitted as ``items`` yields them: workers start while a generator computes the rest
        pending = {self._task.remote(fn, shared_ref, item): i for i, item in enumerate(items)}
        results: list[Any] = [None] * len(pending)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        raise self._error(e, _label(labels, i)) from None
                    if on_result is not None:
                        on_result(i, results[i])
        finally:
            for ref in pending:  # a failure or Ctrl-C: the rest is not wanted
                ray.cancel(ref, force=True)
            del shared_ref
        return results

    def _error(self, e: Exception, label: str) -> GraphcError:
        """One line naming the item and what happened to it."""
        exc = self._ray.exceptions
        if isinstance(e, exc.RayTaskError):  # the work raised: the original exception
            cause = getattr(e, "cause", None)
            if isinstance(cause, GraphcError):
                return DistributedError(f"{label}: {cause}")
            if isinstance(cause, MemoryError):
                return DistributedError(f"{label}: out of memory on a Ray worker")
            what = f"{type(cause).__name__}: {_one_line(cause)}" if cause is not None else _one_line(e)
            return DistributedError(f"{label} failed on a Ray worker: {what}")
        if isinstance(e, exc.OutOfMemoryError):
            return DistributedError(f"{label}: a Ray worker ran out of memory (killed by Ray's memory monitor, "
                                    f"after retries); use fewer workers or nodes with more memory")
        if isinstance(e, exc.WorkerCrashedError):
            return DistributedError(f"{label}: its Ray worker process died on each of {self.max_retries + 1} "
                                    f"attempts (max_retries={self.max_retries})")
        return DistributedError(f"{label}: {type(e).__name__}: {_one_line(e)}")

    def close(self) -> None:
        """Stop the local instance this executor started, or disconnect from the cluster."""
        if self._initialized_here and self._ray.is_initialized():
            self._ray.shutdown()
        self._initialized_here = False

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, workers={self.workers})"


@contextlib.contextmanager
def _native_stderr_hidden():
    """File descriptor 2 pointed at a scratch file for the block: native code (Ray's C++ core
    worker, which retries a GCS that does not answer as Ray for ~20 s) writes there, not on the
    user's terminal, where graphc's own failure is one line. Python's ``sys.stderr`` is flushed
    first; what went to the scratch file is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")

"""Signals and time limits: a run can always be stopped, and stops cleanly.

- :func:`signals_raise` (used by the CLI) turns SIGTERM into :class:`Terminated`, so that
  ``finally`` blocks run (the save's temporary folder is removed) exactly as they do for
  Ctrl-C's KeyboardInterrupt.
- :func:`run_session` runs one ONNX Runtime call in a worker thread, so that the main
  thread keeps handling signals while ORT computes (a ``session.run`` in the main thread
  holds off Python's signal handlers until it returns, which for a ``Loop`` of 10^12
  iterations is never). On a signal or when the :func:`time_limit` expires it sets
  ``RunOptions.terminate``; ORT stops at its next node.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from graphc.core.errors import GraphcError


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived. A BaseException, like KeyboardInterrupt: nothing catches it
    by accident on the way out."""

    exit_code = 143


class TimeLimitError(GraphcError):
    """Validation ran past its time budget; ORT was stopped."""


_deadline: contextvars.ContextVar[tuple[float, float, str] | None] = contextvars.ContextVar("graphc_deadline", default=None)


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` while inside (main thread only; elsewhere
    a no-op); SIGINT raises KeyboardInterrupt as Python's default handler does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    old = {s: signal.signal(s, _raise_terminated) for s in wanted}
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGINT, old_int)


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "validation") -> Iterator[None]:
    """ORT calls made through :func:`run_session` inside must end within ``seconds`` in all
    (None: no limit); past it they are stopped and :class:`TimeLimitError` is raised."""
    if seconds is None:
        yield
        return
    token = _deadline.set((time.monotonic() + seconds, seconds, what))
    try:
        yield
    finally:
        _deadline.reset(token)


def run_session(session: Any, feed: dict, output_names: list[str] | None = None) -> list:
    """``session.run(output_names, feed)``, interruptible and bounded by :func:`time_limit`."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # a terminated run would print ORT's own error lines
    limit = _deadline.get()
    box: dict[str, Any] = {}
    # An Event, not Thread.join: a join interrupted by KeyboardInterrupt can leave the thread
    # looking finished while ORT still runs in it (and the process then aborts at exit).
    done = threading.Event()

    def work() -> None:
        try:
            box["out"] = session.run(output_names, feed, options)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            box["err"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name="graphc-ort-run", daemon=True)
    worker.start()
    try:
        while not done.wait(0.05):
            if limit is not None and time.monotonic() > limit[0]:
                options.terminate = True
                done.wait()
                raise TimeLimitError(
                    f"{limit[2]} ran past its time limit of {limit[1]:g} s (ONNX Runtime stopped); "
                    "raise it with --validate-timeout, or skip validation with --no-validate"
                )
    except BaseException:
        options.terminate = True  # ORT stops at its next node
        while not done.wait(0.05):  # a second Ctrl-C here would abandon a running ORT thread
            pass
        raise
    if "err" in box:
        raise box["err"]
    return box["out"]


def default_time_limit(weight_bytes: int) -> float:
    """Seconds one model's validation runs may take in all, sized to the model: 5 minutes,
    plus a minute per 100 MB of weights (MiniLM's ~90 MB: ~6 min; a 540 MB decoder: ~10 min).
    Generous next to what a finite model needs (MiniLM's validation runs take seconds); its
    job is to end a model that never finishes (a Loop of 10^12 iterations)."""
    return 300.0 + 60.0 * weight_bytes / 1e8

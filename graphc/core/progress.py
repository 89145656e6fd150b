"""Progress of a compress run, for the command line: which pass runs (i of N) and, inside the
long ones, how far they are (``PassContext.report(what, done, total)``).

Three renderings, all on stderr (stdout stays the result):

- :class:`RichProgress`: a rich progress bar with elapsed time and ETA, on a terminal;
- :class:`LineProgress`: plain lines for logs (CI, ``--progress`` where stderr is not a
  terminal), at most one every ``interval`` seconds and none before the run has lasted that
  long, so a quick run prints nothing;
- :class:`JsonProgress`: one JSON object a line (``--json --progress``), for programs.

Each is both an instrument for the pass manager (``before_pass``/``after_pass``) and the
``progress`` callback that passes report to. The library never prints: only the CLI makes these.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class _Base:
    """Shared bookkeeping: the pass running, its index, the inner step and when it started."""

    def __init__(self, total_passes: int | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_passes
        self.index = 0
        self.current = "loading"
        self.clock = clock
        self.started = clock()
        self.step_started = self.started
        self.step_what = ""

    # instrument hooks ---------------------------------------------------------------
    def before_pass(self, pass_: Any, model: Any) -> None:
        self.index += 1
        self.current = pass_.name
        self.step_what, self.step_started = "", self.clock()
        self.on_pass_start()

    def after_pass(self, pass_: Any, model: Any, record: Any) -> None:
        self.on_pass_end(record)
        if self.total is not None and self.index >= self.total:
            self.stage("validating")

    # PassContext.progress callback --------------------------------------------------------
    def __call__(self, what: str, done: int, total: int) -> None:
        if what != self.step_what:
            self.step_what, self.step_started = what, self.clock()
        self.on_step(what, done, total)

    def eta(self, done: int, total: int) -> float | None:
        """Seconds left in the current step at its rate so far (None before a first unit)."""
        if done <= 0 or total <= done:
            return None if done <= 0 else 0.0
        return (self.clock() - self.step_started) * (total - done) / done

    def position(self) -> str:
        return f"[{self.index}/{self.total}]" if self.total else f"[{self.index}]"

    # renderings override these ------------------------------------------------------------
    def stage(self, text: str) -> None:
        self.current = text

    def on_pass_start(self) -> None: ...

    def on_pass_end(self, record: Any) -> None: ...

    def on_step(self, what: str, done: int, total: int) -> None: ...

    def close(self) -> None: ...


class LineProgress(_Base):
    """Plain lines, at most one per ``interval`` seconds, the first after ``interval``."""

    def __init__(self, total_passes: int | None = None, *, stream: TextIO | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(total_passes, clock=clock)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.last = self.started

    def _line(self, text: str) -> None:
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        self.stream.write(f"graphc: {now - self.started:6.0f}s {text}\n")
        self.stream.flush()

    def stage(self, text: str) -> None:
        super().stage(text)
        self._line(text)

    def on_pass_start(self) -> None:
        self._line(f"{self.position()} {self.current}")

    def on_step(self, what: str, done: int, total: int) -> None:
        eta = self.eta(done, total)
        left = f", ~{eta:.0f}s left" if eta else ""
        label = what if what == self.current else f"{self.current}: {what}"
        self._line(f"{self.position()} {label} {done}/{total}{left}")


class JsonProgress(_Base):
    """JSON lines: ``{"event": "pass", "status": "start", ...}``, ``{"event": "progress", ...}``,
    ``{"event": "stage", ...}``; progress events at most every ``interval`` seconds per step
    (the last of a step always)."""

    def __init__(self, total_passes: int | None = None, *, stream: TextIO | None = None, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(total_passes, clock=clock)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.last_step = -float("inf")

    def _event(self, **data: Any) -> None:
        data["t"] = round(self.clock() - self.started, 3)
        self.stream.write(json.dumps(data) + "\n")
        self.stream.flush()

    def stage(self, text: str) -> None:
        super().stage(text)
        self._event(event="stage", stage=text)

    def on_pass_start(self) -> None:
        self._event(event="pass", status="start", index=self.index, total=self.total, name=self.current)

    def on_pass_end(self, record: Any) -> None:
        self._event(event="pass", status="end", index=self.index, total=self.total, name=self.current,
                    wall_s=round(record.wall_s, 3), modified=record.modified)

    def on_step(self, what: str, done: int, total: int) -> None:
        now = self.clock()
        if done < total and now - self.last_step < self.interval:
            return
        self.last_step = now
        eta = self.eta(done, total)
        self._event(event="progress", name=self.current, what=what, done=done, total=total,
                    eta_s=None if eta is None else round(eta, 1))


class RichProgress(_Base):
    """A rich bar on the terminal: passes done of N, and the running pass's own steps with ETA."""

    def __init__(self, total_passes: int | None = None) -> None:
        super().__init__(total_passes)
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.passes = self.bar.add_task("graphc: loading", total=total_passes)
        self.step = self.bar.add_task("", total=1, visible=False)
        self.bar.start()

    def stage(self, text: str) -> None:
        super().stage(text)
        self.bar.update(self.passes, description=f"graphc: {text}")
        self.bar.update(self.step, visible=False)

    def on_pass_start(self) -> None:
        self.bar.update(self.passes, description=f"graphc: {self.current}", completed=self.index - 1)
        self.bar.reset(self.step, total=1, visible=False)

    def on_pass_end(self, record: Any) -> None:
        self.bar.update(self.passes, completed=self.index)

    def on_step(self, what: str, done: int, total: int) -> None:
        if what != self.bar.tasks[self.step].fields.get("what"):
            self.bar.reset(self.step, total=max(total, 1), what=what)
        self.bar.update(self.step, description=f"  {what}", completed=done, total=max(total, 1), visible=True)

    def close(self) -> None:
        self.bar.stop()


def make_progress(mode: bool | None, *, as_json: bool, total_passes: int | None,
                  stream: TextIO | None = None) -> _Base | None:
    """The rendering for ``--progress`` (True), ``--no-progress`` (False) or neither (None):
    on a terminal a bar unless ``--no-progress`` (it vanishes when done, so an error stays the
    one line left on stderr); elsewhere only when asked for, as plain lines, or as JSON lines
    with --json (stderr of scripts and tests stays the one-line error or nothing)."""
    stream = stream if stream is not None else sys.stderr
    if as_json:
        return JsonProgress(total_passes, stream=stream) if mode else None
    if mode is False or (mode is None and not stream.isatty()):
        return None
    if stream.isatty():
        return RichProgress(total_passes)
    return LineProgress(total_passes, stream=stream)

"""Temporary folders that say who made them, and the removal of those a killed run left.

graphc keeps large intermediate data in temporary folders (spilled second moments, weights
rewritten on a streamed model, activations between segments, probe inputs for workers, the
save's folder beside the output): tens of gigabytes on a large model. Python removes them when
the run ends, on an error or a signal; a process killed outright (SIGKILL, the kernel's
out-of-memory killer) cannot, and its folders stay until someone deletes them, filling the
disk for the next run.

So every such folder holds a small owner file (:data:`OWNER`: host, process id, the process's
start time), and :func:`sweep` removes the folders whose owner was on this host and is gone: no
process with that id, or one that started at another time (the id was reused). A folder
without an owner file, or with one from another host, another user's, or a running process's,
is left alone.

A full disk gets one line too (:class:`~graphc.core.errors.DiskSpaceError`, naming the folder):
before a streamed calibration sweep when its spilled sums will not fit (:func:`check_free`),
and wherever a temporary write hits ENOSPC (:func:`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from graphc.core.errors import DiskSpaceError

OWNER = ".graphc-owner"
# the temporary folders graphc makes under the system's temporary directory
PREFIXES = ("graphc-weights-", "graphc-moments-", "graphc-activations-", "graphc-probes-")
SAVE_PREFIX = ".graphc-tmp-"  # the save's folder, beside the output


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count after its end
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except OSError:
        return True  # unknown: never remove on a guess
    return True


def mark(folder: str | os.PathLike) -> None:
    """Write the owner file of this process into ``folder``."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    with contextlib.suppress(OSError):  # a folder without the file is only never swept
        Path(folder, OWNER).write_text(json.dumps(owner))


def folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A ``TemporaryDirectory`` under the system's temporary directory, marked as this process's."""
    made = tempfile.TemporaryDirectory(prefix=prefix)
    mark(made.name)
    return made


def orphaned(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a marked folder whose process, on this host, is gone."""
    try:
        owner = json.loads(Path(path, OWNER).read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    now = _start_time(pid)
    return start is not None and now is not None and now != start  # the id was given to another process


@dataclass
class Swept:
    folders: int = 0
    bytes: int = 0

    def __str__(self) -> str:
        return (f"removed {self.folders} temporary folder{'s' * (self.folders != 1)} "
                f"({self.bytes / 1e9:.2f} GB) left by graphc runs that were killed")


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sweep(where: str | os.PathLike | None = None, prefixes: tuple[str, ...] = PREFIXES) -> Swept:
    """Remove the orphaned folders named ``prefix*`` in ``where`` (default: the system's temporary
    directory) that belong to this user. Errors are ignored: this only frees space."""
    root = Path(where if where is not None else tempfile.gettempdir())
    swept = Swept()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return swept
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        if not entry.name.startswith(prefixes):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        path = Path(entry.path)
        if orphaned(path):
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                swept.folders += 1
                swept.bytes += size
    return swept


def sweep_run(output: str | os.PathLike | None = None) -> Swept:
    """What a run sweeps: the temporary directory and, for the save's folder, the folder the
    output goes to."""
    swept = sweep()
    if output is not None:
        beside = sweep(Path(output).absolute().parent, (SAVE_PREFIX,))
        swept.folders, swept.bytes = swept.folders + beside.folders, swept.bytes + beside.bytes
    return swept


# ---------------------------------------------------------------------------- disk space
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_HINT = "point TMPDIR at a folder on a larger disk"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def free_bytes(where: str | os.PathLike | None = None) -> int | None:
    """Free bytes on the file system of ``where`` (default: the temporary directory), None if unknown."""
    try:
        return shutil.disk_usage(where if where is not None else tempfile.gettempdir()).free
    except OSError:
        return None


def check_free(need: int, what: str, where: str | os.PathLike | None = None) -> None:
    """Raise :class:`DiskSpaceError` (one line, before any of it is written) when ``need`` bytes
    of ``what`` will not fit in the free space of ``where`` (default: the temporary directory)."""
    folder = os.fspath(where if where is not None else tempfile.gettempdir())
    free = free_bytes(folder)
    if free is not None and need > free:
        raise DiskSpaceError(f"{what} need about {_gb(need)} of temporary files and the disk has {_gb(free)} "
                             f"free; {_HINT}", path=folder)


@contextlib.contextmanager
def writing(what: str, folder: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``what`` into ``folder`` into one line."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise DiskSpaceError(f"the disk filled up while writing {what} ({e.strerror}); {_HINT}",
                                 path=os.fspath(folder)) from None
        raise

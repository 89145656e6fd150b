"""Where graphc may write. Every file a run will write is checked before any work.

The rules, for ``-o``, ``--report`` and ``--dump-dir`` alike:

- an output never replaces an input file: the model or any external-data file it reads,
  whatever the spelling (relative, ``..``, a symlink, a hard link);
- two outputs of one run never share a file;
- an output is a regular file or absent: a named pipe, a device, a socket or a folder is
  refused (writing "into" ``/dev/null`` would replace the device node when run as root);
- its name fits the file system (also with the ``.data`` suffix of an external-data sidecar);
- its folder is writable; ``-o`` creates a missing folder (at save time, so a failed run
  leaves none), ``--report`` needs an existing one;
- dump files are only ever created: a name that exists already is refused up front.

``-o DIR/`` (a trailing slash) or an existing folder means ``DIR/<input file name>``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from graphc.core.errors import SaveError

DATA_SUFFIX = ".data"  # external data sidecar: <model name>.data beside the model
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (fifo)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file (symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise SaveError(f"cannot inspect the output path: {e.strerror or e}", path=path) from None
    return next((what for test, what in _KINDS if test(mode)), None)


def name_max(folder: Path) -> int:
    """Longest file name the folder's file system takes (255 on common ones)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: samefile when both exist, else resolved equality."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def resolve_output(output: str | os.PathLike, src: Path | None) -> Path:
    """``-o`` as given, or ``DIR/<input name>`` when it ends in a slash or names a folder."""
    text = os.fspath(output)
    path = Path(text)
    try:
        is_dir = path.is_dir()
    except OSError:  # a name too long: check_target says so in its words
        is_dir = False
    if text.endswith(("/", os.sep)) or is_dir:
        if src is None:
            raise SaveError("output path is a folder; name the file to write", path=output)
        return path / src.name
    return path


def _existing_ancestor(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_target(
    path: Path,
    *,
    what: str = "output",
    forbid: Iterable[Path] = (),
    create_folder: bool = True,
    name_extra: int = 0,
    must_be_new: bool = False,
    shown: Path | None = None,
) -> None:
    """One file a run will write: SaveError (one line, naming it) if it must not be written.

    ``name_extra``: bytes a sidecar appends to the name; ``must_be_new``: refuse an existing
    file (dump files); ``shown``: the path the message names (default ``path``)."""
    try:
        _check_target(path, what, forbid, create_folder, name_extra, must_be_new)
    except SaveError as e:
        if shown is None:
            raise
        raise SaveError(e.message, path=shown) from None


def _check_target(path, what, forbid, create_folder, name_extra, must_be_new) -> None:
    limit = name_max(path.parent)
    size = len(os.fsencode(path.name))
    if size > limit or (name_extra and size + name_extra > limit):
        extra = f" (with the {DATA_SUFFIX!r} sidecar suffix, {size + name_extra})" if size <= limit else ""
        raise SaveError(f"{what} file name is {size} bytes{extra}; the file system takes at most {limit}", path=path)
    kind = special_kind(path)
    if kind is not None:
        raise SaveError(f"{what} path is {kind}, not a regular file; refused", path=path)
    for other in forbid:
        if same_file(path, Path(other)):
            raise SaveError(f"{what} would overwrite the input {os.fspath(other)!r}; choose another path", path=path)
    if must_be_new and (path.exists() or path.is_symlink()):
        raise SaveError(f"{what} file exists already; graphc only creates new files there", path=path)
    folder = path.parent
    if not folder.is_dir():
        if not create_folder:
            raise SaveError(f"{what} folder does not exist", path=path)
        base = _existing_ancestor(path)
        if not base.is_dir():
            raise SaveError(f"{what} folder cannot be created: {os.fspath(base)!r} is not a folder", path=path)
        folder = base
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SaveError(f"{what} folder is not writable", path=path)


def data_sidecar(path: Path) -> Path:
    return path.parent / (path.name + DATA_SUFFIX)


@dataclass(frozen=True)
class OutputPlan:
    """The checked outputs of one run."""

    output: Path | None
    report: Path | None
    forbid: tuple[Path, ...]  # input files: never written


def plan_outputs(
    inputs: Sequence[Path],
    output: str | os.PathLike | None,
    *,
    src: Path | None = None,
    report: str | os.PathLike | None = None,
    dump_files: Sequence[Path] = (),
    external_data: bool = False,
) -> OutputPlan:
    """Check every output of a run against the inputs and each other (before any work).

    ``inputs``: every file the run reads (models and their external data); ``src``: the
    model file ``-o DIR/`` takes its name from; ``dump_files``: the files ``--dump-dir``
    may create (model and sidecar per step). The ``.data`` sidecar of ``-o`` is checked
    whenever it exists (a fifo there is refused even if this save ends up single-file)
    and, when ``external_data``, like the model file."""
    forbid = tuple(Path(p) for p in inputs)
    out = resolve_output(output, src) if output is not None else None
    claimed: list[tuple[Path, str]] = []

    def claim(path: Path, what: str) -> None:
        for other, other_what in claimed:
            if same_file(path, other):
                raise SaveError(f"{what} and {other_what} would be the same file; give them different paths", path=path)
        claimed.append((path, what))

    if out is not None:
        check_target(out, forbid=forbid, name_extra=len(DATA_SUFFIX))
        claim(out, "output")
        sidecar = data_sidecar(out)
        if external_data or sidecar.exists() or sidecar.is_symlink():
            check_target(sidecar, what=f"its external data file {sidecar.name!r}", forbid=forbid, shown=out)
        claim(sidecar, "output's external data")
    for path in dump_files:
        check_target(path, what="dump", forbid=forbid, must_be_new=True)
        claim(path, "dump file")
    rep = Path(report) if report is not None else None
    if rep is not None:
        check_target(rep, what="report", forbid=forbid, create_folder=False)
        claim(rep, "report")
    return OutputPlan(out, rep, forbid)


def dump_files(directory: str | os.PathLike, pass_names: Sequence[str]) -> list[Path]:
    """The files ``--dump-dir`` may create for these (enabled) passes, in order: model and
    external-data sidecar per step (graphc.checks.instruments.DumpIR names them the same way)."""
    import re

    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise SaveError("--dump-dir exists and is not a directory", path=folder)
    files = []
    for step, name in enumerate(pass_names, start=1):
        path = folder / f"{step:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.onnx"
        files += [path, data_sidecar(path)]
    return files


def plan_compress(
    src: Path | None,
    output: str | os.PathLike | None,
    *,
    report: str | os.PathLike | None = None,
    dump_dir: str | os.PathLike | None = None,
    pass_names: Sequence[str] = (),
    input_bytes: int = 0,
) -> OutputPlan:
    """:func:`plan_outputs` for a compress run: the input's files are ``src`` and its
    external data; ``pass_names``: the enabled passes (for dump file names)."""
    from graphc.core import io

    inputs = io.model_files(src) if src is not None else []
    dumps = dump_files(dump_dir, pass_names) if dump_dir is not None else []
    return plan_outputs(inputs, output, src=src, report=report, dump_files=dumps,
                        external_data=input_bytes > io.INLINE_LIMIT)

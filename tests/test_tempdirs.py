"""Temporary folders left by a killed run are removed by the next run; nothing else is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import graphc
from graphc.core import tempdirs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process start times are read from /proc")

_KILLED = """
import os, signal, sys, tempfile
tempfile.tempdir = sys.argv[1]
from graphc.core import tempdirs
made = tempdirs.folder(sys.argv[2])
open(os.path.join(made.name, "0.npy"), "wb").write(b"x" * 100_000)
print(made.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would: no cleanup runs
"""


def _killed_run_folder(root: Path, prefix: str = "graphc-moments-") -> Path:
    done = subprocess.run([sys.executable, "-c", _KILLED, str(root), prefix], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL
    folder = Path(done.stdout.strip())
    assert folder.is_dir() and (folder / tempdirs.OWNER).exists()
    return folder


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_killed_runs_folder_is_swept_and_counted(temp_root):
    folder = _killed_run_folder(temp_root)
    assert tempdirs.orphaned(folder)
    swept = tempdirs.sweep()
    assert not folder.exists()
    assert swept.folders == 1 and swept.bytes >= 100_000
    assert "removed 1 temporary folder (0.00 GB)" in str(swept)


def test_folders_of_live_processes_other_hosts_and_unmarked_ones_stay(temp_root):
    mine = tempdirs.folder("graphc-moments-")  # this process: running
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = temp_root / "graphc-weights-live"
        live.mkdir()
        (live / tempdirs.OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid,
                                                       "start": tempdirs._start_time(sleeper.pid)}))
        elsewhere = _killed_run_folder(temp_root)
        owner = json.loads((elsewhere / tempdirs.OWNER).read_text())
        (elsewhere / tempdirs.OWNER).write_text(json.dumps({**owner, "host": "another-host"}))
        unmarked = temp_root / "graphc-moments-old"  # from a version that wrote no owner file
        unmarked.mkdir()
        other_name = _killed_run_folder(temp_root, prefix="mine-")  # not a graphc folder name
        assert tempdirs.sweep().folders == 0
        for path in (Path(mine.name), live, elsewhere, unmarked, other_name):
            assert path.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
        mine.cleanup()


def test_a_reused_process_id_does_not_keep_a_folder(temp_root):
    """The owner's id now names another process (started later): the folder is orphaned."""
    folder = _killed_run_folder(temp_root)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = json.loads((folder / tempdirs.OWNER).read_text())
        (folder / tempdirs.OWNER).write_text(json.dumps({**owner, "pid": sleeper.pid, "start": "1"}))
        assert tempdirs.orphaned(folder)
        assert tempdirs.sweep().folders == 1 and not folder.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_compress_removes_what_a_killed_run_left_and_says_so(temp_root, tiny_path, tmp_path):
    moments = _killed_run_folder(temp_root, "graphc-moments-")
    weights = _killed_run_folder(temp_root, "graphc-weights-")
    out = tmp_path / "out"
    out.mkdir()
    save = _killed_run_folder(out, tempdirs.SAVE_PREFIX)  # a save interrupted beside its output
    result = graphc.compress(tiny_path, out / "q.onnx", recipe="int8")
    assert not moments.exists() and not weights.exists() and not save.exists()
    assert any("removed 3 temporary folders" in n and "killed" in n for n in result.notices)
    assert sorted(p.name for p in out.iterdir()) == ["q.onnx"]
    again = graphc.compress(tiny_path, out / "q2.onnx", recipe="int8")
    assert not any("temporary folder" in n for n in again.notices)


def test_the_folders_graphc_makes_are_marked(temp_root):
    from graphc.core.moments import SpillFolder
    from graphc.core.scratch import ScratchStore
    from graphc.core.streaming import ActivationCache
    import numpy as np

    spill, store = SpillFolder(), ScratchStore(min_bytes=0)
    cache = ActivationCache(1, max_bytes=0)
    cache.put(0, "x", np.ones(4, np.float32))
    made = sorted(p.name.rsplit("-", 1)[0] for p in temp_root.iterdir())
    assert made == ["graphc-activations", "graphc-moments", "graphc-weights"]
    for p in temp_root.iterdir():
        assert json.loads((p / tempdirs.OWNER).read_text())["pid"] == os.getpid()
    assert tempdirs.sweep().folders == 0
    del spill, store, cache


# ---------------------------------------------------------------------------- disk space
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    write_synthetic_llama(path, PRESETS["tiny"])
    return path


def test_a_streamed_calibration_that_cannot_fit_on_disk_stops_before_the_sweep(tiny_llama, tmp_path, monkeypatch, capsys):
    """The spilled sums of a streamed model are counted before the sweep (K x K float64 per
    value, and the probes' snapshot): too few free bytes → one line naming the folder, exit 1,
    no output, no temporary folder left."""
    import shutil
    from collections import namedtuple

    from graphc.front.cli import main

    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: usage(10**9, 10**9 - 1000, 1000) if str(p) == str(root) else real(p))
    out = tmp_path / "q.onnx"
    code = main(["compress", str(tiny_llama), "-o", str(out), "--recipe", "int4", "--stream", "always", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not out.exists()
    assert len(err) == 1 and str(root) in err[0]
    assert "the calibration sums of this streamed model need about" in err[0] and "TMPDIR" in err[0]
    assert "Traceback" not in err[0]
    assert list(root.iterdir()) == []


def test_a_disk_that_fills_up_while_spilling_gives_one_line(tmp_path, monkeypatch):
    import errno

    from graphc.core.errors import DiskSpaceError
    from graphc.core.moments import SpillFolder
    import numpy as np

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = SpillFolder()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(DiskSpaceError) as e:
        folder.keep(np.ones((4, 4)))
    assert "disk filled up while writing calibration sums" in str(e.value) and "graphc-moments-" in str(e.value)
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # other errors are not disguised as a full disk
        folder.keep(np.ones((4, 4)))

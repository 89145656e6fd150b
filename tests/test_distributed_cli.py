"""``graphc compress --workers N`` / ``--ray ADDRESS`` as a user runs them (subprocesses: each
starts, or fails to reach, its own Ray), and that a run without them never imports Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from tests.conftest import deep_mlp


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deep-cli") / "deep.onnx"
    onnx.save(deep_mlp(), path)
    return path


def _graphc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphc.front.cli", *args], capture_output=True, text=True, timeout=timeout)


COMMON = ["--recipe", "int4", "--force", "--no-validate"]


@pytest.fixture(scope="module")
def single(deep, tmp_path_factory) -> tuple[Path, str]:
    """A run without --workers/--ray, in a fresh interpreter: its output, and whether it imported Ray."""
    out = tmp_path_factory.mktemp("single") / "one.onnx"
    code = ("import sys, graphc, graphc.front.cli\n"
            f"rc = graphc.front.cli.main(['compress', {str(deep)!r}, '-o', {str(out)!r}, *{COMMON!r}])\n"
            "assert rc == 0, rc\n"
            "print('RAY', 'ray' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-500:]
    return out, run.stdout


def test_a_run_without_workers_never_imports_ray(single):
    out, stdout = single
    assert "RAY False" in stdout and out.exists()


def test_workers_write_the_same_bytes_and_report_probe_progress(deep, single, tmp_path):
    pytest.importorskip("ray", reason="Ray is the distributed extra (make install installs it)")
    two = _graphc("--json", "compress", str(deep), *COMMON, "-o", str(tmp_path / "two.onnx"), "--workers", "2",
                  "--progress")
    assert two.returncode == 0, two.stderr
    assert single[0].read_bytes() == (tmp_path / "two.onnx").read_bytes()
    events = [json.loads(line) for line in two.stderr.splitlines()]  # every stderr line is an event: no Ray noise
    mine = [e for e in events if e["event"] == "progress" and e["name"] == "mixed-precision"]
    probes = [e for e in mine if e["what"] != "calibration sweep"]  # its Hessians' sweep reports first
    assert probes and all(e["what"] == "probes on 2 workers" for e in probes)
    assert mine.index(probes[0]) > 0 and mine[0]["what"] == "calibration sweep"
    assert probes[-1]["done"] == probes[-1]["total"] == 7 and probes[-1]["eta_s"] == 0.0
    assert json.loads(two.stdout)["written"] == [str(tmp_path / "two.onnx")]


@pytest.mark.parametrize("address, match", [
    ("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1"),
    ("not-an-address", "expected auto, HOST:PORT or ray://HOST:PORT"),
])
def test_unreachable_cluster_fails_in_one_line_before_any_work(deep, tmp_path, address, match):
    pytest.importorskip("ray", reason="Ray is the distributed extra (make install installs it)")
    start = time.monotonic()
    out = _graphc("compress", str(deep), "-o", str(tmp_path / "o.onnx"), "--recipe", "int4", "--ray", address,
                  "--progress", timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and match in out.stderr and "Traceback" not in out.stderr
    assert "nothing was done" in out.stderr or "expected" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    assert time.monotonic() - start < 30


def test_native_lines_while_ray_connects_do_not_reach_the_terminal():
    """Ray's C++ client logs a line a second while it retries an address that accepts TCP but
    does not answer as Ray (seen through a proxy): graphc hides file descriptor 2 around
    ``ray.init`` and keeps its own one-line error."""
    code = ("import os, sys\n"
            "from graphc.core.ray_executor import _native_stderr_hidden\n"
            "with _native_stderr_hidden():\n"
            "    os.write(2, b'native noise\\n'); print('python noise', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "after\n", out.stderr


def test_workers_and_ray_are_exclusive_flags(deep, tmp_path):
    out = _graphc("compress", str(deep), "-o", str(tmp_path / "o.onnx"), "--workers", "2", "--ray", "auto")
    assert out.returncode == 2 and "not allowed with" in out.stderr
    out = _graphc("compress", str(deep), "-o", str(tmp_path / "o.onnx"), "--workers", "0")
    assert out.returncode == 2 and "positive" in out.stderr

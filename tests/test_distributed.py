"""The executor seam (graphc.core.executor) and mixed-precision's probes on a real local Ray instance.

Ray starts once for this module (2 CPUs, no dashboard) and is shut down at its end; the CLI
(``--workers``/``--ray``, its own Ray instance in a subprocess) is in test_distributed_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphc
from graphc.core.errors import DistributedError, GraphcError, MissingDependencyError, UnsupportedError
from graphc.core.executor import LocalExecutor, make_executor
from tests.conftest import deep_mlp


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deep") / "deep.onnx"
    onnx.save(deep_mlp(), path)
    return path


def _compress(path: Path, out: Path, **kw):
    return graphc.compress(path, out, recipe="int4", force=True, validate=False, attribution=False, **kw)


def _sensitivities(result) -> list:
    (mp,) = [r for r in result.passes if r.name == "mixed-precision"]
    return mp.stats["sensitivities"]


class Capture:
    """An executor that keeps the raw results of every measuring map of the executor it wraps
    (``calls``: the work function of every map, quantization's included)."""

    def __init__(self, inner):
        self.inner, self.results, self.calls = inner, [], []
        self.threads_per_item, self.workers = inner.threads_per_item, inner.workers
        self.single_node = inner.single_node

    def map(self, fn, items, **kw):
        out = self.inner.map(fn, items, **kw)
        self.calls.append(fn.__name__)
        if fn.__name__ != "quantize_job":  # codes: compared through the written bytes
            self.results.append(out)
        return out

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def local_run(deep, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.onnx"
    capture = Capture(LocalExecutor())
    return out, _compress(deep, out, executor=capture), capture.results


# ------------------------------------------------------------------ without Ray


def test_local_executor_keeps_order_and_reports_each_result():
    seen = []
    out = LocalExecutor().map(lambda shared, x: shared * x, [3, 1, 2], shared=10, on_result=lambda i, r: seen.append((i, r)))
    assert out == [30, 10, 20] and seen == [(0, 30), (1, 10), (2, 20)]


def test_streamed_probe_chunks_keep_the_kl_to_a_workers_share_of_the_cores(tmp_path):
    """A streamed model's probe chunks on workers of one core each (here run in this process by an
    executor that says so): their KL keeps to that core too, as their ONNX Runtime does."""
    from graphc.core import streaming
    from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama
    from graphc.passes import _sensitivity as sens

    class OneCoreWorkers(LocalExecutor):
        threads_per_item = 1

        @property
        def workers(self) -> int:
            return 2

    model = tmp_path / "tiny.onnx"
    write_synthetic_llama(model, PRESETS["tiny"])
    try:
        with streaming.streaming("always", segment_bytes=40_000):
            result = _compress(model, tmp_path / "o.onnx", executor=OneCoreWorkers())
        (mp,) = [r for r in result.passes if r.name == "mixed-precision"]
        assert mp.stats["probe_streamed"] == 1 and mp.stats["probe_workers"] == 2
        assert sens.KL_THREADS == 1
    finally:
        sens.KL_THREADS = None


def test_make_executor_without_workers_is_none_and_refuses_bad_requests():
    assert make_executor() is None
    with pytest.raises(UnsupportedError, match="positive"):
        make_executor(workers=0)
    with pytest.raises(UnsupportedError, match="exclusive"):
        make_executor(workers=2, ray="auto")


def test_a_recipe_without_distributed_work_says_the_workers_do_nothing(deep, tmp_path):
    result = graphc.compress(deep, tmp_path / "o.onnx", recipe="int8", validate=False, executor=LocalExecutor())
    assert "--workers/--ray: no pass of recipe 'int8' sends work to workers" in result.notices
    result = _compress(deep, tmp_path / "o4.onnx", executor=LocalExecutor())
    assert not any("--workers" in n for n in result.notices)


def test_missing_ray_is_one_line_naming_the_extra(deep, tmp_path, monkeypatch, capsys):
    from graphc.front.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install graphc\[distributed\]"):
        _compress(deep, tmp_path / "api.onnx", workers=2)
    out = tmp_path / "cli.onnx"
    assert main(["compress", str(deep), "-o", str(out), "--recipe", "int4", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install graphc[distributed]" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "api.onnx").exists()


# ------------------------------------------------------------------ on Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is the distributed extra (make install installs it)")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_map_returns_input_order_and_reads_shared_from_the_object_store(ray_cluster, monkeypatch, tmp_path):
    from graphc.core.ray_executor import RayExecutor

    puts = []
    real_put = ray_cluster.put
    monkeypatch.setattr(ray_cluster, "put", lambda obj, **kw: puts.append(obj) or real_put(obj, **kw))

    marker = tmp_path / "another-item-reported"

    def work(shared, item):  # item 0 waits until another item's result has been reported (not a timed race:
        # on a loaded machine a sleep-based order came out in input order)
        if item == 0:
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return item, float(shared[item]), shared.flags.writeable

    def on_result(i, r):
        arrived.append(i)
        if i != 0:
            marker.touch()

    shared = np.arange(1 << 20, dtype=np.float32)  # 4 MB
    arrived = []
    out = RayExecutor().map(work, [0, 1, 2, 3], shared=shared, on_result=on_result)
    assert [r[:2] for r in out] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert sorted(arrived) == [0, 1, 2, 3] and arrived[0] != 0  # arrival order, results in input order
    assert len(puts) == 1  # one put for four tasks
    assert not any(r[2] for r in out)  # read-only: mapped from the object store, not unpickled per task


class _CrashOnce:
    """A RayExecutor whose work exits its worker process (os._exit) the first time any item
    runs: Ray must retry that task on a new worker."""

    def __init__(self, marker: Path):
        from graphc.core.ray_executor import RayExecutor

        self.inner, self.marker = RayExecutor(), str(marker)
        self.threads_per_item, self.workers = self.inner.threads_per_item, self.inner.workers
        self.single_node = self.inner.single_node

    def map(self, fn, items, **kw):
        marker = self.marker

        def crash_first(shared, item):
            import os

            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return fn(shared, item)

        return self.inner.map(crash_first, items, **kw)

    def close(self):
        self.inner.close()


def test_probes_on_workers_give_the_same_bytes_even_when_a_worker_dies(ray_cluster, deep, local_run, tmp_path):
    local_out, local, local_results = local_run
    marker = tmp_path / "crashed"
    events = []
    capture = Capture(_CrashOnce(marker))
    result = _compress(deep, tmp_path / "ray.onnx", executor=capture,
                       progress=lambda what, done, total: events.append((what, done, total)))
    assert marker.exists()  # a worker really died mid-run
    assert (tmp_path / "ray.onnx").read_bytes() == local_out.read_bytes()
    assert capture.results == local_results  # every measured float exactly (one ORT thread vs all)
    assert "quantize_job" in capture.calls  # quantize-nbits' GPTQ on the workers too (the same bytes above)
    (nbits,) = [r for r in result.passes if r.name == "quantize-nbits"]
    assert nbits.stats["workers"] == 2
    assert _sensitivities(result) == _sensitivities(local)
    (mp,) = [r for r in result.passes if r.name == "mixed-precision"]
    assert mp.stats["probe_cuts"] >= 3  # the probes started at their layers' cuts, in the workers too
    probes = [e for e in events if e[0].startswith("probes on 2 workers")]
    assert probes[0][1] == 0 and probes[-1][1:] == (7, 7) and [d for _, d, _ in probes] == sorted(d for _, d, _ in probes)


def test_cli_ray_address_runs_on_a_running_cluster_and_leaves_it_running(ray_cluster, deep, local_run, tmp_path):
    """``--ray HOST:PORT`` of the cluster this test process started: the subprocess connects,
    writes the same bytes, and only disconnects (the cluster still runs tasks afterwards)."""
    import subprocess

    address = ray_cluster.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "graphc.front.cli", "compress", str(deep), "-o", str(tmp_path / "o.onnx"),
                          "--recipe", "int4", "--force", "--no-validate", "--ray", address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert (tmp_path / "o.onnx").read_bytes() == local_run[0].read_bytes()
    assert ray_cluster.get(ray_cluster.remote(lambda: 42).remote()) == 42


@pytest.mark.parametrize("error, match", [
    (ValueError("boom"), r"probe of layer w3 failed on a Ray worker: ValueError: boom"),
    (MemoryError(), r"probe of layer w3: out of memory on a Ray worker"),
])
def test_a_failing_probe_is_one_line_naming_the_layer(ray_cluster, deep, tmp_path, error, match):
    from graphc.core.ray_executor import RayExecutor

    class FailOn(RayExecutor):
        def map(self, fn, items, **kw):
            def fail_w3(shared, item):
                if item.weight == "w3":
                    raise error
                return fn(shared, item)

            return super().map(fail_w3, items, **kw)

    with pytest.raises(DistributedError, match=match) as info:
        _compress(deep, tmp_path / "out.onnx", executor=FailOn())
    assert "\n" not in str(info.value) and str(info.value).startswith("pass mixed-precision: ")
    assert not (tmp_path / "out.onnx").exists()
    assert isinstance(info.value, GraphcError)


@pytest.mark.parametrize("kind, match", [
    ("OutOfMemoryError", r"^probe of layer w1: a Ray worker ran out of memory .*use fewer workers"),
    ("WorkerCrashedError", r"^probe of layer w1: its Ray worker process died on each of 4 attempts"),
])
def test_ray_failures_after_retries_are_one_line_naming_the_item(kind, match):
    ray = pytest.importorskip("ray", reason="Ray is the distributed extra (make install installs it)")
    from graphc.core.ray_executor import RayExecutor

    executor = RayExecutor.__new__(RayExecutor)  # only the mapping of Ray's errors, no cluster
    executor._ray, executor.max_retries = ray, 3
    cls = getattr(ray.exceptions, kind)
    error = executor._error(cls("task killed") if kind == "OutOfMemoryError" else cls(), "probe of layer w1")
    assert isinstance(error, DistributedError) and "\n" not in str(error)
    assert re.match(match, str(error)), str(error)


def test_planner_measurements_on_workers_give_the_same_plan_and_bytes(ray_cluster):
    """plan's action measurements (low rank, int8 and int4 of each layer, the table) through the
    Ray executor: every raw error, the decisions and the planned model's bytes as in this process."""
    import onnx_ir as ir

    from graphc.core.pass_base import PassContext
    from graphc.passes.plan_compression import PlanCompression
    from graphc.core.ray_executor import RayExecutor
    from graphc.checks.validate import synthesize_inputs

    runs = []
    for executor in (Capture(LocalExecutor()), Capture(RayExecutor())):
        model = ir.serde.deserialize_model(deep_mlp())
        ctx = PassContext(calibration=synthesize_inputs(model, count=6, seed=1), executor=executor)
        details = PlanCompression(PlanCompression.Options(max_error=0.02, int4=True), ctx)(model).stats.details["plan"]
        runs.append((executor.results, json.dumps(details["decisions"]),
                     ir.serde.serialize_model(model).SerializeToString()))
    assert len(runs[0][0]) == 1 and len(runs[0][0][0]) == 26  # one map of every action
    assert json.loads(runs[0][1])  # the plan took actions
    assert runs[0] == runs[1]


def test_streamed_probes_on_workers_give_the_same_bytes(ray_cluster, tmp_path, monkeypatch):
    """A model that streams: the reference runs once in the driver and its values at each cut go
    to a temporary folder; the probes starting in one segment are one Ray task (weights mapped
    from their files, Hessians read from .npy files). Every measured float, the plan and the
    written bytes are the one-process streamed run's; a worker dying mid-run is retried; the
    temporary folder is gone afterwards."""
    import tempfile

    from graphc.core import scratch, streaming
    from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama

    monkeypatch.setattr(scratch, "MIN_BYTES", 1024)  # awq's scaled projections in a temporary weights file
    model = tmp_path / "tiny.onnx"
    write_synthetic_llama(model, PRESETS["tiny"])
    folders = []
    real_tmp = tempfile.TemporaryDirectory

    def spy(*a, **kw):
        d = real_tmp(*a, **kw)
        if kw.get("prefix") == "graphc-probes-":
            folders.append(d.name)
        return d

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    runs = {}
    for name, executor in (("local", Capture(LocalExecutor())), ("ray", Capture(_CrashOnce(tmp_path / "crashed")))):
        events = []
        with streaming.streaming("always", segment_bytes=40_000):
            result = graphc.compress(model, tmp_path / f"{name}.onnx", recipe="int4", force=True, validate=False,
                                     attribution=False, executor=executor,
                                     progress=lambda what, done, total: events.append((what, done, total)))
        (mp,) = [r for r in result.passes if r.name == "mixed-precision"]
        runs[name] = (mp.stats, executor.results, events)
    assert (tmp_path / "crashed").exists()  # a worker really died
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()
    local, ray = runs["local"][0], runs["ray"][0]
    assert local["probe_streamed"] == ray["probe_streamed"] == 1
    assert local["probe_workers"] == 1 and ray["probe_workers"] == 2
    assert ray["sensitivities"] == local["sensitivities"] and ray["choices"] == local["choices"]
    chunks = [r for r in runs["ray"][1] if r and isinstance(r[0], list)]
    assert len(chunks) == 1 and len(chunks[0]) >= 3  # the probes went out as several chunks, one map
    probes = [e for e in runs["ray"][2] if e[0].startswith("probes (streamed) on 2 workers")]
    assert probes[0][1] == 0 and probes[-1][1] == probes[-1][2] > 0
    assert folders and not any(os.path.exists(f) for f in folders)

"""Shared fixtures: tiny models built with onnx.helper, saved under tmp_path.

The tiny model is ``ids -> Gather(emb) -> MatMul(w) -> Add(b) -> out``: float weights,
an int64 input with symbolic dims, small enough that every command runs in well under a
second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN = 16, 8
GRAPHC_BIN = Path(sys.executable).with_name("graphc")


def tiny_model_proto(
    *, seed: int = 0, opset: int = 17, vocab: int = VOCAB, hidden: int = HIDDEN
) -> onnx.ModelProto:
    """A valid float MatMul+Add+Gather model."""
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((hidden,)).astype(np.float32), "b")
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"], name="gather"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
        helper.make_node("Add", ["y", "b"], ["out"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [emb, w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def deep_mlp(layers: int = 6, vocab: int = 256, hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(emb) -> layers x (x + tanh(x @ W_i)): one table and ``layers`` MatMuls for
    mixed-precision to probe, each more sensitive than the last."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h0"], name="embed")]
    for i in range(layers):
        w = rng.standard_normal((hidden, hidden)) / np.sqrt(hidden) * (1 + i)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"], name=f"layer{i}.matmul"),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"layer{i}.tanh"),
                  helper.make_node("Add", [f"t{i}", f"h{i}"], [f"h{i + 1}"], name=f"layer{i}.add")]
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["out"]))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Save with every initializer in one external file (default ``<name>.data``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or path.name + ".data",
        size_threshold=0,
    )
    return path


def set_external_info(path: Path, fn: Callable[[onnx.TensorProto, dict[str, str]], None]) -> None:
    """Rewrite the external_data entries of every external tensor of a saved model in place:
    ``fn(tensor, info)`` edits the key/value dict, which is written back."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        fn(tensor, info)
        del tensor.external_data[:]
        for key, value in info.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, path)


class Snapshot:
    """Bytes and mtimes of every file under the given paths (folders recursively)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.state = self._take()

    def _take(self) -> dict[str, tuple[bytes, int] | str]:
        state: dict[str, tuple[bytes, int] | str] = {}
        for root in self.paths:
            candidates = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
            for p in candidates:
                if p.is_symlink():
                    state[str(p)] = "link -> " + os.readlink(p)
                elif p.is_file():
                    state[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
                elif p.is_dir():
                    state[str(p)] = "dir"
                else:
                    state[str(p)] = "absent"
        return state

    def assert_unchanged(self) -> None:
        assert self._take() == self.state


def temp_leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".graphc-tmp-*"))


@pytest.fixture
def tiny_proto() -> onnx.ModelProto:
    return tiny_model_proto()


@pytest.fixture
def tiny_path(tmp_path: Path, tiny_proto: onnx.ModelProto) -> Path:
    """The tiny model as a single .onnx file."""
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_proto, path)
    return path


@pytest.fixture
def external_path(tmp_path: Path, tiny_proto: onnx.ModelProto) -> Path:
    """The tiny model in its own folder, weights in ``model.onnx.data`` beside it."""
    return save_external(tiny_proto, tmp_path / "ext" / "model.onnx")


def _shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this test run sees (the parent of their base temps)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _tiny_export_cache(tmp_path_factory) -> None:
    """graphc.models.fixtures.export_tiny exports each distinct tiny model once per test run and
    copies it for every later caller (tests/test_exporter.py, which tests exporting, opts out)."""
    from graphc.models.fixtures import CACHE_ENV

    os.environ.setdefault(CACHE_ENV, str(_shared_root(tmp_path_factory) / "tiny-exports"))


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2 through ``graphc export minilm``, once per test run: the xdist
    workers share it (one exports under a file lock, the others wait). Tests only read it."""
    pytest.importorskip("transformers")
    from filelock import FileLock

    from graphc.front.cli import main

    root = _shared_root(tmp_path_factory)
    path = root / "shared-minilm" / "minilm.onnx"
    with FileLock(str(root / "shared-minilm.lock")):
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            assert main(["export", "minilm", "-o", str(path)]) == 0
    return path

"""Bad inputs: each gets a one-line error naming the file and the problem, a non-zero exit,
no traceback, no output or temp files left behind, and the input untouched."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import (
    GRAPHC_BIN,
    Snapshot,
    save_external,
    set_external_info,
    temp_leftovers,
    tiny_model_proto,
)
from graphc.core import io
from graphc.front.cli import main
from graphc.core.errors import ExternalDataError, GraphcError, InvalidModelError, ModelLoadError, SaveError

# --------------------------------------------------------------------------- bad inputs
# Each builder writes a bad input under the folder it is given and returns its path and
# a fragment the error message must contain.

Case = Callable[[Path], tuple[Path, str]]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _model(d: Path, edit: Callable[[onnx.ModelProto], None], name: str = "bad.onnx") -> Path:
    model = tiny_model_proto()
    edit(model)
    return _write(d / name, model.SerializeToString())


def empty(d):
    return _write(d / "empty.onnx", b""), "empty file"


def random_bytes(d):
    return _write(d / "random.onnx", np.random.default_rng(1).bytes(1000)), "not an ONNX model"


def truncated(d):
    data = tiny_model_proto().SerializeToString()
    return _write(d / "truncated.onnx", data[: len(data) // 2]), "protobuf cannot parse"


def tensor_proto(d):
    tensor = numpy_helper.from_array(np.ones((3, 3), np.float32), "t")
    return _write(d / "tensor.onnx", tensor.SerializeToString()), "not an ONNX model"


def graph_proto(d):
    return _write(d / "graph.onnx", tiny_model_proto().graph.SerializeToString()), "not an ONNX model"


def model_without_graph(d):
    return _model(d, lambda m: m.ClearField("graph")), "no graph"


def unknown_op(d):
    def edit(m):
        m.graph.node[2].op_type = "Frobnicate"

    return _model(d, edit), "unknown op 'Frobnicate'"


def unknown_domain(d):
    def edit(m):
        m.graph.node[2].domain = "com.example"  # no opset import declares it

    return _model(d, edit), "domain 'com.example', which the model declares no opset import for"


def cycle(d):
    def edit(m):  # matmul reads relu's output, relu reads matmul's
        m.graph.node[1].input[0] = "r"
        m.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))

    return _model(d, edit), "graph has a cycle through node"


def dangling_input(d):
    def edit(m):
        m.graph.node[1].input[0] = "nowhere"

    return _model(d, edit), "reads 'nowhere', which nothing produces"


def duplicate_graph_outputs(d):
    def edit(m):
        m.graph.output.append(m.graph.output[0])

    return _model(d, edit), "duplicate graph output name 'out'"


def duplicate_node_outputs(d):
    def edit(m):  # gather and matmul both produce "y"
        m.graph.node[0].output[0] = "y"
        m.graph.node[1].input[0] = "y"

    return _model(d, edit), "'y' is produced by node 'matmul' and by another node"


def raw_data_too_short(d):
    def edit(m):
        m.graph.initializer[1].raw_data = m.graph.initializer[1].raw_data[:-4]

    return _model(d, edit), "'w' declares shape [8, 8] (256 bytes) but holds 252 bytes"


def raw_data_too_long(d):
    def edit(m):
        m.graph.initializer[1].raw_data += b"\0" * 4

    return _model(d, edit), "but holds 260 bytes"


def _external(d: Path, location: str | None = None) -> Path:
    return save_external(tiny_model_proto(), d / "model" / "model.onnx", location)


def external_missing(d):
    path = _external(d)
    (path.parent / "model.onnx.data").unlink()
    return path, "external data file 'model.onnx.data' is missing"


def _relocate(path: Path, location: str) -> None:
    set_external_info(path, lambda t, info: info.update(location=location))


def external_dotdot(d):
    path = _external(d)
    os.replace(path.parent / "model.onnx.data", d / "outside.data")
    _relocate(path, "../outside.data")
    return path, "'../outside.data' resolves outside the model's folder"


def external_absolute(d):
    path = _external(d)
    os.replace(path.parent / "model.onnx.data", d / "outside.data")
    _relocate(path, str((d / "outside.data").resolve()))
    return path, "resolves outside the model's folder"


def external_symlink_out(d):
    path = _external(d)
    data = path.parent / "model.onnx.data"
    os.replace(data, d / "outside.data")
    data.symlink_to((d / "outside.data").resolve())
    return path, "resolves outside the model's folder through a symlink"


def external_length_mismatch(d):
    path = _external(d)

    def edit(t, info):
        if t.name == "w":
            info["length"] = str(int(info["length"]) - 4)

    set_external_info(path, edit)
    return path, "'w' declares shape [8, 8] (256 bytes) but its external data holds 252 bytes"


def external_truncated(d):
    path = _external(d)
    with open(path.parent / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    return path, "is truncated"


def directory(d):
    path = d / "folder.onnx"
    path.mkdir(parents=True)
    return path, "is a directory"


def missing(d):
    d.mkdir(parents=True, exist_ok=True)
    return d / "missing.onnx", "no such file"


CASES: dict[str, Case] = {
    f.__name__: f
    for f in (
        empty, random_bytes, truncated, tensor_proto, graph_proto, model_without_graph,
        unknown_op, unknown_domain, cycle, dangling_input, duplicate_graph_outputs,
        duplicate_node_outputs, raw_data_too_short, raw_data_too_long, external_missing,
        external_dotdot, external_absolute, external_symlink_out, external_length_mismatch,
        external_truncated, directory, missing,
    )
}


def _assert_one_line_error(err: str, path: Path, fragment: str) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"graphc: error: {path}: "), err
    assert fragment in lines[0], err


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("command", ["compress", "inspect", "validate", "validate-second", "inspect-diff"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_cli(case, command, tmp_path, tiny_path, capsys):
    bad, fragment = CASES[case](tmp_path / "in")
    out = tmp_path / "out" / "result.onnx"
    out.parent.mkdir()
    argv = {
        "compress": ["compress", str(bad), "-o", str(out)],
        "inspect": ["inspect", str(bad)],
        "inspect-diff": ["inspect", str(tiny_path), "--diff", str(bad)],
        "validate": ["validate", str(bad), str(tiny_path)],
        "validate-second": ["validate", str(tiny_path), str(bad)],
    }[command]
    before = Snapshot(tmp_path)

    code = main(argv)

    captured = capsys.readouterr()
    assert code != 0
    assert captured.out == ""
    _assert_one_line_error(captured.err, bad, fragment)
    assert not out.exists()
    assert temp_leftovers(tmp_path) == []
    before.assert_unchanged()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_api_raises_typed_error(case, tmp_path):
    from graphc.front.api import compress

    bad, fragment = CASES[case](tmp_path)
    before = Snapshot(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        compress(bad, tmp_path / "out.onnx")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{bad}: ")
    assert not (tmp_path / "out.onnx").exists()
    before.assert_unchanged()


def test_error_classes(tmp_path):
    """External-data problems are ExternalDataError, graph problems InvalidModelError."""
    with pytest.raises(ExternalDataError):
        io.load_model(external_dotdot(tmp_path / "a")[0])
    with pytest.raises(ExternalDataError):
        io.load_model(external_missing(tmp_path / "b")[0])
    with pytest.raises(InvalidModelError):
        io.load_model(cycle(tmp_path / "c")[0])
    with pytest.raises(ModelLoadError):
        io.load_model(random_bytes(tmp_path / "d")[0])


# --------------------------------------------------------------------------- real process


@pytest.mark.parametrize("case", ["random_bytes", "cycle", "external_symlink_out", "missing"])
def test_bad_input_subprocess_no_traceback(case, tmp_path):
    bad, fragment = CASES[case](tmp_path / "in")
    out = tmp_path / "result.onnx"
    before = Snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GRAPHC_DEBUG"}
    proc = subprocess.run(
        [str(GRAPHC_BIN), "compress", str(bad), "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    _assert_one_line_error(proc.stderr, bad, fragment)
    assert not out.exists() and temp_leftovers(tmp_path) == []
    before.assert_unchanged()


# --------------------------------------------------------------------------- -o vs the input


def _compress(argv: list[str], capsys) -> tuple[int, str]:
    code = main(["compress", *argv, "--recipe", "cleanup"])
    captured = capsys.readouterr()
    return code, captured.err


def test_output_equal_to_input_is_refused(tiny_path, tmp_path, capsys):
    before = Snapshot(tmp_path)
    code, err = _compress([str(tiny_path), "-o", str(tiny_path)], capsys)
    assert code == 1
    _assert_one_line_error(err, tiny_path, "would overwrite the input")
    before.assert_unchanged()
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "relative-spelling"])
def test_output_aliasing_input_is_refused(kind, tiny_path, tmp_path, capsys, monkeypatch):
    if kind == "symlink":
        out = tmp_path / "link.onnx"
        out.symlink_to(tiny_path)
    elif kind == "hardlink":
        out = tmp_path / "hard.onnx"
        os.link(tiny_path, out)
    else:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "sub").mkdir()
        out = Path("sub/../tiny.onnx")
    before = Snapshot(tmp_path)
    code, err = _compress([str(tiny_path), "-o", str(out)], capsys)
    assert code == 1
    _assert_one_line_error(err, out, "would overwrite the input")
    before.assert_unchanged()
    assert temp_leftovers(tmp_path) == []


# Models with external data go through the API with validate=False: the CLI cannot compress
# them yet (see test_good_external_model_compresses_to_single_file).


def _compress_api(src: Path, out: Path) -> None:
    from graphc.front.api import compress

    compress(src, out, recipe="cleanup", validate=False)


def test_output_equal_to_input_data_file_is_refused(external_path):
    folder = external_path.parent
    before = Snapshot(folder)
    out = folder / "model.onnx.data"
    with pytest.raises(SaveError, match="would overwrite the input") as info:
        _compress_api(external_path, out)
    assert str(info.value).startswith(f"{out}: ")
    before.assert_unchanged()
    assert temp_leftovers(folder) == []


def test_output_data_file_would_be_input_data_file(tmp_path, monkeypatch):
    """Input model.onnx keeps its weights in out.onnx.data; writing out.onnx with external
    data would replace that file, so graphc refuses."""
    src = save_external(tiny_model_proto(), tmp_path / "model.onnx", location="out.onnx.data")
    monkeypatch.setattr(io, "INLINE_LIMIT", 0)  # force external data on save
    before = Snapshot(tmp_path)
    out = tmp_path / "out.onnx"
    with pytest.raises(SaveError, match="external data file 'out.onnx.data' would overwrite the input"):
        _compress_api(src, out)
    assert not out.exists()
    before.assert_unchanged()
    assert temp_leftovers(tmp_path) == []


def test_external_model_compresses_to_single_file_api(external_path, tmp_path):
    """A valid external-data model is accepted, and a single-file output holds the weights
    (not references into the input's folder)."""
    out = tmp_path / "elsewhere.onnx"
    _compress_api(external_path, out)
    proto = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in proto.graph.initializer)
    io.load_model(out)


def test_output_in_missing_folder_is_created(tiny_path, tmp_path, capsys):
    out = tmp_path / "nope" / "deeper" / "out.onnx"
    before = Snapshot(tiny_path)
    code, err = _compress([str(tiny_path), "-o", str(out)], capsys)
    assert code == 0, err
    assert out.is_file() and sorted(p.name for p in (tmp_path / "nope").rglob("*")) == ["deeper", "out.onnx"]
    before.assert_unchanged()


def test_output_subprocess_same_as_input(tiny_path, tmp_path):
    before = Snapshot(tmp_path)
    proc = subprocess.run(
        [str(GRAPHC_BIN), "compress", str(tiny_path), "-o", str(tiny_path), "--recipe", "cleanup"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    _assert_one_line_error(proc.stderr, tiny_path, "would overwrite the input")
    before.assert_unchanged()
    assert temp_leftovers(tmp_path) == []


def test_good_external_model_compresses_to_single_file(external_path, tmp_path, capsys):
    """The control case: a valid external-data model in its folder is accepted, and the
    single-file output holds the weights (not references into the input's folder)."""
    out = tmp_path / "elsewhere.onnx"
    code, err = _compress([str(external_path), "-o", str(out)], capsys)
    assert code == 0, err
    proto = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in proto.graph.initializer)
    io.load_model(out)


# --------------------------------------------------------------------------- fuzzing

# Tiny weights, so that most mutated bytes land in structure (names, types, shapes).
_GOOD = tiny_model_proto(vocab=2, hidden=2).SerializeToString()
# Where names and op types sit: overwriting inside them keeps the protobuf framing intact, so
# the file still parses and the mutation reaches the model checks (e.g. invalid UTF-8).
_NAMES = [m.span() for m in re.finditer(rb"[A-Za-z_][A-Za-z0-9_.]+", _GOOD)]


def _mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (kind, position, bytes) edits: 0 overwrites inside a name, 1 overwrites at any
    position, 2 deletes len(bytes) bytes, 3 inserts the bytes."""
    b = bytearray(data)
    for kind, pos, chunk in edits:
        if kind == 0:
            start, end = _NAMES[pos % len(_NAMES)]
            at = start + (pos // len(_NAMES)) % (end - start)
            b[at:at + len(chunk)] = chunk[: end - at]
            continue
        pos %= max(len(b), 1)
        if kind == 1:
            b[pos:pos + len(chunk)] = chunk
        elif kind == 2:
            del b[pos:pos + len(chunk)]
        else:
            b[pos:pos] = chunk
    return bytes(b)


_edit = st.tuples(
    st.sampled_from([0, 0, 0, 1, 1, 2, 3]),
    st.integers(0, 1 << 16),
    st.binary(min_size=1, max_size=3) | st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\x00", b"/"]),
)
_inputs = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.lists(_edit, min_size=1, max_size=4).map(lambda e: _mutate(_GOOD, e)),
)


@settings(
    derandomize=True, max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_inputs)
def test_fuzz_load_model_raises_only_graphc_errors(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.onnx"
    path.write_bytes(data)
    try:
        io.load_model(path)
    except GraphcError as e:
        assert isinstance(e, ModelLoadError)
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")

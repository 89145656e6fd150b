"""graphc.core.io: load checks, atomic save, external data, and the external-path guard."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphc.core import io
from graphc.core.errors import ExternalDataError, InvalidModelError, ModelLoadError, SaveError
from tests.conftest import Snapshot, save_external, set_external_info, temp_leftovers, tiny_model_proto


def _arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _assert_same_model(a: ir.Model, b: ir.Model) -> None:
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph]
    assert [v.name for v in a.graph.inputs] == [v.name for v in b.graph.inputs]
    assert [v.name for v in a.graph.outputs] == [v.name for v in b.graph.outputs]
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name])


def _save_proto(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# --------------------------------------------------------------------------- save / load


def test_round_trip(tiny_path, tmp_path):
    model = io.load_model(tiny_path)
    out = tmp_path / "copy.onnx"
    assert io.save_model(model, out) == [out]
    onnx.checker.check_model(str(out))
    _assert_same_model(model, io.load_model(out))
    assert temp_leftovers(tmp_path) == []


def test_save_replaces_existing_output(tiny_path, tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    io.save_model(io.load_model(tiny_path), out)
    assert out.read_bytes() != b"old"
    io.load_model(out)


def test_save_external_data(tiny_path, tmp_path):
    model = io.load_model(tiny_path)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "model.onnx"
    written = io.save_model(model, out, external_data=True)
    data = folder / "model.onnx.data"
    assert written == [out, data] and data.is_file()
    proto = onnx.load(out, load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external, "the big initializers go to the data file"
    for tensor in external:
        location = {e.key: e.value for e in tensor.external_data}["location"]
        assert location == "model.onnx.data"
        assert io.safe_external_path(folder, location) == data.resolve()
    reloaded = io.load_model(out)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in reloaded.graph.initializers.values())
    _assert_same_model(model, reloaded)
    assert io.model_files(out) == [out, data.resolve()]
    assert io.file_bytes(out) == out.stat().st_size + data.stat().st_size
    assert temp_leftovers(tmp_path) == []


def test_load_external_is_lazy_and_saves_into_one_file(external_path, tmp_path):
    """Loading keeps weights external; a single-file save elsewhere pulls them in, and the
    loaded model still refers to the input's data afterwards."""
    model = io.load_model(external_path)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    out = tmp_path / "single.onnx"
    io.save_model(model, out)
    proto = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in proto.graph.initializer)
    _assert_same_model(model, io.load_model(out))
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def test_failed_save_leaves_nothing(tiny_path, tmp_path, monkeypatch):
    model = io.load_model(tiny_path)
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    before = Snapshot(tmp_path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(ir, "save", boom)
    monkeypatch.setattr(io, "write_single_file", boom)
    for out, external in [(existing, False), (tmp_path / "new.onnx", False), (tmp_path / "ext.onnx", True)]:
        with pytest.raises(SaveError) as info:
            io.save_model(model, out, external_data=external)
        assert str(info.value) == f"{out}: could not serialize the model: disk on fire second line"
    assert temp_leftovers(tmp_path) == []
    before.assert_unchanged()


def test_failed_rename_leaves_no_temp(tiny_path, tmp_path, monkeypatch):
    model = io.load_model(tiny_path)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(SaveError, match="Permission denied"):
        io.save_model(model, tmp_path / "out.onnx")
    assert temp_leftovers(tmp_path) == [] and not (tmp_path / "out.onnx").exists()


def test_save_refuses_to_overwrite_forbidden(tiny_path, tmp_path):
    model = io.load_model(tiny_path)
    link = tmp_path / "link.onnx"
    link.symlink_to(tiny_path)
    hard = tmp_path / "hard.onnx"
    os.link(tiny_path, hard)
    before = Snapshot(tmp_path)
    for out in (tiny_path, link, hard):
        with pytest.raises(SaveError, match="would overwrite the input"):
            io.save_model(model, out, forbid=(tiny_path,))
    before.assert_unchanged()
    assert temp_leftovers(tmp_path) == []


def test_save_refuses_to_overwrite_input_data(tmp_path):
    src = save_external(tiny_model_proto(), tmp_path / "in.onnx", location="out.onnx.data")
    model = io.load_model(src)
    forbid = tuple(io.model_files(src))
    before = Snapshot(tmp_path)
    with pytest.raises(SaveError, match="external data file 'out.onnx.data' would overwrite"):
        io.save_model(model, tmp_path / "out.onnx", external_data=True, forbid=forbid)
    with pytest.raises(SaveError, match="would overwrite the input"):
        io.save_model(model, tmp_path / "out.onnx.data", forbid=forbid)
    # Without external data the same output name is fine: out.onnx.data is not written.
    io.save_model(model, tmp_path / "out.onnx", external_data=False, forbid=forbid)
    assert (tmp_path / "out.onnx.data").read_bytes() == before.state[str(tmp_path / "out.onnx.data")][0]


def test_check_output_path(tmp_path):
    # a missing folder is created by the save (graphc.core.outputs), not refused
    assert io.check_output_path(tmp_path / "missing" / "out.onnx") == [tmp_path / "missing" / "out.onnx"]
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SaveError, match="'.*file' is not a folder"):
        io.check_output_path(tmp_path / "file" / "out.onnx")
    with pytest.raises(SaveError, match="output path is a directory"):
        io.check_output_path(tmp_path)
    (tmp_path / "out.onnx.data").mkdir()
    with pytest.raises(SaveError, match="is a directory"):
        io.check_output_path(tmp_path / "out.onnx", external_data=True)
    assert io.check_output_path(tmp_path / "x.onnx") == [tmp_path / "x.onnx"]


# --------------------------------------------------------------------------- safe_external_path


@pytest.mark.parametrize(
    "location",
    ["", "../x.data", "a/../../x.data", "a/../x.data", "..\\x.data", "/etc/passwd", "\\\\server\\share",
     "C:\\x.data", "C:x.data", "file:///etc/passwd", "http://host/x.data", "x\0.data"],
)
def test_safe_external_path_refuses(tmp_path, location):
    assert io.safe_external_path(tmp_path, location) is None


def test_safe_external_path_accepts_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    assert io.safe_external_path(tmp_path, "w.data") == (tmp_path / "w.data").resolve()
    assert io.safe_external_path(tmp_path, "sub/w.data") == (tmp_path / "sub" / "w.data").resolve()
    assert io.safe_external_path(tmp_path, "./w.data") == (tmp_path / "w.data").resolve()


def test_safe_external_path_symlinks(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.data").write_bytes(b"x")
    (folder / "inside.data").write_bytes(b"x")
    (folder / "out.data").symlink_to(tmp_path / "outside.data")
    (folder / "in.data").symlink_to(folder / "inside.data")
    (folder / "dir").symlink_to(tmp_path, target_is_directory=True)
    (folder / "loop").symlink_to(folder / "loop")
    assert io.safe_external_path(folder, "out.data") is None
    assert io.safe_external_path(folder, "dir/outside.data") is None
    assert io.safe_external_path(folder, "loop") is None
    assert io.safe_external_path(folder, "in.data") == (folder / "inside.data").resolve()


# --------------------------------------------------------------------------- load checks


def test_unsorted_graph_is_rejected_as_unsorted(tmp_path, tiny_proto):
    nodes = list(tiny_proto.graph.node)
    del tiny_proto.graph.node[:]
    tiny_proto.graph.node.extend(reversed(nodes))
    path = _save_proto(tiny_proto, tmp_path / "unsorted.onnx")
    with pytest.raises(InvalidModelError, match="not in topological order") as info:
        io.load_model(path)
    assert "node 'add' reads 'y' before node 'matmul' produces it" in str(info.value)
    assert "cycle" not in str(info.value)


def test_self_loop_is_a_cycle(tmp_path, tiny_proto):
    tiny_proto.graph.node[1].input[0] = "y"  # matmul reads its own output
    path = _save_proto(tiny_proto, tmp_path / "loop.onnx")
    with pytest.raises(InvalidModelError, match="graph has a cycle through node 'matmul'"):
        io.load_model(path)


def test_long_cycle_is_named(tmp_path):
    n = 12
    nodes = [helper.make_node("Relu", [f"v{(i - 1) % n}"], [f"v{i}"], name=f"r{i}") for i in range(n)]
    nodes.append(helper.make_node("Add", ["x", "v3"], ["out"], name="tail"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
    )
    path = _save_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "c.onnx")
    with pytest.raises(InvalidModelError) as info:
        io.load_model(path)
    message = str(info.value)
    assert "graph has a cycle through node 'r" in message and "(12 nodes)" in message
    assert "tail" not in message  # downstream of the cycle, not on it


def test_checker_message_is_one_line(tmp_path, tiny_proto):
    del tiny_proto.graph.node[0].input[1]  # Gather needs two inputs
    tiny_proto.graph.node[0].input[0] = "emb"
    path = _save_proto(tiny_proto, tmp_path / "bad.onnx")
    with pytest.raises(InvalidModelError) as info:
        io.load_model(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert "Gather" in message or "gather" in message


def test_invalid_utf8_name(tmp_path, tiny_proto):
    data = tiny_proto.SerializeToString().replace(b"matmul", b"ma\xffmul")
    path = tmp_path / "utf8.onnx"
    path.write_bytes(data)
    with pytest.raises(InvalidModelError, match="not valid UTF-8"):
        io.load_model(path)


def test_invalid_utf8_dim_param(tmp_path, tiny_proto):
    data = tiny_proto.SerializeToString().replace(b"batch", b"b\xfftch")
    path = tmp_path / "utf8.onnx"
    path.write_bytes(data)
    with pytest.raises(InvalidModelError, match=r"model\.graph\.input\[0\].*dim_param is not valid UTF-8"):
        io.load_model(path)


def test_node_output_shadowing_initializer(tmp_path, tiny_proto):
    tiny_proto.graph.node[2].output[0] = "w"
    tiny_proto.graph.output[0].name = "w"
    path = _save_proto(tiny_proto, tmp_path / "shadow.onnx")
    with pytest.raises(InvalidModelError, match="'w' is produced by node 'add' and by a graph input or initializer"):
        io.load_model(path)


def test_graph_without_outputs(tmp_path, tiny_proto):
    del tiny_proto.graph.output[:]
    with pytest.raises(InvalidModelError, match="graph has no outputs"):
        io.load_model(_save_proto(tiny_proto, tmp_path / "m.onnx"))


def test_unknown_op_in_known_domain(tmp_path, tiny_proto):
    tiny_proto.graph.node[2].domain = "com.microsoft"
    tiny_proto.graph.node[2].op_type = "NoSuchContribOp"
    tiny_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(InvalidModelError, match="unknown op 'NoSuchContribOp' in domain 'com.microsoft'"):
        io.load_model(_save_proto(tiny_proto, tmp_path / "m.onnx"))


def test_ort_contrib_op_and_local_function_are_accepted(tmp_path, tiny_proto):
    tiny_proto.graph.node[2].domain = "com.microsoft"
    tiny_proto.graph.node[2].op_type = "BiasGelu"
    tiny_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    io.load_model(_save_proto(tiny_proto, tmp_path / "contrib.onnx"))

    model = tiny_model_proto()
    model.graph.node[2].domain = "com.example"
    model.graph.node[2].op_type = "MyAdd"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.functions.append(
        helper.make_function(
            "com.example", "MyAdd", ["a", "b"], ["c"], [helper.make_node("Add", ["a", "b"], ["c"])],
            [helper.make_opsetid("", 17)],
        )
    )
    io.load_model(_save_proto(model, tmp_path / "function.onnx"))


def test_subgraph_reading_outer_scope_is_accepted(tmp_path):
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
    )
    path = _save_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "if.onnx")
    assert [n.op_type for n in io.load_model(path).graph] == ["If"]


def test_negative_dimension(tmp_path, tiny_proto):
    tiny_proto.graph.initializer[2].dims[0] = -8
    with pytest.raises(InvalidModelError, match="negative dimension"):
        io.load_model(_save_proto(tiny_proto, tmp_path / "m.onnx"))


def test_typed_data_count_mismatch(tmp_path, tiny_proto):
    b = tiny_proto.graph.initializer[2]
    b.ClearField("raw_data")
    b.float_data.extend([1.0] * 7)  # shape [8]
    with pytest.raises(InvalidModelError, match=r"'b' declares shape \[8\] \(8 values\) but holds 7"):
        io.load_model(_save_proto(tiny_proto, tmp_path / "m.onnx"))


def test_external_bad_offset(external_path):
    set_external_info(external_path, lambda t, info: info.update(offset="abc"))
    with pytest.raises(ExternalDataError, match="bad external data offset/length"):
        io.load_model(external_path)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        io.load_model(fifo)


def test_model_with_no_opset(tmp_path, tiny_proto):
    del tiny_proto.opset_import[:]
    with pytest.raises(ModelLoadError, match=r"not an ONNX model \(no opset import\)"):
        io.load_model(_save_proto(tiny_proto, tmp_path / "m.onnx"))


def test_single_file_writer_gives_the_model_ir_save_gives(tmp_path):
    """write_single_file (one initializer's bytes at a time) parses to the ModelProto ir.save
    writes, external weights included; ONNX Runtime runs it with the same outputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from graphc.core.io import load_model, write_single_file
    from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama

    src = tmp_path / "tiny.onnx"
    write_synthetic_llama(src, PRESETS["tiny"])  # weights in tiny.onnx.data
    model = load_model(src)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    write_single_file(model, tmp_path / "ours.onnx")
    from graphc.core.io import inline_external_data

    with inline_external_data(model):
        ir.save(model, tmp_path / "ir.onnx")
    ours, theirs = onnx.load(tmp_path / "ours.onnx"), onnx.load(tmp_path / "ir.onnx")
    assert not [t for t in ours.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    assert len(ours.graph.initializer) == len(model.graph.initializers) > 10
    ids = {"input_ids": np.array([[1, 5, 7, 9]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    a = ort.InferenceSession(str(tmp_path / "ours.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    feed = {k: v for k, v in ids.items() if k in {i.name for i in a.get_inputs()}}
    np.testing.assert_array_equal(a.run(None, feed)[0], b.run(None, feed)[0])

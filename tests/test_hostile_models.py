"""Hostile models that used to give wrong results without a word: an input that is also an
output, initializers listed as inputs, NaN outputs, sequence outputs, scales float16 cannot
hold. Each model is built here; inputs stay byte-identical; nothing appears but -o."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.front.cli import main
from tests.conftest import Snapshot, tiny_model_proto

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 8)).astype(np.float32)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, path)
    return path


def _matmul_model(*, ir_version: int = 8, opset: int = 17, weight_as_input: bool = False,
                  input_as_output: bool = False, pre: str | None = None, w: np.ndarray = W) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["s" if pre else "x", "w"], ["y"])]
    if pre:
        nodes.insert(0, helper.make_node(pre, ["x"], ["s"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 8]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])]
    if input_as_output:
        outputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _compress(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["compress", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------ a graph input that is also an output


@pytest.mark.parametrize("recipe", ["cleanup", "int8"])
@pytest.mark.parametrize("validate", [True, False])
def test_input_that_is_also_an_output_keeps_its_name(recipe, validate, tmp_path, capsys):
    src = _save(_matmul_model(input_as_output=True), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    before = Snapshot(src)
    code, _, err = _compress([str(src), "-o", str(out), "--recipe", recipe, *([] if validate else ["--no-validate"])],
                             capsys)
    assert code == 0, err
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["y", "x"]
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    y, x_back = _session(out).run(None, {"x": x})
    np.testing.assert_array_equal(x_back, x)
    np.testing.assert_allclose(y, x @ W, rtol=0.05, atol=0.05 * np.abs(x @ W).max())
    before.assert_unchanged()
    assert _files(tmp_path) == {"m.onnx", "o.onnx"}


def test_a_pass_renaming_an_output_is_refused_by_name(tmp_path):
    """The guard refuses, naming the pass, a signature change it cannot undo."""
    import onnx_ir as ir

    from graphc.core.errors import PassError
    from graphc.core.signature import SignatureGuard

    model = ir.serde.deserialize_model(_matmul_model())
    guard = SignatureGuard(model)
    model.graph.outputs[0].name = "renamed"

    class Renamer:
        name = "renamer"

    with pytest.raises(PassError, match="pass renamer: changed the model's outputs \\('y' became 'renamed'\\)"):
        guard.after_pass(Renamer(), model, None)


# ------------------------------------------------------------------ initializers listed as graph inputs


@pytest.mark.parametrize("recipe", ["cleanup", "int8"])
def test_overridable_weight_keeps_its_override_semantics(recipe, tmp_path, capsys):
    src = _save(_matmul_model(weight_as_input=True), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    before = Snapshot(src)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", recipe], capsys)
    assert code == 0, err
    assert "are also graph inputs ('w'): callers may override them" in stdout
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x", "w"]
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    other = np.eye(8, dtype=np.float32) * 3
    sess = _session(out)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], _session(src).run(None, {"x": x})[0])
    np.testing.assert_allclose(sess.run(None, {"x": x, "w": other})[0], x @ other, rtol=1e-6)
    before.assert_unchanged()
    assert _files(tmp_path) == {"m.onnx", "o.onnx"}


def test_ir3_initializers_are_constants_and_output_is_valid(tmp_path, capsys):
    src = _save(_matmul_model(ir_version=3, opset=8, weight_as_input=True), tmp_path / "m.onnx")
    with pytest.raises(Exception, match="Invalid input name"):  # what ORT does with them at IR 3
        _session(src).run(None, {"x": np.ones((1, 8), np.float32), "w": W})
    out = tmp_path / "o.onnx"
    before = Snapshot(src)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", "int8"], capsys)
    assert code == 0, err
    assert "IR version 3: 1 initializer(s) listed as graph inputs are constants" in stdout
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    assert proto.ir_version == 4 and [i.name for i in proto.graph.input] == ["x"]
    assert not any(n.op_type == "MatMul" for n in proto.graph.node)  # the weight was quantized
    before.assert_unchanged()
    assert _files(tmp_path) == {"m.onnx", "o.onnx"}


# ------------------------------------------------------------------ NaN and sequence outputs


def test_nan_in_both_models_at_the_same_places_is_no_difference(tmp_path, capsys):
    """sqrt of a normal input is NaN at the negative entries, in the original and the copy alike."""
    src = _save(_matmul_model(pre="Sqrt"), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    before = Snapshot(src)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 0, err
    assert "max abs 0 → PASS" in stdout
    before.assert_unchanged()


def test_nan_where_the_original_has_a_number_fails_naming_the_output(tmp_path, capsys):
    """The rewritten model yields NaN where the original does not: validate fails, naming it."""
    src = _save(_matmul_model(), tmp_path / "m.onnx")
    bad = _save(_matmul_model(pre="Sqrt"), tmp_path / "bad.onnx")
    before = Snapshot(tmp_path)
    code = main(["validate", str(src), str(bad)])
    captured = capsys.readouterr()
    assert code == 3
    assert "y: cosine 0.000000" in captured.out and "NaN/inf where the other has a number at" in captured.out
    from graphc.front.api import validate

    report = validate(src, bad)
    assert report.nonfinite_outputs == ["y"] and not report.passed
    before.assert_unchanged()


def test_nan_metric_unit():
    from graphc.checks.validate import output_metrics

    ref = np.array([[1.0, np.nan, np.inf, 2.0]])
    same = output_metrics("o", [ref], [ref.copy()])
    assert same.nonfinite == 0 and same.max_abs == 0.0 and same.cosine == pytest.approx(1.0)
    worse = output_metrics("o", [ref], [np.array([[1.0, np.nan, np.inf, np.nan]])])
    assert worse.nonfinite == 1 and worse.max_abs == float("inf") and worse.cosine == 0.0
    flipped = output_metrics("o", [ref], [np.array([[1.0, np.nan, -np.inf, 2.0]])])
    assert flipped.nonfinite == 1


def _sequence_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("SequenceConstruct", ["y", "x"], ["seq"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(W, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("recipe", ["cleanup", "int8"])
def test_sequence_outputs_are_compared(recipe, tmp_path, capsys):
    src = _save(_sequence_model(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    before = Snapshot(src)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", recipe, "--json"], capsys)
    assert code == 0, err
    import json

    outputs = {o["name"]: o for o in json.loads(stdout)["validation"]["outputs"]}
    assert set(outputs) == {"seq", "y"}
    if recipe == "cleanup":
        assert outputs["seq"]["max_abs"] == 0.0
    before.assert_unchanged()


def test_sequence_outputs_that_differ_fail():
    from graphc.checks.validate import compare

    def model(scale):
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("SequenceConstruct", ["y"], ["seq"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.full(4, scale, np.float32), "k")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    feeds = [{"x": np.arange(4, dtype=np.float32) - 1.5}]
    assert compare(model(1.0), model(1.0), feeds).max_abs == 0.0
    assert compare(model(1.0), model(-1.0), feeds).output_cosine == pytest.approx(-1.0)


# ------------------------------------------------------------------ scales float16 cannot hold


@pytest.mark.parametrize("magnitude", [1e7, 1e-6])
def test_int8_float16_scales_stay_float32_when_float16_cannot_hold_them(magnitude, tmp_path, capsys):
    src = _save(_matmul_model(w=(W * magnitude).astype(np.float32)), tmp_path / "m.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "int8-f16"\n[[passes]]\nname = "quantize-int8"\n'
                      'options = { scale_dtype = "float16" }\n')
    out = tmp_path / "o.onnx"
    before = Snapshot(src, recipe)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", str(recipe)], capsys)
    assert code == 0, err
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    ref, got = _session(src).run(None, {"x": x})[0], _session(out).run(None, {"x": x})[0]
    cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert np.isfinite(got).all() and cos > 0.999, cos
    scales = [numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.name.endswith("_scale")]
    assert scales and all(s.dtype == np.float32 for s in scales)
    before.assert_unchanged()


def test_int8_float16_scales_used_where_they_fit():
    from graphc.passes._quant import symmetric_int8

    _, scale = symmetric_int8(W, 1, np.float16)
    assert scale.dtype == np.float16
    _, scale = symmetric_int8(W * 1e7, 1, np.float16)
    assert scale.dtype == np.float32


@pytest.mark.parametrize("magnitude", [1e7, 1e-6])
def test_embedding_float16_scales_stay_float32_when_float16_cannot_hold_them(magnitude, tmp_path, capsys):
    proto = tiny_model_proto(vocab=64, hidden=16)
    for t in proto.graph.initializer:
        if t.name == "emb":
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * magnitude).astype(np.float32), "emb"))
    src = _save(proto, tmp_path / "m.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "emb"\n[tolerance]\nmin_cosine = 0.999\n[[passes]]\nname = "quantize-embedding"\n'
                      'options = { scale_dtype = "float16", min_rows = 1 }\n')
    out = tmp_path / "o.onnx"
    before = Snapshot(src, recipe)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", str(recipe), "--json"], capsys)
    assert code == 0, err
    import json

    assert json.loads(stdout)["passes"][0]["stats"].get("tables_quantized") == 1
    before.assert_unchanged()


def test_fp16_constants_keeps_per_channel_scales_float16_cannot_hold(tmp_path, capsys):
    """int8 recipe: a weight column 1e-6 the size of the others gets a scale below float16's
    normal range; fp16-constants (after quantize-int8) must keep that scale vector float32, or
    the column's outputs turn to garbage while the whole-output cosine still passes."""
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    w[:, 0] *= 1e-6
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                              [numpy_helper.from_array(w, "w")])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    before = Snapshot(src)
    code, stdout, err = _compress([str(src), "-o", str(out), "--recipe", "int8", "--json"], capsys)
    assert code == 0, err
    import json

    passes = {p["name"]: p for p in json.loads(stdout)["passes"]}
    assert passes["quantize-int8"]["stats"]["matmuls_quantized"] == 1
    assert any("scale" in s["node"] for s in passes["fp16-constants"]["stats"].get("skipped", []))
    x = RNG.standard_normal((16, 32)).astype(np.float32)
    ref, got = _session(src).run(None, {"x": x})[0], _session(out).run(None, {"x": x})[0]
    small = np.abs(got[:, 0] - ref[:, 0]).max() / np.abs(ref[:, 0]).max()
    assert small < 0.05, small  # int8 error on that column, relative to the column itself
    before.assert_unchanged()
    assert _files(tmp_path) == {"m.onnx", "o.onnx"}

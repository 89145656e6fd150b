"""Per-layer error attribution: matching across rewrites, layer outputs, worst layer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.core import io
from graphc.checks.attribution import _metrics, attribute, normalize_name
from graphc.core.errors import ValidationError
from graphc.passes.quantize_int8 import QuantizeInt8
from graphc.checks.validate import synthesize_inputs
from tests.passes.graphs import mlp


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _to_ir(proto: onnx.ModelProto) -> ir.Model:
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _x_feeds(k: int, count: int = 2, seq: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((2, seq, k)).astype(np.float32)} for _ in range(count)]


def _stack(layers: int = 4, dim: int = 16, seed: int = 0) -> ir.Model:
    """x → [MatMul → Add → Relu] × layers, scoped ``layers.{i}``."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, scope = [], [], "x", {}
    for i in range(layers):
        w = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        b = rng.standard_normal(dim).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == layers - 1 else f"r{i}"
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [out]),
        ]
        scope.update({f"m{i}": i, f"a{i}": i, out: i})
        prev = out
    graph = helper.make_graph(
        nodes, "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        inits,
    )
    model = _to_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for node in model.graph:
        node.metadata_props["graphc.scope"] = f"layers.{scope[node.outputs[0].name]}"
    return model


def _two_bit(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max() / 1.5
    return ((np.clip(np.round(w / scale - 0.5), -2, 1) + 0.5) * scale).astype(np.float32)


def test_normalize_name():
    assert normalize_name("h_DequantizeLinear_Output") == "h"
    assert normalize_name("h_DequantizeLinear_Output_2") == "h"  # DedicatedQDQPair
    assert normalize_name("h_convert_DequantizeLinear_Output") == "h"
    assert normalize_name("y_QuantizeLinear_Input") == "y"
    assert normalize_name("h_QuantizeLinear_Output") == "h_QuantizeLinear_Output"  # int8: never compared
    assert normalize_name("h") == "h"
    assert normalize_name("_DequantizeLinear_Output") == "_DequantizeLinear_Output"


def test_metrics_ignore_mask_sentinels_but_catch_overflow():
    scores = np.array([[1.0, 2.0, np.finfo(np.float32).min], [3.0, -np.inf, 4.0]], np.float32)
    noisy = scores.copy()
    noisy[0, 2] = -np.inf  # another mask value where the original has one: ignored
    assert _metrics(scores, noisy, None) == (1.0, 0.0, 0.0)
    noisy[1, 0] = np.inf  # overflow where the original has a number
    assert _metrics(scores, noisy, None) == (0.0, float("inf"), float("inf"))


def test_mlp_int8_two_layers():
    model = mlp()
    for node in model.graph:
        part = "0" if node.name == "fc1" or node.op_type in ("Add", "Relu") else "1"
        node.metadata_props["graphc.scope"] = f"encoder.layer.{part}.{node.name or node.op_type}"
    rewritten = _copy(model)
    assert QuantizeInt8()(rewritten).modified
    result = attribute(model, rewritten, _x_feeds(32))
    by_name = {t.name: t for t in result.tensors}
    assert {"h", "y", "scores"} <= set(by_name)
    assert by_name["h"].layer == "layer.0" and by_name["y"].layer == "layer.1"
    assert by_name["h"].op_type == "MatMul" and by_name["h"].rewritten_name is None
    assert 0 < by_name["h"].error <= by_name["y"].error < 0.01
    assert by_name["y"].max_abs > 0 and 0 < by_name["y"].rel_error < 0.1
    assert [layer.layer for layer in result.layers] == ["layer.0", "layer.1"]
    assert result.worst_layer in ("layer.0", "layer.1")
    assert result.worst_layer in result.summary()
    json.dumps(result.to_dict())


def test_broken_layer_is_found():
    model = _stack()
    rewritten = _copy(model)
    w2 = rewritten.graph.initializers["W2"]
    w2.const_value = ir.tensor(_two_bit(w2.const_value.numpy()), name="W2")
    result = attribute(model, rewritten, _x_feeds(16))
    assert result.worst_layer == "layer.2"
    layers = {layer.layer: layer for layer in result.layers}
    assert list(layers) == ["layer.0", "layer.1", "layer.2", "layer.3"]
    for name in ("layer.0", "layer.1"):
        assert layers[name].cosine == pytest.approx(1.0, abs=1e-9) and layers[name].max_abs == 0.0
    assert layers["layer.2"].added_error > 0.01
    assert layers["layer.2"].added_error > abs(layers["layer.3"].added_error)
    first_bad = next(t for t in result.tensors if t.error > 1e-9)
    assert first_bad.name == "m2" and first_bad.added_error == pytest.approx(first_bad.error)
    assert "layer.2" in result.summary()


def test_identical_models_have_no_worst_layer():
    model = _stack(layers=2)
    result = attribute(model, _copy(model), _x_feeds(16, count=1))
    assert result.worst_layer is None and all(t.cosine == pytest.approx(1.0) for t in result.tensors)
    assert "no error" in result.summary()


def test_shape_change_is_skipped_and_padded_rows_ignored():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    v = rng.standard_normal((4, 8)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    original = _to_ir(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "V"], ["y"])],
        "o", [x], [y], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V")],
    ), opset_imports=[helper.make_opsetid("", 17)]))
    # rewritten: h packs [W | W] (another shape); y is garbage where attention_mask is 0
    rewritten = _to_ir(helper.make_model(helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "WW"], ["h"]),
            helper.make_node("Slice", ["h", "zero", "four", "last"], ["hs"]),
            helper.make_node("MatMul", ["hs", "V"], ["yy"]),
            helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mf", "last"], ["m3"]),
            helper.make_node("Sub", ["one", "m3"], ["pad"]),
            helper.make_node("Mul", ["pad", "big"], ["junk"]),
            helper.make_node("Add", ["yy", "junk"], ["y"]),
        ],
        "r", [x, helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])], [y],
        [numpy_helper.from_array(a, n) for n, a in {
            "WW": np.concatenate([w, w], axis=1), "V": v, "zero": np.array([0]), "four": np.array([4]),
            "last": np.array([-1]), "one": np.array(1.0, np.float32), "big": np.array(5.0, np.float32)}.items()],
    ), opset_imports=[helper.make_opsetid("", 17)]))
    feeds = _x_feeds(8)
    for feed in feeds:
        feed["attention_mask"] = np.ones((2, 6), np.int64)
        feed["attention_mask"][1, 3:] = 0
    result = attribute(original, rewritten, feeds)
    assert [t.name for t in result.tensors] == ["y"]
    assert result.tensors[0].max_abs < 1e-5 and result.tensors[0].cosine == pytest.approx(1.0)
    assert any(s["name"] == "h" and "shape differs" in s["reason"] for s in result.skipped)


def test_ort_failure_is_a_validation_error():
    model = mlp()
    with pytest.raises(ValidationError, match="ONNX Runtime"):
        attribute(model, _copy(model), [{"x": np.zeros((2, 3, 5), np.float32)}])
    with pytest.raises(ValidationError):
        attribute(model, _copy(model), [])


# --------------------------------------------------------------------------- tiny BERT, four graph forms


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    from graphc.models.fixtures import export_tiny

    path = tmp_path_factory.mktemp("attr") / "bert.onnx"
    export_tiny("bert", path)
    model = io.load_model(path)
    return path, model, synthesize_inputs(model, count=2)


def _graphc_int8(path, out):
    from graphc.front import api

    # embeddings stay float, so the error enters in the layers only
    return api.compress(path, recipe="int8", force=True, disable=("quantize-embedding",)).model


def _ort_dynamic(path, out):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(path, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return io.load_model(out)


def _ort_qdq(path, out, feeds):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(path, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return io.load_model(out)


def _ort_qdq_optimized(path, out, feeds):
    """A QDQ graph as ORT saves it after fusing: QLinearMatMul, most float names gone."""
    import onnxruntime as ort

    _ort_qdq(path, out.with_suffix(".qdq.onnx"), feeds)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(out.with_suffix(".qdq.onnx")), options, providers=["CPUExecutionProvider"])
    return io.load_model(out)


def _ort_nbits(path, out):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(path), block_size=16, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return io.load_model(out)


@pytest.mark.parametrize("form", ["graphc-int8", "ort-dynamic", "ort-qdq", "ort-qdq-optimized", "ort-nbits"])
def test_tiny_bert_graph_forms(bert, tmp_path, form):
    path, model, feeds = bert
    out = tmp_path / f"{form}.onnx"
    rewritten = {
        "graphc-int8": lambda: _graphc_int8(path, out),
        "ort-dynamic": lambda: _ort_dynamic(path, out),
        "ort-qdq": lambda: _ort_qdq(path, out, feeds),
        "ort-qdq-optimized": lambda: _ort_qdq_optimized(path, out, feeds),
        "ort-nbits": lambda: _ort_nbits(path, out),
    }[form]()
    ops = {n.op_type for n in rewritten.graph}
    expected = {"graphc-int8": "QAttention", "ort-dynamic": "MatMulInteger", "ort-qdq": "QuantizeLinear",
                "ort-qdq-optimized": "QLinearMatMul", "ort-nbits": "MatMulNBits"}[form]
    assert expected in ops
    result = attribute(model, rewritten, feeds)
    layers = {t.layer for t in result.tensors}
    assert {"layer.0", "layer.1"} <= layers
    assert result.tensors[-1].name == "last_hidden_state"
    assert result.worst_layer in ("layer.0", "layer.1")
    assert all(0.99 < layer.cosine <= 1.0 for layer in result.layers)
    renamed = {t.rewritten_name for t in result.tensors if t.rewritten_name}
    if form == "graphc-int8":  # Q/K/V and scores live inside QAttention
        assert any(s["name"] == "val_84" for s in result.skipped)
    elif form == "ort-qdq-optimized":  # a fused MatMul's output survives as its DequantizeLinear's
        assert "val_146_DequantizeLinear_Output" in renamed
    else:
        assert not result.skipped and not renamed  # every float name survives


def test_max_tensors_keeps_layer_outputs(bert, tmp_path):
    path, model, feeds = bert
    rewritten = _ort_dynamic(path, tmp_path / "dyn.onnx")
    result = attribute(model, rewritten, feeds[:1], max_tensors=3)
    assert [(t.layer, t.name) for t in result.tensors] == [
        ("embeddings", "layer_norm"), ("layer.0", "layer_norm_2"), ("layer.1", "last_hidden_state")]
    more = attribute(model, rewritten, feeds[:1], max_tensors=10)
    assert len(more.tensors) == 10 and {"layer_norm", "layer_norm_2", "last_hidden_state"} <= {
        t.name for t in more.tensors}

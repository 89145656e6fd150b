"""fold-batchnorm and quantize-conv: structure, negative cases, numerics in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphc.pass_base import PassContext, PassStats
from graphc.passes.fold_batchnorm import FoldBatchNorm
from graphc.passes.quantize_conv import ConvInt8Options, QuantizeConv
from graphc.target import resolve
from graphc.validate import make_session
from tests import third_party_graphs as tp


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return make_session(model).run(None, {"x": x})[0]


def _x(seed=0, h=20, w=24):
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)


def _ops(model):
    return [n.op_type for n in model.graph]


def test_fold_batchnorm_is_exact_and_removes_the_node():
    model = ir.serde.deserialize_model(tp.paddle_conv())
    ref = _run(model, _x())
    stats = PassStats()
    assert FoldBatchNorm().run(model, stats)
    assert "BatchNormalization" not in _ops(model) and stats.counts["batchnorms_folded"] == 1
    np.testing.assert_allclose(_run(model, _x()), ref, rtol=1e-5, atol=1e-6)


def test_fold_batchnorm_leaves_a_shared_conv_output():
    proto = tp.paddle_conv()
    proto.graph.output.append(onnx.helper.make_tensor_value_info("conv2d_0.tmp_0", onnx.TensorProto.FLOAT, None))
    model = ir.serde.deserialize_model(proto)
    stats = PassStats()
    assert not FoldBatchNorm().run(model, stats)
    assert stats.skipped == [{"node": "batch_norm_0", "reason": "the Conv output is read by other nodes too"}]


@pytest.mark.parametrize("target", ["x86-avx512-vnni", "x86-avx2"])
def test_quantize_conv_int8_per_channel(target):
    model = ir.serde.deserialize_model(tp.paddle_conv(channels=32))
    ref = _run(model, _x())
    FoldBatchNorm().run(model, PassStats())
    stats = PassStats()
    assert QuantizeConv(context=PassContext(target=resolve(target))).run(model, stats)
    assert stats.counts["convs_quantized"] == 2
    assert stats.details["int8_form"] == resolve(target).int8_form.value
    codes = [v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith(("_int8", "_uint8"))]
    assert len(codes) == 2 and all(c.dtype in (np.int8, np.uint8) for c in codes)
    assert not any(v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= 256
                   for v in model.graph.initializers.values())  # no float kernel left
    assert model.opset_imports[""] == 11  # the opset is kept (Squeeze and friends keep their meaning)
    got = _run(model, _x())
    cos = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999 and np.abs(ref - got).max() < 0.02


def test_quantize_conv_skips_small_and_non_finite_weights():
    proto = tp.paddle_conv(channels=8)  # conv2d_0: 8*3*3*3 = 216 < 256 elements
    w = next(t for t in proto.graph.initializer if t.name == "conv2d_1.w_0")
    a = onnx.numpy_helper.to_array(w).copy()
    a[0, 0, 0, 0] = np.inf
    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))
    model = ir.serde.deserialize_model(proto)
    stats = PassStats()
    assert not QuantizeConv(ConvInt8Options()).run(model, stats)
    reasons = {s["node"]: s["reason"] for s in stats.skipped}
    assert reasons["conv2d_0"] == "weight has 216 elements < min_elements=256"
    assert "NaN/inf" in reasons["conv2d_1"]


def test_quantize_conv_conv_transpose():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 2, 2)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]))
    x = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    ref = make_session(model).run(None, {"x": x})[0]
    stats = PassStats()
    assert QuantizeConv().run(model, stats) and stats.counts["convs_quantized"] == 1
    got = make_session(model).run(None, {"x": x})[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()

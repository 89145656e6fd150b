"""fold-batchnorm and quantize-conv: structure, negative cases, numerics in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphc.core.pass_base import PassContext, PassStats
from graphc.passes.fold_batchnorm import FoldBatchNorm
from graphc.passes.quantize_conv import ConvInt8Options, QuantizeConv
from graphc.core.target import resolve
from graphc.checks.validate import make_session
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


def _sensitive_conv_model() -> ir.Model:
    """paddle_conv with BatchNorm folded, made so that int8 costs one layer dearly: the first
    Conv's output channel 0 is dead (zero weights, negative bias: Relu gives 0), and the second
    Conv reads that channel with a weight of 30, which changes nothing in float but sets the
    int8 step of every output channel to 30/127, rounding its real weights (~0.1) to 0 or a step."""
    model = ir.serde.deserialize_model(tp.paddle_conv(channels=32))
    FoldBatchNorm().run(model, PassStats())
    conv0, conv1 = (n for n in model.graph if n.op_type == "Conv")

    def edit(value: ir.Value, change) -> None:
        a = value.const_value.numpy().copy()
        change(a)
        value.const_value = ir.tensor(a, name=value.name)

    edit(conv0.inputs[1], lambda a: a.__setitem__(0, 0.0))
    edit(conv0.inputs[2], lambda a: a.__setitem__(0, -1.0))
    edit(conv1.inputs[1], lambda a: a.__setitem__((slice(None), 0, 0, 0), 30.0))
    return model


def test_quantize_conv_error_budget_keeps_the_costly_weight_in_float():
    model = _sensitive_conv_model()
    ref = _run(model, _x())
    feeds = [{"x": _x(seed)} for seed in (1, 2)]
    all_int8 = _sensitive_conv_model()
    QuantizeConv().run(all_int8, PassStats())
    cos_all = float(np.dot(ref.ravel(), _run(all_int8, _x()).ravel())
                    / np.linalg.norm(ref) / np.linalg.norm(_run(all_int8, _x())))
    assert 1 - cos_all > 1e-3  # quantizing everything costs this much: the budget below is meaningful
    stats = PassStats()
    context = PassContext(calibration=feeds, calibration_source="two test feeds")
    QuantizeConv(ConvInt8Options(max_error=2e-4, min_elements=16), context).run(model, stats)
    assert stats.counts["convs_quantized"] == 1  # conv2d_0 only
    kept = [s for s in stats.skipped if "error budget" in str(s)]
    assert len(kept) == 1 and "conv2d_1" in str(kept[0])
    assert stats.details["conv_error"] <= 2e-4 < stats.details["conv_error_all_int8"]
    got = _run(model, _x())  # an input the search never saw
    assert 1 - float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) < 1 - cos_all


def test_quantize_conv_error_budget_met_by_int8_keeps_nothing_float():
    model = ir.serde.deserialize_model(tp.paddle_conv(channels=32))
    FoldBatchNorm().run(model, PassStats())
    stats = PassStats()
    QuantizeConv(ConvInt8Options(max_error=0.05), PassContext(calibration=[{"x": _x(1)}], calibration_source="t")).run(model, stats)
    assert stats.counts["convs_quantized"] == 2 and stats.details["conv_error"] == stats.details["conv_error_all_int8"]


def test_quantize_conv_error_budget_needs_calibration_and_a_fraction():
    from graphc.core.errors import GraphcError

    model = ir.serde.deserialize_model(tp.paddle_conv(channels=32))
    with pytest.raises(GraphcError, match="needs calibration"):
        QuantizeConv(ConvInt8Options(max_error=0.01)).run(model, PassStats())
    with pytest.raises(GraphcError, match="max_error"):
        QuantizeConv.from_dict({"max_error": 1.5})


def _if_conv_model() -> ir.Model:
    """x [1, 3, 8, 8] → If(cond): then Conv(x, W_then), else Conv(x, W_else); both weights in
    Constant nodes inside the branches (silero-vad's layout). W_then reads input channel 0 with
    a weight of 30 and the feeds keep that channel at 0: free in float, costly at int8."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_then = (rng.standard_normal((8, 3, 3, 3)) * 0.1).astype(np.float32)
    w_then[:, 0, 0, 0] = 30.0
    w_else = (rng.standard_normal((8, 3, 3, 3)) * 0.1).astype(np.float32)

    def branch(name, w):
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(w, f"{name}_w")),
             helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1])],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 8, 8, 8])])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", w_then), else_branch=branch("else", w_else))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def test_quantize_conv_error_budget_reaches_constants_inside_if_branches():
    def feed(seed):
        x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
        x[:, 0] = 0.0
        return {"x": x, "cond": np.array(True)}

    model = _if_conv_model()
    ref = make_session(model).run(None, feed(9))[0]
    stats = PassStats()
    context = PassContext(calibration=[feed(1), feed(2)], calibration_source="two test feeds")
    QuantizeConv(ConvInt8Options(max_error=1e-4, min_elements=16), context).run(model, stats)
    kept = [s for s in stats.skipped if "error budget" in str(s)]
    assert len(kept) == 1 and "then_conv" in str(kept[0])
    assert stats.counts["convs_quantized"] == 1  # the else branch's: the feeds never take it, its error is 0
    got = make_session(model).run(None, feed(9))[0]
    assert 1 - float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) < 1e-4

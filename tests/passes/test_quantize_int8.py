import numpy as np
import onnx_ir as ir
import pytest

from graphc.core.errors import UnsupportedError
from graphc.core.pass_base import PassContext
from graphc.passes.quantize_int8 import QuantizeInt8
from tests.passes.graphs import cosine, gemm, mlp, ops_of, rotary_angles, run


def _feed(seed=0, k=32):
    return {"x": np.random.default_rng(seed).standard_normal((2, 5, k)).astype(np.float32)}


def test_structure_ms_shares_input_quantization():
    model = mlp()
    # the u8s8 form (VNNI); each target's form is checked in tests/test_target.py
    result = QuantizeInt8(context=PassContext(target="x86-avx512-vnni"))(model)
    assert result.modified
    ops = ops_of(model)
    # fc1 and fc3 share x: one DynamicQuantizeLinear for both, one for fc2's input.
    assert ops.count("DynamicQuantizeLinear") == 2
    assert ops.count("MatMulIntegerToFloat") == 3
    # the activation x activation MatMul is left alone, with its reason recorded
    assert ops.count("MatMul") == 1
    assert result.stats.counts["matmuls_quantized"] == 3
    assert any("not a constant" in s["reason"] for s in result.stats.skipped)
    # float weights are gone, int8 weights with per-channel scales are there
    inits = model.graph.initializers
    assert not {"W1", "W2", "W3"} & set(inits)
    w1 = inits["W1_int8"].const_value
    assert w1.dtype == ir.DataType.INT8 and inits["W1_scale"].const_value.shape == ir.Shape([48])
    # provenance: new nodes record the pass
    assert all(n.metadata_props.get("graphc.pass") == "quantize-int8" for n in model.graph if n.op_type == "MatMulIntegerToFloat")


def test_numeric_ms_close_to_float():
    model = mlp()
    ref = run(model, _feed())
    QuantizeInt8()(model)
    got = run(model, _feed())
    assert cosine(ref[0], got[0]) > 0.999
    assert np.abs(ref[0] - got[0]).max() < 0.05 * np.abs(ref[0]).max()


def test_onnx_emit_uses_standard_ops_only_and_matches():
    model = mlp()
    ref = run(model, _feed(1))
    QuantizeInt8(QuantizeInt8.Options(emit="onnx"))(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph)
    assert ops_of(model).count("MatMulInteger") == 3
    got = run(model, _feed(1))
    assert cosine(ref[0], got[0]) > 0.999


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_alpha_beta_bias(trans_b):
    model = gemm(trans_b=trans_b)
    feed = {"x": np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)}
    ref = run(model, feed)
    result = QuantizeInt8()(model)
    assert result.stats.counts["gemms_quantized"] == 1
    assert ops_of(model) == ["DynamicQuantizeLinear", "MatMulIntegerToFloat"]
    got = run(model, feed)
    assert cosine(ref[0], got[0]) > 0.999


def test_exclude_and_min_elements_leave_float():
    model = mlp()
    result = QuantizeInt8.from_dict({"exclude": ["fc2"], "min_elements": 32 * 32 + 1})(model)
    # fc3 (32x32) is below min_elements, fc2 excluded: only fc1 is quantized
    assert result.stats.counts["matmuls_quantized"] == 1
    reasons = " ".join(s["reason"] for s in result.stats.skipped)
    assert "excluded" in reasons and "min_elements" in reasons


def test_per_tensor_option():
    model = mlp()
    QuantizeInt8(QuantizeInt8.Options(per_channel=False))(model)
    assert model.graph.initializers["W1_scale"].const_value.shape == ir.Shape([1])


def test_nothing_to_quantize_is_not_modified():
    model = mlp()
    QuantizeInt8()(model)
    assert not QuantizeInt8()(model).modified


def test_bad_emit_is_a_clear_error():
    with pytest.raises(UnsupportedError, match="supported: ms, onnx"):
        QuantizeInt8(QuantizeInt8.Options(emit="qdq"))(mlp())


def test_unknown_option_is_a_clear_error():
    from graphc.core.errors import GraphcError

    with pytest.raises(GraphcError, match="unknown option"):
        QuantizeInt8.from_dict({"bits": 4})


def _outlier_feeds(n=3, k=32, channel=5, size=40.0):
    rng = np.random.default_rng(3)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((2, 6, k)).astype(np.float32)
        x[..., channel] *= size  # one channel carries outliers, as after BERT's LayerNorm
        feeds.append({"x": x})
    return feeds


def _with_calibration(options, feeds):
    from graphc.core.pass_base import PassContext

    return QuantizeInt8(QuantizeInt8.Options(**options), PassContext(calibration=feeds, calibration_source="test"))


def test_outlier_channels_go_through_float_path_and_improve_error():
    feeds = _outlier_feeds()
    base = mlp()
    ref = run(base, feeds[0])[1]
    plain = mlp()
    QuantizeInt8()(plain)
    # x feeds fc1 and fc3: allow shared inputs so the decomposition applies to x itself
    shared = mlp()
    result = _with_calibration({"outlier_ratio": 4.0, "outlier_max_consumers": 4, "outlier_mode": "split"}, feeds)(shared)
    assert result.stats.counts["outlier_channels"] >= 1
    ops = [n.op_type for n in shared.graph]
    assert "ScatterElements" in ops and ops.count("MatMul") >= 2  # float outlier path(s) + act x act
    err_plain = np.abs(run(plain, feeds[0])[1] - ref).max()
    err_split = np.abs(run(shared, feeds[0])[1] - ref).max()
    assert err_split < err_plain / 3


def test_outlier_ratio_without_calibration_is_a_clear_error():
    from graphc.core.errors import PassError

    with pytest.raises(PassError, match="needs calibration data"):
        QuantizeInt8(QuantizeInt8.Options(outlier_ratio=4.0))(mlp())


def test_no_outliers_means_no_split():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 6, 32)).astype(np.float32)}]
    model = mlp()
    result = _with_calibration({"outlier_ratio": 8.0, "outlier_max_consumers": 4}, feeds)(model)
    assert "outlier_channels" not in result.stats.counts
    assert "ScatterElements" not in [n.op_type for n in model.graph]


def test_float16_scales_are_cast_and_accurate():
    model = mlp()
    ref = run(model, _feed())
    result = QuantizeInt8(QuantizeInt8.Options(scale_dtype="float16"))(model)
    assert model.graph.initializers["W1_scale"].const_value.dtype == ir.DataType.FLOAT16
    assert result.stats.counts["weight_bytes_after"] < 3 * 32 * 48 + 200  # int8 + fp16 scales
    assert cosine(ref[0], run(model, _feed())[0]) > 0.999


def test_outlier_smoothing_moves_scale_into_weights():
    feeds = _outlier_feeds()
    ref = run(mlp(), feeds[0])[0]
    plain, smooth = mlp(), mlp()
    QuantizeInt8()(plain)
    result = _with_calibration({"outlier_ratio": 4.0, "outlier_max_consumers": 4, "outlier_mode": "smooth"}, feeds)(smooth)
    assert result.stats.counts["outlier_channels"] >= 1
    ops = [n.op_type for n in smooth.graph]
    assert "ScatterElements" not in ops and ops.count("MatMul") == 1  # no float side path
    inv = smooth.graph.initializers["x_smooth"].const_value.numpy()
    assert inv[5] < 0.5 and np.all(np.delete(inv, 5) == 1.0)  # only the outlier channel is scaled
    # y = fc2(relu(fc1(x))): fc1's input x carries the outlier channel
    err_plain = np.abs(run(plain, feeds[0])[0] - ref).max()
    err_smooth = np.abs(run(smooth, feeds[0])[0] - ref).max()
    assert err_smooth < err_plain / 1.5


def test_bad_outlier_mode():
    with pytest.raises(UnsupportedError, match="smooth, split"):
        QuantizeInt8(QuantizeInt8.Options(outlier_mode="magic"))(mlp())


def test_matmul_feeding_matmul_quantizes_the_live_input():
    """Two factors in a row (svd-linear's U then V): the second group's input is the first
    MatMul's output, which the first rewrite replaces; the second must read the new value."""
    from onnx import TensorProto, helper

    from graphc.passes.cleanup import RemoveUnused
    from tests.passes.graphs import _model

    rng = np.random.default_rng(0)
    inits = {"U": rng.standard_normal((32, 8)).astype(np.float32) * 0.3,
             "V": rng.standard_normal((8, 32)).astype(np.float32) * 0.3}
    nodes = [helper.make_node("MatMul", ["x", "U"], ["h"], name="u"),
             helper.make_node("MatMul", ["h", "V"], ["y"], name="v")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])], inits)
    ref = run(model, _feed())
    result = QuantizeInt8()(model)
    assert result.stats.counts["matmuls_quantized"] == 2
    RemoveUnused()(model)
    assert ops_of(model).count("DynamicQuantizeLinear") == 2
    got = run(model, _feed())
    assert cosine(ref[0], got[0]) > 0.999


def test_outer_product_of_rotary_left_in_float():
    """positions [N, 1] x inv_freq [1, D/2]: dynamic uint8 positions would round them to
    multiples of max/255 (every rotary angle off)."""
    model, freq = rotary_angles()
    result = QuantizeInt8()(model)
    assert not result.modified and "MatMulIntegerToFloat" not in ops_of(model)
    assert "K=1 input rows" in result.stats.skipped[0]["reason"]
    pos = np.arange(2048, dtype=np.float32).reshape(-1, 1)
    np.testing.assert_allclose(run(model, {"pos": pos})[0], np.cos(pos * freq), rtol=0, atol=1e-5)

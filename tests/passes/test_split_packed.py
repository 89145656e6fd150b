"""split-packed: a packed projection cut by last-axis Slices or a Split (Phi-3's qkv_proj and
gate_up_proj) becomes one MatMul per piece; exact. The packed query of GroupQueryAttention (the
model builder's form) is covered in tests/test_builder_input.py."""

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphc.passes.split_packed import SplitPacked
from tests.passes.graphs import run

K, Q, KV, F = 16, 16, 8, 24


def _model(split_sizes=(F, F), slice_axis=2) -> ir.Model:
    rng = np.random.default_rng(0)
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(rng.standard_normal((K, Q + 2 * KV)).astype(np.float32), "w_qkv"),
             numpy_helper.from_array(rng.standard_normal((K, sum(split_sizes))).astype(np.float32), "w_gu"),
             i64("s0", [0]), i64("e0", [Q]), i64("e1", [Q + KV]), i64("e2", [2 ** 63 - 1]), i64("ax", [slice_axis]),
             i64("sizes", list(split_sizes))]
    nodes = [helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"]),
             helper.make_node("Slice", ["qkv", "s0", "e0", "ax"], ["q"]),
             helper.make_node("Slice", ["qkv", "e0", "e1", "ax"], ["k"]),
             helper.make_node("Slice", ["qkv", "e1", "e2", "ax"], ["v"]),
             helper.make_node("MatMul", ["x", "w_gu"], ["gu"]),
             helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=-1),
             helper.make_node("Concat", ["q", "k", "v", "g", "u"], ["y"], axis=-1)]
    width = Q + 2 * KV + sum(split_sizes)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, width])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))


def test_slices_and_split_become_one_matmul_each():
    model = _model()
    feed = {"x": np.random.default_rng(1).standard_normal((2, 5, K)).astype(np.float32)}
    ref = run(model, feed)[0]
    result = SplitPacked()(model)
    assert result.modified and result.stats.counts["matmuls_split"] == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") == 5 and "Slice" not in ops and "Split" not in ops
    widths = sorted(v.const_value.shape[1] for v in model.graph.initializers.values() if v.const_value.shape.rank() == 2)
    assert widths == [KV, KV, Q, F, F]
    np.testing.assert_allclose(run(model, feed)[0], ref, rtol=1e-6, atol=1e-6)


def test_a_slice_on_another_axis_leaves_the_projection_packed():
    model = _model(slice_axis=1)
    result = SplitPacked()(model)
    assert result.stats.counts.get("matmuls_split") == 1  # only the Split's projection
    assert sum(n.op_type == "Slice" for n in model.graph) == 3

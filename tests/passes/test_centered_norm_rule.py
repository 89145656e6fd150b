"""The centered-RMS-norm rule on a hand-built graph: SimplifiedLayerNormalization of x minus its
mean over the last axis (Cohere's LayerNorm after onnxscript's RMS rule) becomes
LayerNormalization with a zero bias, with the same outputs; a mean over another axis is left."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.checks.validate import make_session
from graphc.passes._fusion_rules import centered_norm


def _graph(axis: int = -1) -> ir.Model:
    scale = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["centered"]),
             helper.make_node("SimplifiedLayerNormalization", ["centered", "scale"], ["y"], axis=-1, epsilon=1e-5)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 16])],
        [numpy_helper.from_array(np.array([axis], np.int64), "axes"), numpy_helper.from_array(scale, "scale")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def test_becomes_layer_norm_with_zero_bias():
    model = _graph()
    x = (np.random.default_rng(0).standard_normal((2, 5, 16)) * 3 + 1.5).astype(np.float32)
    before = make_session(model).run(None, {"x": x})[0]
    assert centered_norm.rules.apply_to_model(model) == 1
    ops = [n.op_type for n in model.graph if n.op_type != "Constant"]
    assert ops == ["LayerNormalization"]
    (norm,) = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert norm.attributes.get_float("epsilon") == pytest.approx(1e-5)
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], before, rtol=1e-5, atol=1e-5)
    mean = x.mean(-1, keepdims=True)
    scale = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    ref = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(before, ref, rtol=1e-4, atol=1e-5)


def test_a_mean_over_another_axis_is_left_alone():
    assert centered_norm.rules.apply_to_model(_graph(axis=1)) == 0

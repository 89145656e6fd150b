"""The RMSNorm rule for opset-17 graphs (``ReduceMean`` axes as an attribute) on hand-built
graphs: structure, numerics, both Mul orders, and a norm over the wrong axis it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import rms_norm
from graphc.checks.validate import make_session

HIDDEN = 8


def _graph(*, axis: int = -1, scale_first: bool = False) -> ir.Model:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), "scale")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[axis], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["normed"]),
             helper.make_node("Mul", ["scale", "normed"] if scale_first else ["normed", "scale"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("scale_first", [False, True])
def test_fuses_to_simplified_layer_norm(scale_first):
    model = _graph(scale_first=scale_first)
    x = np.random.default_rng(1).standard_normal((2, 3, HIDDEN)).astype(np.float32) * 4
    before = make_session(model).run(None, {"x": x})[0]
    assert rms_norm.rules.apply_to_model(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization"]
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    assert not [n for n in model.graph if n.op_type in ("ReduceMean", "Reciprocal")]
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], before, rtol=1e-5, atol=1e-5)


def test_a_mean_over_another_axis_is_left_alone():
    assert rms_norm.rules.apply_to_model(_graph(axis=1)) == 0

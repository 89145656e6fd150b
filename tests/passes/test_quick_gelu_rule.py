"""The QuickGelu rule (CLIP's quick_gelu) on hand-built graphs: structure, numerics, and a
SiLU (``x * Sigmoid(x)``) it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import quick_gelu
from graphc.checks.validate import make_session


def _graph(*, scaled: bool = True, x_first: bool = True) -> ir.Model:
    nodes = [helper.make_node("Mul", ["x", "alpha"] if x_first else ["alpha", "x"], ["xs"]),
             helper.make_node("Sigmoid", ["xs" if scaled else "x"], ["s"]),
             helper.make_node("Mul", ["x", "s"] if x_first else ["s", "x"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(1.702, np.float32), "alpha")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("x_first", [True, False])
def test_fuses_to_quick_gelu_with_alpha(x_first):
    model = _graph(x_first=x_first)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32) * 3
    before = make_session(model).run(None, {"x": x})[0]
    assert quick_gelu.rules.apply_to_model(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "QuickGelu"]
    assert node.domain == "com.microsoft" and node.attributes["alpha"].value == pytest.approx(1.702)
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], before, rtol=1e-5, atol=1e-6)


def test_silu_is_left_alone():
    model = _graph(scaled=False)
    assert quick_gelu.rules.apply_to_model(model) == 0

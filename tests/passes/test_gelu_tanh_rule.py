"""The half-x-first tanh-Gelu rule (GPT-2's gelu_new) on hand-built graphs: structure,
numerics, and a near miss (another cubic coefficient) it must leave alone."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import gelu_tanh
from graphc.checks.validate import make_session


def _graph(*, cubic: float = 0.044715, swap: bool = False) -> ir.Model:
    consts = {"three": 3.0, "cubic": cubic, "scale": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["p"]),
        helper.make_node("Mul", ["p", "cubic"] if not swap else ["cubic", "p"], ["pc"]),
        helper.make_node("Add", ["x", "pc"], ["inner"]),
        helper.make_node("Mul", ["inner", "scale"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["t"]),
        helper.make_node("Add", ["t", "one"] if not swap else ["one", "t"], ["t1"]),
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        helper.make_node("Mul", ["hx", "t1"] if not swap else ["t1", "hx"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("swap", [False, True])
def test_fuses_to_fast_gelu(swap):
    model = _graph(swap=swap)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32) * 2
    before = make_session(model).run(None, {"x": x})[0]
    assert gelu_tanh.rules.apply_to_model(model) == 1
    assert [(n.op_type, n.domain) for n in model.graph] == [("FastGelu", "com.microsoft")]
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], before, rtol=1e-5, atol=1e-6)


def test_other_cubic_coefficient_is_left_alone():
    model = _graph(cubic=0.04)
    assert gelu_tanh.rules.apply_to_model(model) == 0 and "Tanh" in [n.op_type for n in model.graph]

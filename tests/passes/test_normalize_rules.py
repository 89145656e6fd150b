"""The canonicalizations before fusion on hand-built graphs: each rewrites to the shape the
fusion rules expect and computes the same values; the look-alikes they must leave alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.checks.validate import make_session
from graphc.passes._fusion_rules import normalize

X = np.array([[1.0, -2.0, np.nan, 4.0], [0.5, 8.0, -1.0, 2.0]], np.float32)


def _model(nodes, inits, out_shape=(2, 4)) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def _same_values(model, rewrites: int):
    before = make_session(model).run(None, {"x": X})[0]
    assert normalize.rules.apply_to_model(model) == rewrites
    np.testing.assert_allclose(make_session(model).run(None, {"x": X})[0], before, rtol=1e-6, equal_nan=True)
    return model


def test_one_element_nan_fill_becomes_a_scalar():
    model = _same_values(_model([helper.make_node("IsNaN", ["x"], ["bad"]),
                                 helper.make_node("Where", ["bad", "fill", "x"], ["y"])],
                                {"fill": np.zeros(1, np.float32)}), 1)
    (where,) = [n for n in model.graph if n.op_type == "Where"]
    assert where.inputs[1].const_value.shape == ()


@pytest.mark.parametrize("one,rewrites", [(1.0, 1), (2.0, 0)])
def test_div_of_one_becomes_reciprocal(one, rewrites):
    model = _same_values(_model([helper.make_node("Div", ["one", "x"], ["y"])], {"one": np.array(one, np.float32)}),
                         rewrites)
    assert [n.op_type for n in model.graph] == (["Reciprocal"] if rewrites else ["Div"])


def test_a_constant_first_in_add_goes_second():
    model = _same_values(_model([helper.make_node("Add", ["bias", "x"], ["y"])],
                                {"bias": np.arange(4, dtype=np.float32)}), 1)
    (add,) = [n for n in model.graph if n.op_type == "Add"]
    assert add.inputs[0].name == "x" and add.inputs[1].const_value is not None


def test_a_static_dim_read_from_the_shape_becomes_a_constant():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
             helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "df"], ["y"])]
    model = _same_values(_model(nodes, {"i": np.array(1, np.int64)}), 1)
    assert not [n for n in model.graph if n.op_type == "Shape"]

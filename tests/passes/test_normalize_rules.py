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


def _attention_scores(div: bool, bias_shape=(1, 2, 3, 3), mask_shape=(2, 1, 1, 3)) -> tuple[ir.Model, dict]:
    """softmax((q kᵀ) / s + bias + mask) with q, k [2, 2, 3, 4] (MPNet's relative position bias
    added before the padding mask)."""
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 2, 3, 4)).astype(np.float32) for n in ("q", "k")}
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]),
             helper.make_node("Div" if div else "Mul", ["qk", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "bias"], ["biased"]),
             helper.make_node("Add", ["biased", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    inits = {"scale": np.array(2.0 if div else 0.5, np.float32),
             "bias": rng.standard_normal(bias_shape).astype(np.float32),
             "mask": np.where(rng.random(mask_shape) < 0.3, -1e4, 0).astype(np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2, 3, 4])
                                           for n in ("q", "k")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 3, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    import onnx_ir.passes.common as common

    common.ShapeInferencePass()(model)
    return model, feeds


@pytest.mark.parametrize("div", [True, False])
def test_position_bias_then_mask_becomes_one_additive_mask(div):
    model, feeds = _attention_scores(div)
    before = make_session(model).run(None, feeds)[0]
    assert normalize.rules.apply_to_model(model) == 1
    np.testing.assert_allclose(make_session(model).run(None, feeds)[0], before, rtol=1e-5, atol=1e-6)
    (outer,) = [n for n in model.graph if n.op_type == "Add" and n.outputs[0].uses()
                and n.outputs[0].uses()[0].node.op_type == "Softmax"]
    assert outer.inputs[0].producer().op_type == ("Div" if div else "Mul")  # the scores, then one mask
    assert outer.inputs[1].producer().op_type == "Add"


def test_scores_plus_a_lower_rank_bias_are_left_alone():
    model, _ = _attention_scores(True, bias_shape=(3, 3))
    assert normalize.rules.apply_to_model(model) == 0


def _norm(with_add: bool, stats_read: bool = False) -> ir.Model:
    nodes = ([helper.make_node("Add", ["x", "skip"], ["s"])] if with_add else []) + [
        helper.make_node("LayerNormalization", ["s" if with_add else "x", "gamma"],
                         ["y", "mean"] if stats_read else ["y"], axis=-1, epsilon=1e-5)]
    inits = {"gamma": np.linspace(0.5, 1.5, 4).astype(np.float32), "skip": np.ones((2, 4), np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]
                              + ([helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)] if stats_read else []),
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                        ir_version=8))


def test_a_bias_free_norm_after_an_add_gets_a_zero_bias():
    x = {"x": np.nan_to_num(X)}
    model = _norm(with_add=True)
    before = make_session(model).run(None, x)[0]
    assert normalize.rules.apply_to_model(model) == 1
    np.testing.assert_array_equal(make_session(model).run(None, x)[0], before)  # adding 0 is exact
    (norm,) = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert len(norm.inputs) == 3 and not norm.inputs[2].const_value.numpy().any()
    assert norm.attributes.get_float("epsilon") == pytest.approx(1e-5)


@pytest.mark.parametrize("with_add, stats_read", [(False, False), (True, True)])
def test_bias_free_norms_without_a_skip_or_with_their_statistics_read_are_left_alone(with_add, stats_read):
    assert normalize.rules.apply_to_model(_norm(with_add, stats_read)) == 0

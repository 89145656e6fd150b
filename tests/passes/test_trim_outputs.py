import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphc.passes.trim_outputs import TrimUnusedOutputs
from tests.passes.graphs import run


def _skip_ln(use_sum: bool) -> ir.Model:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), n) for n in ("g", "b")]
    outs = ["y", "mean", "inv_std", "sum"]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], outs, domain="com.microsoft", epsilon=1e-5)]
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])]
    if use_sum:
        nodes.append(helper.make_node("Relu", ["sum"], ["r"]))
        graph_outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3, 8]))
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8]) for n in ("x", "s")],
        graph_outputs, inits,
    )
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ir.serde.deserialize_model(p)


def _feed():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "s": rng.standard_normal((2, 3, 8)).astype(np.float32)}


def test_unused_outputs_dropped_numerics_exact():
    model = _skip_ln(use_sum=False)
    ref = run(model, _feed())
    result = TrimUnusedOutputs()(model)
    assert result.modified and result.stats.counts["outputs_dropped"] == 3
    (node,) = list(model.graph)
    assert len(node.outputs) == 1 and node.outputs[0].name == "y"
    np.testing.assert_array_equal(run(model, _feed())[0], ref[0])


def test_used_trailing_output_keeps_its_place_and_the_unused_before_it_go_unnamed():
    model = _skip_ln(use_sum=True)
    ref = run(model, _feed())
    result = TrimUnusedOutputs()(model)
    assert result.modified and result.stats.counts["outputs_unnamed"] == 2
    (node, _) = list(model.graph)
    assert [o.name for o in node.outputs] == ["y", "", "", "sum"]
    saved = ir.serde.serialize_model(model)
    assert list(saved.graph.node[0].output) == ["y", "", "", "sum"]  # absent optional outputs in the file
    for a, b in zip(run(model, _feed()), ref):
        np.testing.assert_array_equal(a, b)
    assert not TrimUnusedOutputs()(model).modified  # nothing left to drop

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphc.exporters.metadata import _namespace_scope
from graphc.passes.cleanup import CommonSubexpressions, CompactMetadata, FoldConstants, RemoveUnused
from tests.passes.graphs import run


def _foldable() -> ir.Model:
    a = numpy_helper.from_array(np.ones((4,), np.float32), "a")
    nodes = [
        helper.make_node("Add", ["a", "a"], ["two"]),  # constant: folds
        helper.make_node("Mul", ["x", "two"], ["y1"]),
        helper.make_node("Mul", ["x", "two"], ["y2"]),  # duplicate of y1: CSE
        helper.make_node("Add", ["y1", "y2"], ["y"]),
        helper.make_node("Neg", ["x"], ["dead"]),  # unused
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [a])
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(p)


def test_fold_cse_dead_code_exact():
    model = _foldable()
    feed = {"x": np.arange(4, dtype=np.float32)}
    ref = run(model, feed)
    assert FoldConstants()(model).modified
    CommonSubexpressions()(model)
    RemoveUnused()(model)
    ops = [n.op_type for n in model.graph]
    assert "Neg" not in ops and ops.count("Mul") <= 1
    np.testing.assert_array_equal(run(model, feed)[0], ref[0])


def test_remove_unused_negative_keeps_live_graph():
    model = _foldable()
    FoldConstants()(model)
    RemoveUnused()(model)
    assert not RemoveUnused()(model).modified


def test_compact_metadata_keeps_scope_drops_traces():
    model = _foldable()
    node = next(iter(model.graph))
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'm', 'm.encoder.layer.3', 'm.encoder.layer.3.output.dense', 'linear']"
    node.metadata_props["pkg.torch.onnx.stack_trace"] = "File x.py line 1" * 100
    model.metadata_props["pkg.torch.export.ExportedProgram.graph_signature"] = "..."
    result = CompactMetadata()(model)
    assert result.modified and result.stats.counts["nodes_compacted"] == 1
    assert dict(node.metadata_props) == {"graphc.scope": "m.encoder.layer.3.output.dense"}
    assert not model.metadata_props


def test_scope_from_namespace_fallback():
    ns = ": __main__.W/m.encoder.layer.0: BertLayer/m.encoder.layer.0.attention.self.query: Linear/linear: aten.linear.default"
    assert _namespace_scope(ns) == "m.encoder.layer.0.attention.self.query"

"""Rules gated by their output node's op type make the rewrites onnxscript's own rules make."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper


def _graph() -> onnx.ModelProto:
    """Chains several of onnxscript's default rules rewrite: Transpose∘Transpose, Reshape∘Reshape,
    Cast∘Cast, an identity Transpose, two Slices of one value (→ Split), and ops none touches."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["t2", "s1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
        helper.make_node("Cast", ["r2"], ["c1"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["c1"], ["c2"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["c2"], ["t3"], perm=[0, 1, 2]),
        helper.make_node("Slice", ["t3", "b0", "b4", "ax"], ["a"]),
        helper.make_node("Slice", ["t3", "b4", "b8", "ax"], ["b"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Mul", ["ra", "b"], ["y"]),
    ]
    inits = [
        helper.make_tensor("s1", TensorProto.INT64, [2], [6, 8]),
        helper.make_tensor("s2", TensorProto.INT64, [3], [2, 3, 8]),
        helper.make_tensor("b0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("b4", TensorProto.INT64, [1], [4]),
        helper.make_tensor("b8", TensorProto.INT64, [1], [8]),
        helper.make_tensor("ax", TensorProto.INT64, [1], [2]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _rewritten(rules) -> tuple[bytes, list[str]]:
    from onnxscript import rewriter

    model = ir.serde.deserialize_model(_graph())
    rewriter.RewritePass(rules)(model)
    proto = ir.serde.serialize_model(model)
    return proto.SerializeToString(deterministic=True), [n.op_type for n in proto.graph.node]


def test_gated_default_rules_rewrite_as_the_ungated_ones_and_try_fewer_nodes(monkeypatch):
    from onnxscript import rewriter
    from onnxscript.rewriter import _rewrite_rule

    from graphc.passes._optimizer import default_rules

    tries = {"n": 0}
    inner = _rewrite_rule.RewriteRule.try_rewrite

    def counted(self, *args, **kwargs):
        tries["n"] += 1
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(_rewrite_rule.RewriteRule, "try_rewrite", counted)
    plain, plain_ops = _rewritten(list(rewriter._DEFAULT_REWRITE_RULES))
    plain_tries, tries["n"] = tries["n"], 0
    gated, gated_ops = _rewritten(default_rules())
    assert gated == plain
    assert len(plain_ops) < 11 and plain_ops.count("Reshape") == 1  # the rules did rewrite
    assert tries["n"] < plain_tries / 2  # the matcher saw only nodes of each rule's output op
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)}
    import onnxruntime as ort

    for model in (_graph(), onnx.load_from_string(gated)):
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_array_equal(out, np.maximum(feeds["x"][..., :4], 0) * feeds["x"][..., 4:])

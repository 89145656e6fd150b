import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphc.passes.tie_head import TieHead
from tests.passes.graphs import run


def _lm(head: np.ndarray, table: np.ndarray) -> ir.Model:
    """ids -> Gather(table) -> MatMul(head): an LM whose head is its own initializer."""
    v, h = table.shape
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "head"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, v])],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def _table(v=300, h=24):
    return np.random.default_rng(0).standard_normal((v, h)).astype(np.float32)


def test_transposed_copy_of_the_table_is_tied_again():
    table = _table()
    model = _lm(np.ascontiguousarray(table.T), table)
    feed = {"ids": np.array([[3, 7, 299, 0]], np.int64)}
    ref = run(model, feed)[0]
    result = TieHead()(model)
    assert result.modified and result.stats.counts["heads_tied"] == 1
    assert result.stats.counts["bytes_freed"] == table.nbytes
    assert list(model.graph.initializers) == ["table"]  # the copy is gone
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1].producer().op_type == "Transpose"
    np.testing.assert_array_equal(run(model, feed)[0], ref)


def test_a_head_that_differs_by_one_ulp_stays_its_own():
    table = _table()
    head = np.ascontiguousarray(table.T)
    head[5, 123] = np.nextafter(head[5, 123], np.float32(np.inf))
    model = _lm(head, table)
    result = TieHead()(model)
    assert not result.modified and sorted(model.graph.initializers) == ["head", "table"]
    assert any("no MatMul weight" in n for n in result.stats.notes)

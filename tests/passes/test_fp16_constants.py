import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphc.passes.fp16_constants import Fp16Constants
from tests.passes.graphs import run


def _model(bias: np.ndarray) -> ir.Model:
    scalar = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Add", ["x", "b"], ["y0"]), helper.make_node("Mul", ["y0", "two"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, bias.size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, bias.size])],
                          [numpy_helper.from_array(bias, "b"), scalar])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def test_vector_stored_as_fp16_behind_cast_and_close():
    bias = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    model = _model(bias)
    feed = {"x": np.ones((3, 64), np.float32)}
    ref = run(model, feed)[0]
    result = Fp16Constants()(model)
    assert result.stats.counts == {"constants_converted": 1, "bytes_saved": 128}
    inits = model.graph.initializers
    assert inits["b_fp16"].const_value.dtype == ir.DataType.FLOAT16
    assert inits["two"].const_value.dtype == ir.DataType.FLOAT  # scalars stay
    assert [n.op_type for n in model.graph][0] == "Cast"
    np.testing.assert_allclose(run(model, feed)[0], ref, rtol=1e-3, atol=1e-3)


def test_out_of_range_values_stay_float32():
    bias = np.full(32, 1e6, np.float32)
    model = _model(bias)
    result = Fp16Constants()(model)
    assert not result.modified and "float16 range" in result.stats.skipped[0]["reason"]


def test_values_losing_precision_stay_float32():
    bias = np.linspace(1000.0, 1000.9, 32).astype(np.float32)  # fp16 spacing at 1000 is 0.5
    bias[0] = 1e-3
    model = _model(bias)
    assert not Fp16Constants(Fp16Constants.Options(max_rel_error=1e-5))(model).modified

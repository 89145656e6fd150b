"""A Reshape to the shape its input has (computed at run time), dropped after the fusions so that
the Transposes around it cancel; any other Reshape kept."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx import TensorProto, helper

from graphc.checks.validate import make_session
from graphc.passes._fusion_rules import identity_reshape


def _model(swap_dims: bool) -> ir.Model:
    """y = Transpose(Reshape(Transpose(x), Concat(Shape(x')...))) with x [b, s, 4, 8]; the middle
    Reshape targets the Transpose's own shape, or (``swap_dims``) [b, s, 4, 8] in another order."""
    dims = [("b", 0, 1), ("h", 2, 3), ("s", 1, 2), ("d", 3, 4)]
    if swap_dims:
        dims[1], dims[2] = dims[2], dims[1]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3])]
    for name, start, end in dims:
        nodes.append(helper.make_node("Shape", ["x"], [f"d_{name}"], start=start, end=end))
    nodes += [helper.make_node("Concat", [f"d_{n}" for n, _, _ in dims], ["shape"], axis=0),
              helper.make_node("Reshape", ["t", "shape"], ["r"]),
              helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                         ir_version=8))
    common.ShapeInferencePass()(model)
    return model


def test_a_reshape_to_its_own_shape_is_dropped():
    model = _model(swap_dims=False)
    x = {"x": np.random.default_rng(0).standard_normal((2, 5, 4, 8)).astype(np.float32)}
    before = make_session(model).run(None, x)[0]
    assert identity_reshape.apply(model) == 1
    assert not [n for n in model.graph if n.op_type in ("Reshape", "Identity")]
    np.testing.assert_array_equal(make_session(model).run(None, x)[0], before)


def test_a_reshape_that_moves_data_is_kept():
    model = _model(swap_dims=True)  # [b, 4, s, 8] to [b, s, 4, 8]: not the identity
    assert identity_reshape.apply(model) == 0
    assert [n for n in model.graph if n.op_type == "Reshape"]

"""The Reshape-Gemm-Reshape → MatMul rule (GPT-2's Conv1D) on hand-built graphs with symbolic
batch and sequence: structure, exact numerics, and the cases it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import gemm_matmul
from graphc.checks.validate import make_session

K, N, H = 8, 12, 2


def _graph(*, rank4: bool = False, bias: bool = True, trans_b: int = 0, alpha: float = 1.0,
           out_width: int = N) -> ir.Model:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, K], np.int64), "flat"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "c")]
    x_shape = ["batch", "seq", H, K // H] if rank4 else ["batch", "seq", K]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "c"] if bias else ["x2", "w"], ["g"], transB=trans_b, alpha=alpha),
        # the view back to (batch, seq, N), its shape read from x as the exporters write it
        helper.make_node("Shape", ["x"], ["xs"], end=2),
        helper.make_node("Concat", ["xs", "n"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["g", "out_shape"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([out_width], np.int64), "n"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", out_width])], inits,
        value_info=[helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch*seq", K]),
                    helper.make_tensor_value_info("g", TensorProto.FLOAT, ["batch*seq", N])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("rank4", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_becomes_matmul_on_the_unflattened_input(rank4, bias, trans_b):
    model = _graph(rank4=rank4, bias=bias, trans_b=trans_b)
    x = np.random.default_rng(1).standard_normal((3, 5, H, K // H) if rank4 else (3, 5, K)).astype(np.float32)
    before = _run(model, x)
    assert gemm_matmul.rules.apply_to_model(model) == 1
    ops = _ops(model)
    assert "Gemm" not in ops and "MatMul" in ops and ("Add" in ops) == bias
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[0].shape is not None and len(matmul.inputs[0].shape) == 3  # (B, S, K)
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


def test_alpha_is_left_alone():
    model = _graph(alpha=0.5)
    assert gemm_matmul.rules.apply_to_model(model) == 0 and "Gemm" in _ops(model)


def test_output_that_is_not_the_inputs_leading_dims_is_left_alone():
    model = _graph()
    # the value after the Gemm is reshaped to something else than (batch, seq, N)
    model.graph.outputs[0].shape = ir.Shape(["batch", "other", N])
    assert gemm_matmul.rules.apply_to_model(model) == 0 and "Gemm" in _ops(model)

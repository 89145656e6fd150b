"""gemm-to-matmul: every Gemm form with a constant weight becomes MatMul [+ Add], same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.checks.validate import make_session
from graphc.core.pass_base import PassStats
from graphc.passes.gemm_to_matmul import GemmToMatMul


def _gemm(trans_b=0, alpha=1.0, beta=1.0, bias="const", trans_a=0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    k, n = 12, 7
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, "m"] if trans_a else ["m", k])]
    if bias == "const":
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"))
        inputs.append("C")
    elif bias == "input":
        graph_inputs.append(helper.make_tensor_value_info("C", TensorProto.FLOAT, [n]))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="dense", transB=trans_b, transA=trans_a, alpha=alpha, beta=beta)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds(model: ir.Model):
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((5, 12)).astype(np.float32)}
    if any(v.name == "C" for v in model.graph.inputs):
        feeds["C"] = rng.standard_normal(7).astype(np.float32)
    return feeds


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [
    (0, 1.0, 1.0, "const"), (1, 1.0, 1.0, "const"), (1, 0.5, 2.0, "const"), (0, 1.0, 1.0, None),
    (1, 1.0, 1.0, "input"), (0, 2.0, 1.0, "input"),
])
def test_gemm_becomes_matmul_with_the_same_outputs(trans_b, alpha, beta, bias):
    model = ir.serde.deserialize_model(_gemm(trans_b, alpha, beta, bias))
    feeds = _feeds(model)
    ref = make_session(model).run(None, feeds)[0]
    stats = PassStats()
    assert GemmToMatMul().run(model, stats)
    ops = [n.op_type for n in model.graph]
    assert ops == (["MatMul", "Add"] if bias else ["MatMul"]) and stats.counts["gemms_rewritten"] == 1
    assert model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(make_session(model).run(None, feeds)[0], ref, rtol=1e-5, atol=1e-5)


def test_gemms_it_cannot_express_stay_with_reasons():
    model = ir.serde.deserialize_model(_gemm(trans_a=1))
    stats = PassStats()
    assert not GemmToMatMul().run(model, stats)
    assert stats.skipped == [{"node": "dense", "reason": "Gemm with transA=1"}]
    model = ir.serde.deserialize_model(_gemm(beta=2.0, bias="input"))
    stats = PassStats()
    assert not GemmToMatMul().run(model, stats)
    assert "beta" in stats.skipped[0]["reason"]


def _gemm_mlp(tmp_path) -> str:
    """x [m, 64] → Gemm (transB) → Relu → Gemm → y: a dense net as tf2onnx or Paddle write it."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.standard_normal((128, 64)) * 0.1).astype(np.float32), "fc1.w"),
             numpy_helper.from_array(np.zeros(128, np.float32), "fc1.b"),
             numpy_helper.from_array((rng.standard_normal((128, 32)) * 0.1).astype(np.float32), "fc2.w")]
    nodes = [helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "fc2.w"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 32])], inits)
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return str(path)


def test_the_planner_and_int4_quantize_gemm_layers(tmp_path, capsys):
    import json

    import graphc
    from graphc.front.cli import main

    path = _gemm_mlp(tmp_path)
    assert main(["compress", path, "-o", str(tmp_path / "plan.onnx"), "--max-error", "0.02", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert not any(e["op"] == "Gemm" for e in planned["left_float"])
    decisions = next(r for r in planned["passes"] if r["name"] == "plan")["stats"]["plan"]["decisions"]
    assert len([d for d in decisions if d["unit"].startswith("quant:")]) == 2  # both former Gemms planned
    # structure only (4-bit random weights of a toy net miss the int4 gate)
    graphc.compress(path, tmp_path / "int4.onnx", recipe="int4", force=True)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops

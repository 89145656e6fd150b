"""Tiny hand-built graphs for structural and numeric pass tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits, opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def mlp(seed: int = 0, k: int = 32, n: int = 48, shared_input: bool = True) -> ir.Model:
    """x[B,S,K] → MatMul(W1) + b → Relu → MatMul(W2); plus a second MatMul on x (shared input)
    and an activation×activation MatMul that must not be quantized."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": rng.standard_normal((k, n)).astype(np.float32) * 0.2,
        "b1": rng.standard_normal(n).astype(np.float32) * 0.1,
        "W2": rng.standard_normal((n, k)).astype(np.float32) * 0.2,
        "W3": rng.standard_normal((k, k)).astype(np.float32) * 0.2,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
        helper.make_node("MatMul", ["x" if shared_input else "y", "W3"], ["z"], name="fc3"),
        helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["z", "zt"], ["scores"], name="act_act"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", k]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "seq", "seq"]),
        ],
        inits,
    )


def gemm(seed: int = 0, trans_b: int = 1, alpha: float = 0.5, beta: float = 2.0) -> ir.Model:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, 16) if trans_b else (16, 24)).astype(np.float32)
    c = rng.standard_normal(24).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])],
        {"W": w, "C": c},
    )


def embedding(seed: int = 0, vocab: int = 200, dim: int = 16, small_rows: int = 2) -> ir.Model:
    rng = np.random.default_rng(seed)
    inits = {
        "table": rng.standard_normal((vocab, dim)).astype(np.float32),
        "types": rng.standard_normal((small_rows, dim)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="word_emb"),
        helper.make_node("Gather", ["types", "tt"], ["t"], name="type_emb"),
        helper.make_node("Add", ["e", "t"], ["y"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("tt", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        inits,
    )


def run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def ops_of(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rotary_angles(half: int = 32) -> tuple[ir.Model, np.ndarray]:
    """cos(positions [N, 1] @ inv_freq [1, half]): the rotary cache fuse-ort builds (an outer
    product that quantizers must leave in float)."""
    freq = (1.0 / 10000 ** (np.arange(half) / half)).astype(np.float32).reshape(1, half)
    nodes = [helper.make_node("MatMul", ["pos", "inv_freq"], ["angles"], name="rotary_angles"),
             helper.make_node("Cos", ["angles"], ["cos"])]
    model = _model(nodes, [helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["n", 1])],
                   [helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["n", half])], {"inv_freq": freq})
    return model, freq

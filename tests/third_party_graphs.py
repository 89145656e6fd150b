"""Tiny graphs in the styles of exporters other than graphc's: Paddle (``-1`` dims,
``conv2d_0.w_0`` names, weights in Constant nodes), tf2onnx (``model/dense/MatMul`` names,
one-hot inputs), ``If`` branches holding weights, custom-domain ops, GRU, Conv + BatchNorm.
Each builder returns the ModelProto; tests save it and run graphc on the file."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _finish(nodes, inputs, outputs, inits, opset=13, extra_opsets=(), ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def paddle_conv(seed: int = 0, channels: int = 16, classes: int = 4, bn: bool = True) -> onnx.ModelProto:
    """Paddle-style classifier: x[-1, 3, ?, ?] → conv2d_0 (+ batch_norm_0) → relu → conv2d_1 →
    global pool → flatten → linear_0 (MatMul + Add) → softmax; the first conv's weight in a
    Constant node (as Paddle's exporter writes some), dims written as -1."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
    w1 = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
    inits = {
        "conv2d_1.w_0": w1,
        "conv2d_1.b_0": (rng.standard_normal(channels) * 0.1).astype(np.float32),
        "linear_0.w_0": (rng.standard_normal((channels, classes)) * 0.3).astype(np.float32),
        "linear_0.b_0": (rng.standard_normal(classes) * 0.1).astype(np.float32),
    }
    nodes = [helper.make_node("Constant", [], ["conv2d_0.w_0"], value=numpy_helper.from_array(w0, "conv2d_0.w_0")),
             helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["conv2d_0.tmp_0"], name="conv2d_0", pads=[1, 1, 1, 1])]
    last = "conv2d_0.tmp_0"
    if bn:
        inits |= {
            "batch_norm_0.w_0": (1.0 + 0.2 * rng.standard_normal(channels)).astype(np.float32),
            "batch_norm_0.b_0": (0.1 * rng.standard_normal(channels)).astype(np.float32),
            "batch_norm_0.w_1": (0.1 * rng.standard_normal(channels)).astype(np.float32),
            "batch_norm_0.w_2": (0.5 + rng.random(channels)).astype(np.float32),
        }
        nodes.append(helper.make_node(
            "BatchNormalization", ["conv2d_0.tmp_0", "batch_norm_0.w_0", "batch_norm_0.b_0", "batch_norm_0.w_1",
                                   "batch_norm_0.w_2"], ["batch_norm_0.tmp_2"], name="batch_norm_0", epsilon=1e-5))
        last = "batch_norm_0.tmp_2"
    nodes += [
        helper.make_node("Relu", [last], ["relu_0.tmp_0"], name="relu_0"),
        helper.make_node("Conv", ["relu_0.tmp_0", "conv2d_1.w_0", "conv2d_1.b_0"], ["conv2d_1.tmp_1"], name="conv2d_1",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["conv2d_1.tmp_1"], ["pool2d_0.tmp_0"], name="pool2d_0"),
        helper.make_node("Flatten", ["pool2d_0.tmp_0"], ["flatten_0.tmp_0"], name="flatten_0"),
        helper.make_node("MatMul", ["flatten_0.tmp_0", "linear_0.w_0"], ["linear_0.tmp_0"], name="linear_0"),
        helper.make_node("Add", ["linear_0.tmp_0", "linear_0.b_0"], ["linear_0.tmp_1"], name="linear_0.add"),
        helper.make_node("Softmax", ["linear_0.tmp_1"], ["softmax_0.tmp_0"], name="softmax_0", axis=-1),
    ]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])],
        [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, [-1, classes])],
        inits, opset=11,
    )


def tf2onnx_onehot(seed: int = 0, vocab: int = 64, width: int = 32, classes: int = 8) -> onnx.ModelProto:
    """tf2onnx-style: int32 byte ids [?, 16] → one-hot (Equal with a range) → MatMul with a
    [vocab, width] table → ReduceMax → Dense (MatMul named model/dense/MatMul). Inputs only
    use low ids, so most one-hot channels are zero on any calibration: a zero median."""
    rng = np.random.default_rng(seed)
    inits = {
        "model/embed/Const:0": (rng.standard_normal((vocab, width)) * 0.5).astype(np.float32),
        "model/dense/MatMul/ReadVariableOp:0": (rng.standard_normal((width, classes)) * 0.3).astype(np.float32),
        "range:0": np.arange(vocab, dtype=np.int32).reshape(1, 1, vocab),
        "axes:0": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("Unsqueeze", ["bytes", "axes:0"], ["model/unsq:0"], name="model/Unsqueeze"),
        helper.make_node("Equal", ["model/unsq:0", "range:0"], ["model/eq:0"], name="model/Equal"),
        helper.make_node("Cast", ["model/eq:0"], ["model/onehot:0"], name="model/Cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["model/onehot:0", "model/embed/Const:0"], ["model/embed/MatMul:0"],
                         name="model/embed/MatMul"),
        helper.make_node("ReduceMax", ["model/embed/MatMul:0"], ["model/pool:0"], name="model/ReduceMax", axes=[1],
                         keepdims=0),
        helper.make_node("MatMul", ["model/pool:0", "model/dense/MatMul/ReadVariableOp:0"], ["logits"],
                         name="model/dense/MatMul"),
    ]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["unk__1", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["unk__2", classes])],
        inits,
    )


def custom_domain(seed: int = 0) -> onnx.ModelProto:
    """x → MatMul → a custom ai.onnx.contrib op → MatMul: passes must leave the custom node alone."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((8, 64)).astype(np.float32), "w2": rng.standard_normal((64, 64)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("StringNormalizerLike", ["h"], ["c"], name="contrib_op", domain="ai.onnx.contrib", mode=b"\xff\x00"),
        helper.make_node("MatMul", ["c", "w2"], ["y"], name="fc2"),
    ]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        inits, extra_opsets=[("ai.onnx.contrib", 1)],
    )


def if_with_weights(seed: int = 0, k: int = 16, n: int = 24) -> onnx.ModelProto:
    """silero-style: an int64 ``sr`` input chooses between two branches, each a MatMul with its
    own weight held inside the branch (an initializer of the subgraph)."""
    rng = np.random.default_rng(seed)

    def branch(name: str) -> onnx.GraphProto:
        w = (rng.standard_normal((k, n)) * 0.3).astype(np.float32)
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}/MatMul")], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, f"{name}_w")])

    inits = {"sr16k": np.array(16000, np.int64)}
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="eq"),
        helper.make_node("If", ["is16k"], ["y"], name="choose", then_branch=branch("b16k"), else_branch=branch("b8k")),
    ]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits, opset=16,
    )


def gru(seed: int = 0, hidden: int = 32, width: int = 16) -> onnx.ModelProto:
    """x[seq, batch, width] → GRU (weights as initializers) → Y_h → Gemm head."""
    rng = np.random.default_rng(seed)
    inits = {
        "W": (rng.standard_normal((1, 3 * hidden, width)) * 0.3).astype(np.float32),
        "R": (rng.standard_normal((1, 3 * hidden, hidden)) * 0.3).astype(np.float32),
        "B": (rng.standard_normal((1, 6 * hidden)) * 0.1).astype(np.float32),
        "head_w": (rng.standard_normal((4, hidden)) * 0.3).astype(np.float32),
        "head_b": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B"], ["", "h"], name="encoder/gru", hidden_size=hidden),
        helper.make_node("Squeeze", ["h"], ["h2"], name="squeeze", axes=[0]),
        helper.make_node("Gemm", ["h2", "head_w", "head_b"], ["y"], name="head", transB=1),
    ]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits, opset=11,
    )


def lstm(seed: int = 0, hidden: int = 32, width: int = 16, direction: str = "bidirectional",
         layout: int = 0, peepholes: bool = True) -> onnx.ModelProto:
    """x[seq, batch, width] (or [batch, seq, width] with ``layout=1``) → LSTM (weights, bias
    and peepholes as initializers, the initial state as an input) → Y → ReduceMean over time →
    Gemm head. The layers an older torch exporter writes for ``nn.LSTM``."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    inits = {
        "W": (rng.standard_normal((d, 4 * hidden, width)) * 0.3).astype(np.float32),
        "R": (rng.standard_normal((d, 4 * hidden, hidden)) * 0.2).astype(np.float32),
        "B": (rng.standard_normal((d, 8 * hidden)) * 0.1).astype(np.float32),
        "head_w": (rng.standard_normal((4, d * hidden)) * 0.3).astype(np.float32),
        "head_b": np.zeros(4, np.float32),
    }
    inputs = ["x", "W", "R", "B", "", "h0", ""]
    if peepholes:
        inits["P"] = (rng.standard_normal((d, 3 * hidden)) * 0.1).astype(np.float32)
        inputs.append("P")
    time_axis = 1 if layout else 0
    nodes = [
        helper.make_node("LSTM", inputs, ["y", "h", "c"], name="/encoder/lstm/LSTM", hidden_size=hidden,
                         direction=direction, layout=layout),
        # Y: [seq, D, batch, H] (layout 0) or [batch, seq, D, H] (layout 1)
        helper.make_node("ReduceMean", ["y"], ["pooled"], name="pool", axes=[time_axis], keepdims=0),
        helper.make_node("Transpose", ["pooled"], ["pooled_t"], name="to_batch", perm=[1, 0, 2] if not layout else [0, 1, 2]),
        helper.make_node("Flatten", ["pooled_t"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["out"], name="head", transB=1),
    ]
    h0_shape = ["batch", d, hidden] if layout else [d, "batch", hidden]
    x_shape = ["batch", "seq", width] if layout else ["seq", "batch", width]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, h0_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, h0_shape)],
        inits, opset=14,
    )


def if_with_lstms(seed: int = 0, hidden: int = 32, width: int = 16, const_cond: bool = False) -> onnx.ModelProto:
    """silero-vad's layout: x[seq, 1, width], sr[] → If(sr == 16000) with an LSTM in each
    branch, both reading weights held in the main graph (outer scope) → y. With
    ``const_cond`` the condition is a constant (an exporter's leftover: folding keeps one
    branch)."""
    rng = np.random.default_rng(seed)
    inits = {}
    for tag in ("a", "b"):
        inits[f"W_{tag}"] = (rng.standard_normal((1, 4 * hidden, width)) * 0.3).astype(np.float32)
        inits[f"R_{tag}"] = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.2).astype(np.float32)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("LSTM", ["x", f"W_{tag}", f"R_{tag}"], ["", f"h_{tag}"], name=f"rnn_{tag}/LSTM",
                              hidden_size=hidden)],
            f"branch_{tag}", [], [helper.make_tensor_value_info(f"h_{tag}", TensorProto.FLOAT, [1, 1, hidden])])

    if const_cond:
        inits["sixteen_k"] = np.array(True)
        cond = []
    else:
        inits["k16"] = np.array(16000, np.int64)
        cond = [helper.make_node("Equal", ["sr", "k16"], ["sixteen_k"], name="is_16k")]
    nodes = [*cond, helper.make_node("If", ["sixteen_k"], ["y"], name="by_rate",
                                     then_branch=branch("a"), else_branch=branch("b"))]
    return _finish(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 1, width]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, hidden])],
        inits, opset=14,
    )


def save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)

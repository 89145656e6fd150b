"""The interleaved-rotary rule on hand-built graphs in the form transformers' Cohere exports
(angles repeated pairwise, pairs rotated by Slice step 2 / Neg / stack): ONNX Runtime's
RotaryEmbedding with ``interleaved = 1`` and its caches, checked against numpy; the half-split
form and a stride other than 2 are left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.checks.validate import make_session
from graphc.passes._fusion_rules import interleaved_rotary

B, H, S, D = 2, 3, 5, 8
BIG = np.iinfo(np.int64).max


def _graph(*, step: int = 2, dynamic_shapes: bool = True) -> ir.Model:
    half = D // 2
    inv_freq = (1.0 / (10000 ** (np.arange(half) / half))).astype(np.float32)
    c = {  # constants
        "at2": [2], "at3": [3], "pair": [1, 1, 1, 2], "last": [-1], "one": [1], "zero": [0], "big": [BIG],
        "step": [step], "emb_shape": [B, S, D], "rot_shape": [B, H, S, D], "d": [D],
    }
    nodes = [helper.make_node("Unsqueeze", ["position_ids", "at2"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["posf", "inv_freq"], ["freqs"]),
             helper.make_node("Unsqueeze", ["freqs", "at3"], ["f4"]),
             helper.make_node("Expand", ["f4", "pair"], ["f4x2"])]
    if dynamic_shapes:  # as the KV-cache export writes them: from the values' own shapes
        nodes += [helper.make_node("Shape", ["freqs"], ["lead"], start=0, end=-1),
                  helper.make_node("Concat", ["lead", "last"], ["emb_dyn"], axis=0),
                  helper.make_node("Shape", ["x"], ["bhs"], start=0, end=3),
                  helper.make_node("Concat", ["bhs", "d"], ["rot_dyn"], axis=0)]
    emb_shape, rot_shape = ("emb_dyn", "rot_dyn") if dynamic_shapes else ("emb_shape", "rot_shape")
    nodes += [helper.make_node("Reshape", ["f4x2", emb_shape], ["emb"]),
              helper.make_node("Cos", ["emb"], ["cos0"]), helper.make_node("Sin", ["emb"], ["sin0"]),
              helper.make_node("Unsqueeze", ["cos0", "one"], ["cos"]),
              helper.make_node("Unsqueeze", ["sin0", "one"], ["sin"]),
              helper.make_node("Slice", ["x", "one", "big", "at3", "step"], ["odd"]),
              helper.make_node("Slice", ["x", "zero", "big", "at3", "step"], ["even"]),
              helper.make_node("Neg", ["odd"], ["neg"]),
              helper.make_node("Unsqueeze", ["neg", "last"], ["neg5"]),
              helper.make_node("Unsqueeze", ["even", "last"], ["even5"]),
              helper.make_node("Concat", ["neg5", "even5"], ["pairs"], axis=-1),
              helper.make_node("Reshape", ["pairs", rot_shape], ["rot"]),
              helper.make_node("Mul", ["x", "cos"], ["xc"]),
              helper.make_node("Mul", ["rot", "sin"], ["rs"]),
              helper.make_node("Add", ["xc", "rs"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H, S, D]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, S, D])],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in c.items()]
        + [numpy_helper.from_array(inv_freq, "inv_freq")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    import onnx_ir.passes.common as common

    common.ShapeInferencePass()(model)
    return model


def _reference(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    half = D // 2
    inv_freq = 1.0 / (10000 ** (np.arange(half) / half))
    angles = np.repeat(positions[:, None, :, None] * inv_freq, 2, axis=-1)  # [B, 1, S, D], pairwise
    rotated = np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * np.cos(angles) + rotated * np.sin(angles)


@pytest.mark.parametrize("dynamic_shapes", [True, False])
def test_becomes_ort_interleaved_rotary_with_its_caches(dynamic_shapes):
    model = _graph(dynamic_shapes=dynamic_shapes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, S, D)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int64)  # the second row after a past of 7
    np.testing.assert_allclose(make_session(model).run(None, {"x": x, "position_ids": positions})[0],
                               _reference(x, positions), rtol=1e-4, atol=1e-5)  # the hand-built graph is right
    assert interleaved_rotary.apply(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert node.domain == "com.microsoft" and node.attributes["interleaved"].as_int() == 1
    assert node.attributes["num_heads"].as_int() == H
    assert not [n for n in model.graph if n.op_type in ("Neg", "Slice")]  # the primitive form is gone
    model.opset_imports["com.microsoft"] = 1
    got = make_session(model).run(None, {"x": x, "position_ids": positions})[0]
    np.testing.assert_allclose(got, _reference(x, positions), rtol=1e-4, atol=1e-5)


def test_other_strides_are_left_alone():
    assert interleaved_rotary.apply(_graph(step=3)) == 0

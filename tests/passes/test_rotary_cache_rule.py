"""The transformers-5 cos/sin cache rule on hand-built graphs: onnxscript's intermediate
rotary op with broadcast caches becomes ONNX Runtime's RotaryEmbedding with caches computed
in the graph (numerics against a numpy rotate-half rotary), and partial rotary is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import rotary_cache
from graphc.checks.validate import make_session

B, H, S, D = 2, 3, 5, 8


def _graph(*, half: int = D // 2, cast: bool = True) -> ir.Model:
    inv_freq = (1.0 / (10000 ** (np.arange(half) / half))).astype(np.float32).reshape(1, 1, half)
    nodes = [helper.make_node("Unsqueeze", ["position_ids", "axes"], ["pos"])]
    pos = "pos"
    if cast:
        nodes.append(helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT))
        pos = "posf"
    nodes += [helper.make_node("Mul", [pos, "inv_freq"], ["freqs"]),
              helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
              helper.make_node("Cos", ["emb"], ["cos0"]), helper.make_node("Sin", ["emb"], ["sin0"]),
              helper.make_node("Unsqueeze", ["cos0", "one"], ["cos"]),
              helper.make_node("Unsqueeze", ["sin0", "one"], ["sin"]),
              helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], domain=rotary_cache.FUSION_DOMAIN,
                               interleaved=0, num_heads=H)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H, S, D]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, S, D])],
        [numpy_helper.from_array(np.array([2], np.int64), "axes"),
         numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(inv_freq, "inv_freq")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(rotary_cache.FUSION_DOMAIN, 1)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def _reference(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    half = D // 2
    inv_freq = 1.0 / (10000 ** (np.arange(half) / half))
    angles = positions[:, None, :, None] * inv_freq  # [B, 1, S, half]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("cast", [True, False])
def test_becomes_ort_rotary_with_caches_computed_in_the_graph(cast):
    model = _graph(cast=cast)
    assert rotary_cache.rules.apply_to_model(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert node.domain == "com.microsoft" and node.attributes["num_heads"].as_int() == H
    model.opset_imports["com.microsoft"] = 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, S, D)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int64)  # the second row after a past of 7
    got = make_session(model).run(None, {"x": x, "position_ids": positions})[0]
    np.testing.assert_allclose(got, _reference(x, positions), rtol=1e-4, atol=1e-5)


def test_partial_rotary_is_left_alone():
    assert rotary_cache.rules.apply_to_model(_graph(half=D // 4)) == 0

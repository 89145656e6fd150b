"""What fuse-ort counts as an unfused instance of a fusion family (its "misses"): a LayerNorm of an
embedding lookup plus positions is an EmbedLayerNorm candidate, one straight after the lookup
is not (the op needs a position table); a rotate-half or interleaved rotary left as primitive
ops is a rotary miss."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import misses

FAMILY = {f.name: f for f in misses.FAMILIES}


def _model(nodes, inputs, inits) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _embedding(with_positions: bool) -> ir.Model:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])
    nodes = [helper.make_node("Gather", ["words", "ids"], ["emb"])]
    x = "emb"
    if with_positions:
        nodes += [helper.make_node("Gather", ["positions", "pos_ids"], ["pos"]),
                  helper.make_node("Add", ["emb", "pos"], ["sum"])]
        x = "sum"
    nodes.append(helper.make_node("LayerNormalization", [x, "scale", "bias"], ["y"], axis=-1))
    table = np.zeros((10, 8), np.float32)
    return _model(nodes, [ids], {"words": table, "positions": table, "pos_ids": np.arange(4, dtype=np.int64)[None],
                                 "scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)})


def test_embed_layer_norm_needs_a_position_add():
    assert len(misses.anchors(_embedding(True), FAMILY["embed_layer_norm"])) == 1
    assert misses.anchors(_embedding(False), FAMILY["embed_layer_norm"]) == []


def test_interleaved_rotary_left_unfused_is_a_rotary_miss():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 8])
    c = {"one": np.array([1]), "zero": np.array([0]), "big": np.array([99]), "ax": np.array([3]),
         "two": np.array([2]), "last": np.array([-1]), "shape": np.array([1, 2, 3, 8])}
    nodes = [helper.make_node("Slice", ["x", "one", "big", "ax", "two"], ["odd"]),
             helper.make_node("Slice", ["x", "zero", "big", "ax", "two"], ["even"]),
             helper.make_node("Neg", ["odd"], ["neg"]),
             helper.make_node("Unsqueeze", ["neg", "last"], ["a"]),
             helper.make_node("Unsqueeze", ["even", "last"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["pairs"], axis=-1),
             helper.make_node("Reshape", ["pairs", "shape"], ["y"])]
    assert len(misses.anchors(_model(nodes, [x], c), FAMILY["rotary"])) == 1

"""The EmbedLayerNormalization rule on hand-built BERT embeddings: structure, numerics, the
variant without token types, and position ids it must not trust (not an arange, a slice that
does not start at 0)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import embed_layer_norm
from graphc.checks.validate import make_session

VOCAB, TYPES, POSITIONS, HIDDEN = 30, 2, 16, 8


def _graph(*, segments: bool = True, buffer: np.ndarray | None = None, start: int = 0) -> ir.Model:
    rng = np.random.default_rng(0)
    buffer = np.arange(POSITIONS, dtype=np.int64)[None] if buffer is None else buffer
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "word"),
             numpy_helper.from_array(rng.standard_normal((POSITIONS, HIDDEN)).astype(np.float32), "pos"),
             numpy_helper.from_array(buffer, "position_ids"),
             numpy_helper.from_array(np.array([start], np.int64), "start"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), "gamma"),
             numpy_helper.from_array((0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), "beta")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    nodes = [helper.make_node("Gather", ["word", "input_ids"], ["w"]),
             helper.make_node("Shape", ["input_ids"], ["seq_len"], start=1, end=2),
             helper.make_node("Slice", ["position_ids", "start", "seq_len", "axis1"], ["positions"]),
             helper.make_node("Gather", ["pos", "positions"], ["p"])]
    summed = "w"
    if segments:
        inits.append(numpy_helper.from_array(rng.standard_normal((TYPES, HIDDEN)).astype(np.float32), "seg"))
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]))
        nodes += [helper.make_node("Gather", ["seg", "token_type_ids"], ["t"]),
                  helper.make_node("Add", ["w", "t"], ["wt"])]
        summed = "wt"
    nodes += [helper.make_node("Add", [summed, "p"], ["e"]),
              helper.make_node("LayerNormalization", ["e", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _feed(segments: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feed = {"input_ids": rng.integers(0, VOCAB, (2, 5), dtype=np.int64)}
    if segments:
        feed["token_type_ids"] = rng.integers(0, TYPES, (2, 5), dtype=np.int64)
    return feed


@pytest.mark.parametrize("segments", [True, False])
def test_fuses_and_matches(segments):
    model = _graph(segments=segments)
    feed = _feed(segments)
    before = make_session(model).run(None, feed)[0]
    assert embed_layer_norm.rules.apply_to_model(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "EmbedLayerNormalization"]
    assert node.domain == "com.microsoft"
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-12)
    assert not [n for n in model.graph if n.op_type == "LayerNormalization"]
    np.testing.assert_allclose(make_session(model).run(None, feed)[0], before, rtol=1e-5, atol=1e-5)


def test_position_ids_that_are_not_an_arange_are_left_alone():
    model = _graph(buffer=np.arange(POSITIONS, dtype=np.int64)[None][:, ::-1].copy())
    assert embed_layer_norm.rules.apply_to_model(model) == 0


def test_a_slice_that_does_not_start_at_zero_is_left_alone():
    model = _graph(start=1)
    assert embed_layer_norm.rules.apply_to_model(model) == 0

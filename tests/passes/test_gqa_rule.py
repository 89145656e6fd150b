"""The untiled grouped-query attention rule on hand-built graphs: onnxscript's intermediate SDPA
over K/V tiled by transformers' ``repeat_kv`` becomes ONNX Runtime's GroupQueryAttention on the
untiled K/V, with the mask as its bias (numerics against numpy attention, padding in the mask);
attention whose heads are not grouped is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.passes._fusion_rules import gqa
from graphc.checks.validate import make_session

B, S, D = 2, 4, 16


def _graph(heads: int, kv_heads: int, *, mask: bool = True) -> ir.Model:
    group = heads // kv_heads
    nodes = []
    for name in ("key", "value"):
        nodes += [helper.make_node("Unsqueeze", [name, "two"], [f"{name}_5d"]),
                  helper.make_node("Expand", [f"{name}_5d", "tile"], [f"{name}_tiled"]),
                  helper.make_node("Reshape", [f"{name}_tiled", "bhsd"], [f"{name}_bhsd"])]
    nodes.append(helper.make_node("SDPA", ["query", "key_bhsd", "value_bhsd", *(["mask"] if mask else [])], ["y"],
                                  domain=gqa.FUSION_DOMAIN, key_format="BHSd"))
    inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, [B, heads, S, D]),
              helper.make_tensor_value_info("key", TensorProto.FLOAT, [B, kv_heads, S, D]),
              helper.make_tensor_value_info("value", TensorProto.FLOAT, [B, kv_heads, S, D])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, S, S]))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, heads, S, D])],
        [numpy_helper.from_array(np.array([2], np.int64), "two"),
         numpy_helper.from_array(np.array([B, kv_heads, group, S, D], np.int64), "tile"),
         numpy_helper.from_array(np.array([B, heads, S, D], np.int64), "bhsd")],
        value_info=[helper.make_tensor_value_info(f"{n}_tiled", TensorProto.FLOAT, [B, kv_heads, group, S, D])
                    for n in ("key", "value")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(gqa.FUSION_DOMAIN, 1)],
                              ir_version=8)
    return ir.serde.deserialize_model(proto)


def _attention(q, k, v, bias, group):
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + bias
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1)])
def test_tiled_sdpa_becomes_group_query_attention(heads, kv_heads):
    model = _graph(heads, kv_heads)
    assert gqa.rules.apply_to_model(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert node.domain == "com.microsoft"
    assert (node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()) == (heads, kv_heads)
    made = {v.name for n in model.graph for v in n.outputs}
    assert not made & {"key_tiled", "value_tiled"}  # K/V go in untiled
    model.opset_imports["com.microsoft"] = 1
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, heads, S, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, kv_heads, S, D)).astype(np.float32) for _ in range(2))
    bias = np.zeros((B, 1, S, S), np.float32)
    bias[1, :, :, :1] = np.finfo(np.float32).min  # the second row's first token is padding
    bias += np.triu(np.full((S, S), -np.inf, np.float32), 1).clip(np.finfo(np.float32).min)  # causal
    got = make_session(model).run(None, {"query": q, "key": k, "value": v, "mask": bias})[0]
    np.testing.assert_allclose(got[:, :, 1:], _attention(q, k, v, bias, heads // kv_heads)[:, :, 1:], rtol=1e-4, atol=1e-5)


def test_heads_that_are_not_grouped_are_left_alone():
    assert gqa.rules.apply_to_model(_graph(4, 4)) == 0

"""The KV-cache grouped-query attention rule on hand-built graphs: onnxscript's intermediate SDPA
over tiled presents (``Concat(past, new)``) becomes ONNX Runtime's GroupQueryAttention with past
and present in the op; attention output and presents match numpy (a left-padded row in the
mask, one decode step at batch 2); as many KV heads as query heads, untiled, the same with
``kv_num_heads = num_heads``; head sizes the kernel refuses and ungrouped tiles are left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.checks.validate import make_session
from graphc.passes._fusion_rules import gqa_kv

B, P, S = 2, 3, 1  # a decode step: ORT refuses several new tokens after a past at batch > 1


def _graph(heads: int, kv_heads: int, head: int = 16, *, tiled: bool = True) -> ir.Model:
    group, total = heads // kv_heads, P + S
    nodes = []
    for name in ("key", "value"):
        nodes.append(helper.make_node("Concat", [f"past_{name}", name], [f"present_{name}"], axis=2))
        if tiled:
            nodes += [helper.make_node("Unsqueeze", [f"present_{name}", "two"], [f"{name}_5d"]),
                      helper.make_node("Expand", [f"{name}_5d", "tile"], [f"{name}_tiled"]),
                      helper.make_node("Reshape", [f"{name}_tiled", "bhsd"], [f"{name}_bhsd"])]
    keys = ["key_bhsd", "value_bhsd"] if tiled else ["present_key", "present_value"]
    nodes.append(helper.make_node("SDPA", ["query", *keys, "mask"], ["y"],
                                  domain=gqa_kv.FUSION_DOMAIN, key_format="BHSd"))
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("query", f, [B, heads, S, head]),
              helper.make_tensor_value_info("past_key", f, [B, kv_heads, P, head]),
              helper.make_tensor_value_info("key", f, [B, kv_heads, S, head]),
              helper.make_tensor_value_info("past_value", f, [B, kv_heads, P, head]),
              helper.make_tensor_value_info("value", f, [B, kv_heads, S, head]),
              helper.make_tensor_value_info("mask", f, [B, 1, S, total])]
    outputs = [helper.make_tensor_value_info("y", f, [B, heads, S, head]),
               helper.make_tensor_value_info("present_key", f, [B, kv_heads, total, head]),
               helper.make_tensor_value_info("present_value", f, [B, kv_heads, total, head])]
    graph = helper.make_graph(
        nodes, "g", inputs, outputs,
        [numpy_helper.from_array(np.array([2], np.int64), "two"),
         numpy_helper.from_array(np.array([B, kv_heads, group, total, head], np.int64), "tile"),
         numpy_helper.from_array(np.array([B, heads, total, head], np.int64), "bhsd")],
        value_info=[helper.make_tensor_value_info(f"{n}_tiled", f, [B, kv_heads, group, total, head])
                    for n in ("key", "value")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(gqa_kv.FUSION_DOMAIN, 1)], ir_version=8)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("heads,kv_heads,tiled", [(4, 2, True), (3, 1, True), (4, 4, False)])
def test_attention_over_the_cache_becomes_group_query_attention(heads, kv_heads, tiled):
    head = 16
    model = _graph(heads, kv_heads, head, tiled=tiled)
    assert gqa_kv.rules.apply_to_model(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert node.domain == "com.microsoft" and not [n for n in model.graph if n.op_type == "Concat"]
    assert (node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")) == (heads, kv_heads)
    model.opset_imports["com.microsoft"] = 1
    rng = np.random.default_rng(0)
    feed = {"query": rng.standard_normal((B, heads, S, head)), "past_key": rng.standard_normal((B, kv_heads, P, head)),
            "key": rng.standard_normal((B, kv_heads, S, head)), "past_value": rng.standard_normal((B, kv_heads, P, head)),
            "value": rng.standard_normal((B, kv_heads, S, head))}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    low = np.finfo(np.float32).min
    mask = np.zeros((B, 1, S, P + S), np.float32)
    mask[1, :, :, 0] = low  # the second row is left-padded by one position
    got = make_session(model).run(None, {**feed, "mask": mask})
    k = np.concatenate([feed["past_key"], feed["key"]], 2)
    v = np.concatenate([feed["past_value"], feed["value"]], 2)
    group = heads // kv_heads
    scores = feed["query"] @ np.repeat(k, group, 1).transpose(0, 1, 3, 2) / np.sqrt(head) + mask
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ np.repeat(v, group, 1)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[1], k)
    np.testing.assert_array_equal(got[2], v)


@pytest.mark.parametrize("heads,kv_heads,head", [(4, 4, 16), (4, 2, 12)])
def test_ungrouped_heads_and_head_sizes_the_kernel_refuses_are_left_alone(heads, kv_heads, head):
    assert gqa_kv.rules.apply_to_model(_graph(heads, kv_heads, head)) == 0

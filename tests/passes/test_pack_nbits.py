"""pack-nbits: MatMulNBits reading one input with one layout become one MatMulNBits and a Split;
the outputs stay those of the separate nodes, and what must not be packed is not."""

from __future__ import annotations

import numpy as np
import pytest

from graphc.checks.validate import make_session, synthesize_inputs
from graphc.core.io import load_model
from graphc.models.synthetic_llama import PRESETS
from graphc.passes.pack_nbits import META_PACKED, PackNBits
from graphc.passes.quantize_nbits import QuantizeNBits
from graphc.passes._weights import META_BITS, META_BLOCK


def _nbits(model):
    return [n for n in model.graph if n.op_type == "MatMulNBits"]


def _outputs(model, feeds):
    session = make_session(model)
    return [session.run(None, f) for f in feeds]


@pytest.mark.parametrize("symmetric", [False, True])
def test_qkv_and_gate_up_become_one_node_each_with_the_same_outputs(tiny_llama, symmetric):
    model = load_model(tiny_llama)
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, symmetric=symmetric)).call(model)
    feeds = synthesize_inputs(model, count=2, seed=0)
    before, count = _outputs(model, feeds), len(_nbits(model))
    stats = PackNBits().call(model).stats
    layers = PRESETS["tiny"].layers
    # per layer Q/K/V -> 1 and gate/up -> 1; o_proj, down_proj and the head stay
    assert stats.counts["groups_packed"] == 2 * layers and stats.counts["nodes_packed"] == 5 * layers
    packed = _nbits(model)
    assert len(packed) == count - 3 * layers
    sizes = sorted(int(n.attributes.get_int("N", 0)) for n in packed if META_PACKED in n.metadata_props)
    cfg = PRESETS["tiny"]
    head = cfg.hidden // cfg.heads
    assert sizes == sorted([cfg.hidden + 2 * cfg.kv_heads * head] * layers + [2 * cfg.intermediate] * layers)
    for node in packed:
        if META_PACKED in node.metadata_props:
            (split,) = [u for u, _ in node.outputs[0].uses()]
            assert split.op_type == "Split" and len(split.outputs) == len(node.metadata_props[META_PACKED].split(","))
    after = _outputs(model, feeds)
    for got, want in zip(after, before):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
    # the separate nodes' stored arrays are gone, not kept beside the packed ones
    names = set(model.graph.initializers)
    assert not any(n.endswith(("_q4", "_scales")) and "packed" not in n and ("q_proj" in n or "gate" in n)
                   for n in names)


def test_different_layouts_are_not_packed(tiny_llama):
    model = load_model(tiny_llama)
    # plan Q at 8 bits, K and V at 4: only K and V can share a node
    for node in model.graph:
        if node.op_type == "MatMul" and "q_proj" in (node.inputs[1].name or ""):
            node.metadata_props[META_BITS], node.metadata_props[META_BLOCK] = "8", "32"
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32)).call(model)
    feeds = synthesize_inputs(model, count=1, seed=1)
    before = _outputs(model, feeds)
    stats = PackNBits().call(model).stats
    layers = PRESETS["tiny"].layers
    assert stats.counts["nodes_packed"] == 4 * layers  # K+V and gate+up per layer
    assert stats.counts["sibling_groups_split"] == layers  # Q apart from K+V, said per layer
    reasons = [s["reason"] for s in stats.skipped]
    assert sum("1 x 8-bit b32, 2 x 4-bit b32" in r for r in reasons) == layers, reasons
    eights = [n for n in _nbits(model) if n.attributes.get_int("bits", 0) == 8]
    assert len(eights) == layers and not any(META_PACKED in n.metadata_props for n in eights)
    np.testing.assert_allclose(_outputs(model, feeds)[0][0], before[0][0], rtol=1e-5, atol=1e-4)


def test_nothing_to_pack_changes_nothing(tiny_llama):
    model = load_model(tiny_llama)
    result = PackNBits().call(model)
    assert not result.modified and "groups_packed" not in result.stats.counts


def test_biases_an_old_opset_and_a_graph_output():
    """Gemms with biases (MatMulNBits' bias input) at opset 11 (Split takes sizes as an attribute);
    a node whose output is a graph output keeps its name there and is not packed."""
    from onnx import TensorProto, helper

    from tests.passes.graphs import _model

    rng = np.random.default_rng(3)
    inits = {}
    nodes = []
    for i, n in enumerate((48, 32, 40)):
        inits[f"W{i}"] = rng.standard_normal((n, 64)).astype(np.float32)
        inits[f"C{i}"] = rng.standard_normal(n).astype(np.float32)
        nodes.append(helper.make_node("Gemm", ["x", f"W{i}", f"C{i}"], [f"g{i}"], name=f"gemm{i}", transB=1))
    nodes += [helper.make_node("ReduceSum", ["g0"], ["s0"], keepdims=1, axes=[1]),
              helper.make_node("ReduceSum", ["g1"], ["s1"], keepdims=1, axes=[1]),
              helper.make_node("Add", ["s0", "s1"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1]),
                    helper.make_tensor_value_info("g2", TensorProto.FLOAT, ["batch", 40])], inits, opset=11)
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32)).call(model)
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]
    before = _outputs(model, feeds)[0]
    stats = PackNBits().call(model).stats
    assert stats.counts["groups_packed"] == 1 and stats.counts["nodes_packed"] == 2
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert list(split.attributes.get_ints("split")) == [48, 32] and len(split.inputs) == 1
    (packed,) = [n for n in _nbits(model) if META_PACKED in n.metadata_props]
    assert packed.inputs[5] is not None and packed.attributes.get_int("N") == 80
    assert [v.name for v in model.graph.outputs] == ["y", "g2"]
    after = _outputs(model, feeds)[0]
    for got, want in zip(after, before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

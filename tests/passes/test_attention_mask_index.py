"""attention-mask-index: fused attention reads attention_mask as mask_index instead of the
exporter's float bias, only where that bias is verified to be the key-padding mask."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from graphc.core import io  # noqa: E402
from graphc.passes.attention_mask_index import AttentionMaskIndex  # noqa: E402
from graphc.passes.cleanup import RemoveUnused  # noqa: E402
from graphc.passes.fuse_ort import FuseOrt  # noqa: E402
from graphc.checks.validate import make_session  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from graphc.models.fixtures import export_tiny

    path = tmp_path_factory.mktemp("mask") / "bert.onnx"
    export_tiny("bert", path)
    return path


def _feed(seed=0, batch=3, seq=9):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 3:] = 0  # right padding
    mask[0, :2] = 0  # left padding
    return {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


@pytest.mark.parametrize("attention", ["attention", "mha"])
def test_bias_becomes_mask_index_and_the_bias_graph_goes(bert, attention):
    model = io.load_model(bert)
    FuseOrt(FuseOrt.Options(attention=attention))(model)
    before_nodes = len(model.graph)
    feed = _feed()
    reference = make_session(model).run(None, feed)[0]
    result = AttentionMaskIndex()(model)
    RemoveUnused()(model)
    assert result.modified and result.stats.counts["masks_from_attention_mask"] == 2, result.stats
    fused = [n for n in model.graph if n.op_type in ("Attention", "MultiHeadAttention")]
    slot = 3 if attention == "attention" else 4
    for node in fused:
        assert node.inputs[slot] is not None and node.inputs[slot].producer().op_type == "Cast"
        assert len(node.inputs) <= 5  # no attention_bias
    assert len(model.graph) < before_nodes - 5  # the exporter's mask-building ops are dead and gone
    got = make_session(model).run(None, feed)[0]
    keep = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[keep], reference[keep], atol=1e-5)


def test_a_bias_that_is_not_the_padding_mask_is_left_alone(bert):
    """A bias that adds anything to real keys (here -1 everywhere: a relative or causal bias
    would too) is not a key-padding mask: the node keeps it, with the reason."""
    import onnx_ir as ir

    model = io.load_model(bert)
    FuseOrt(FuseOrt.Options(attention="mha"))(model)
    node = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    bias = node.inputs[5]
    shift = ir.Value(name="shift", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.array(-1.0, np.float32), name="shift"))
    model.graph.register_initializer(shift)
    add = ir.node("Add", [bias, shift])
    model.graph.insert_before(node, add)
    for n in model.graph:
        if n.op_type == "MultiHeadAttention":
            n.replace_input_with(5, add.outputs[0])
    result = AttentionMaskIndex()(model)
    assert not result.modified
    assert [s["reason"] for s in result.stats.skipped] == ["attention_bias is not a key-padding mask of the mask input "
                                                   "(causal or other bias)"] * 2, result.stats

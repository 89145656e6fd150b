"""fuse-ort on a KV-cache decoder (graphc export --kv-cache): GroupQueryAttention with past/present.

Structural (one GQA a layer, reading the past inputs and writing the present outputs),
numeric (ORT on the fused graph vs ORT on the unfused one: prefill, decode, a chunk after a
past, left and right padding; greedy tokens through graphc.front.generate), and a near miss (a
cache concatenated the other way round must not become GQA, and says why).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

from graphc.core import io  # noqa: E402
from graphc.front.generate import Decoder  # noqa: E402
from graphc.passes.fuse_ort import FuseOrt  # noqa: E402
from graphc.checks.validate import make_session  # noqa: E402

PROMPT = np.array([[5, 17, 42, 8, 99, 3]])


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(model, unfused path, fused path, fuse-ort stats) for the tiny Llama KV decoder."""
    from graphc.exporters.decoder import export_decoder
    from graphc.models.fixtures import tiny_llama

    folder = tmp_path_factory.mktemp("kv-gqa")
    model = tiny_llama()
    path = export_decoder(model, folder / "tiny-kv.onnx").path
    fused_model = io.load_model(path)
    stats = FuseOrt()(fused_model).stats
    fused = folder / "tiny-kv-fused.onnx"
    io.save_model(fused_model, fused)
    return model, path, fused, stats


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")


def _feed(session, batch, seq, past, padding=None, seed=0):
    """Inputs for one call: ``past`` cached positions (random K/V), ``seq`` new tokens."""
    rng = np.random.default_rng(seed)
    total = past + seq
    mask = np.ones((batch, total), np.int64)
    if padding == "left":  # HF's convention: padded positions masked, positions count real tokens
        mask[0, :2] = 0
    elif padding == "right":
        mask[-1, total - 2:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past:]
    feed = {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask, "position_ids": positions}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = rng.standard_normal((batch, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feed


def test_kv_decoder_fuses_group_query_attention_with_cache(decoder):
    model, _, fused_path, stats = decoder
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    fused = io.load_model(fused_path)
    assert _ops(fused)["GroupQueryAttention"] == layers and _ops(fused)["RotaryEmbedding"] == 2 * layers
    assert not any(n.op_type in ("Softmax", "MultiHeadAttention") for n in fused.graph.all_nodes())
    assert stats.counts["fused.attention"] == layers and stats.counts["misses.attention"] == 0
    assert stats.counts["gqa_kv_cache"] == layers and not stats.skipped
    inputs, outputs = {v.name: v for v in fused.graph.inputs}, {v.name: v for v in fused.graph.outputs}
    for node in (n for n in fused.graph.all_nodes() if n.op_type == "GroupQueryAttention"):
        (i,) = {int(v.name.split(".")[1]) for v in node.inputs[3:5]}  # past key and value of one layer
        assert node.inputs[3] is inputs[f"past_key_values.{i}.key"] and node.inputs[4] is inputs[f"past_key_values.{i}.value"]
        assert node.outputs[1] is outputs[f"present.{i}.key"] and node.outputs[2] is outputs[f"present.{i}.value"]
        assert node.inputs[5].dtype == ir.DataType.INT32 and node.inputs[6].dtype == ir.DataType.INT32
        assert node.attributes.get_int("num_heads") == heads
        assert node.attributes.get_int("kv_num_heads") == model.config.num_key_value_heads
        assert node.attributes.get_int("do_rotary", 0) == 0 and node.attributes.get_int("causal") == 0
        assert node.inputs[10] is not None  # the model's mask, as attention_bias
        for x in node.inputs[:2]:  # rotary on the [B, S, heads * D] projections, no Transpose around it
            assert x.producer().op_type == "RotaryEmbedding" and len(x.producer().inputs[0].shape) == 3
    assert not any(n.op_type == "Transpose" for n in fused.graph.all_nodes())


@pytest.mark.parametrize("batch,seq,past,padding", [
    (2, 5, 0, None),  # prefill
    (3, 1, 9, None),  # decode
    (1, 4, 3, None),  # a chunk after a past (batch 1: ORT's GQA refuses more, see below)
    (2, 5, 0, "left"), (2, 1, 6, "left"), (2, 5, 0, "right"), (2, 1, 6, "right"),
])
def test_fused_matches_unfused_in_ort(decoder, batch, seq, past, padding):
    _, path, fused_path, _ = decoder
    unfused, fused = make_session(path), make_session(fused_path)
    feed = _feed(unfused, batch, seq, past, padding)
    names = [o.name for o in unfused.get_outputs()]
    for name, want, got in zip(names, unfused.run(names, feed), fused.run(names, feed)):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=name)  # padded rows too


def test_batched_chunk_after_a_past_is_refused_not_miscomputed(decoder):
    """ORT's GQA: more than one new token after a past needs batch 1; it raises, never differs."""
    _, path, fused_path, _ = decoder
    fused = make_session(fused_path)
    feed = _feed(fused, 2, 3, 4)
    make_session(path).run(None, feed)
    with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1"):
        fused.run(None, feed)


def test_greedy_tokens_are_the_same_fused_and_unfused(decoder):
    _, path, fused_path, _ = decoder
    np.testing.assert_array_equal(Decoder(fused_path).greedy(PROMPT, 20).tokens, Decoder(path).greedy(PROMPT, 20).tokens)
    rows = np.concatenate([PROMPT, PROMPT[:, ::-1]])
    np.testing.assert_array_equal(Decoder(fused_path).greedy(rows, 8).tokens, Decoder(path).greedy(rows, 8).tokens)


def test_cache_concatenated_the_other_way_is_not_fused_into_gqa(decoder, tmp_path):
    """Near miss: layer 0's present is Concat(new, past). GQA would append after the past, so
    the rule refuses, records why, and the layer still computes what it did (MHA takes it)."""
    _, path, _, _ = decoder
    model = io.load_model(path)
    for value in model.graph.outputs:
        if value.name in ("present.0.key", "present.0.value"):
            node = value.producer()
            past, new = node.inputs
            node.replace_input_with(0, new)
            node.replace_input_with(1, past)
    swapped = tmp_path / "swapped.onnx"
    io.save_model(model, swapped)
    model = io.load_model(swapped)
    stats = FuseOrt()(model).stats
    assert stats.counts["gqa_kv_cache"] == 1 and _ops(model)["GroupQueryAttention"] == 1
    (skip,) = [s for s in stats.skipped if s["node"].startswith("GroupQueryAttention with KV cache (1 unfused")]
    assert "the query and the new keys/values do not have the same known length" in skip["reason"]
    layer0 = [n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"
              and n.inputs[3].name == "past_key_values.0.key"]
    assert not layer0
    fused = tmp_path / "swapped-fused.onnx"
    io.save_model(model, fused)
    for args in ((2, 5, 0, "left"), (2, 1, 6, None)):
        feed = _feed(make_session(swapped), *args)
        for want, got in zip(make_session(swapped).run(None, feed), make_session(fused).run(None, feed)):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_fuse_recipe_on_a_kv_decoder_validates_and_generates(decoder, tmp_path):
    """The ``fuse`` recipe (packed-attention target, attention-mask-index) through graphc.compress."""
    import graphc

    model, path, _, _ = decoder
    out = tmp_path / "fused-recipe.onnx"
    result = graphc.compress(path, out, recipe="fuse", force=True, attribution=False)
    (fuse,) = [r for r in result.passes if r.name == "fuse-ort"]
    assert fuse.stats["fused.attention"] == model.config.num_hidden_layers, fuse.stats
    assert _ops(io.load_model(out))["GroupQueryAttention"] == model.config.num_hidden_layers
    np.testing.assert_array_equal(Decoder(out).greedy(PROMPT, 12).tokens, Decoder(path).greedy(PROMPT, 12).tokens)

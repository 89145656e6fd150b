"""remove-padding: MatMuls, norms and activations on the real tokens only, attention on the
padded batch; real tokens' outputs unchanged, padded rows zero."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("torch")

from graphc.core import io  # noqa: E402
from graphc.passes.attention_mask_index import AttentionMaskIndex  # noqa: E402
from graphc.passes.fuse_ort import FuseOrt  # noqa: E402
from graphc.passes.quantize_int8 import QuantizeInt8  # noqa: E402
from graphc.passes.remove_padding import RemovePadding  # noqa: E402
from graphc.checks.validate import make_session  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from graphc.models.fixtures import export_tiny

    path = tmp_path_factory.mktemp("unpad") / "bert.onnx"
    export_tiny("bert", path)
    return path


def _feed(seed=0, batch=3, seq=9, pad=True):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    if pad:
        mask[1, seq - 3:] = 0  # right padding
        mask[0, :2] = 0  # left padding
        mask[2, 4] = 0  # a hole
    return {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def _fused(path, attention="mha"):
    model = io.load_model(path)
    FuseOrt(FuseOrt.Options(attention=attention))(model)
    return model


def _short_batch():
    """Every row padded at the end: the longest row (7) is shorter than the padded length (10)."""
    feed = _feed(3, batch=3, seq=10)
    feed["attention_mask"][:, 7:] = 0
    feed["attention_mask"][1, 5:] = 0
    return feed


@pytest.mark.parametrize("attention", ["attention", "mha", "mha+mask_index", "mha+untrimmed"])
def test_real_tokens_unchanged_and_matmuls_on_packed_rows(bert, attention):
    model = _fused(bert, attention.split("+")[0])
    if attention.endswith("mask_index"):
        AttentionMaskIndex()(model)
    feeds = [_feed(), _feed(1, batch=1, seq=5, pad=False), _feed(2, batch=4, seq=16), _short_batch()]
    refs = [make_session(model).run(None, f)[0] for f in feeds]
    result = RemovePadding(RemovePadding.Options(trim_attention=not attention.endswith("untrimmed")))(model)
    assert result.modified, result.stats
    counts = result.stats.counts
    assert counts["packs"] == 1 + 2 and counts["outputs_unpacked"] == 1  # the first input, after each attention
    # MultiHeadAttention runs on the batch cut to its longest row; Attention on the padded batch
    trimmed = attention in ("mha", "mha+mask_index")
    assert counts["attention_on_longest_row" if trimmed else "attention_on_padded_batch"] == 2
    assert counts["nodes_on_real_tokens"] >= 8
    packed_matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[0].shape is not None
                      and n.inputs[0].shape[1] == "packed_tokens"]
    # MHA: Q/K/V merged into one, output, FFN in and out per layer; packed Attention does Q/K/V itself
    assert len(packed_matmuls) == (8 if attention.startswith("mha") else 6)
    assert counts.get("qkv_matmuls_merged", 0) == (2 if attention.startswith("mha") else 0)
    for mm in packed_matmuls:  # recorded shapes are the real ones (ORT warns on a wrong one)
        assert mm.outputs[0].shape[-1] == mm.inputs[1].const_value.shape[1], mm.name
    sess = make_session(model)
    for f, ref in zip(feeds, refs):
        got = sess.run(None, f)[0]
        keep = f["attention_mask"].astype(bool)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got[keep], ref[keep], atol=2e-5, rtol=1e-4)
        assert not got[~keep].any()  # padded rows are zeros


def test_quantization_after_it_still_matches_the_float_model(bert):
    """Run before quantize-int8: MatMuls quantize on packed rows (dynamic ranges over real tokens)."""
    model = _fused(bert)
    feed = _feed(3, batch=4, seq=12)
    ref = make_session(model).run(None, feed)[0]
    RemovePadding()(model)
    result = QuantizeInt8()(model)
    assert result.modified
    got = make_session(model).run(None, feed)[0]
    keep = feed["attention_mask"].astype(bool)
    a, b = got[keep].ravel(), ref[keep].ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_unfused_attention_is_left_alone_with_the_reason(bert):
    model = io.load_model(bert)
    result = RemovePadding()(model)
    assert not result.modified
    assert any("no attention" in n for n in result.stats.notes), result.stats.notes


def test_kv_cache_decoders_and_missing_masks_are_left_alone():
    x = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 2, "p", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"], ["y"])], "g", [x, past], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    import onnx_ir as ir

    result = RemovePadding()(ir.serde.deserialize_model(proto))
    assert not result.modified and "KV-cache decoder" in result.stats.notes[0]
    result = RemovePadding(RemovePadding.Options(mask_input="mask"))(ir.serde.deserialize_model(proto))
    assert not result.modified and "no graph input named 'mask'" in result.stats.notes[0]


def _row_cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_a_finished_int8_model_runs_on_real_tokens(bert):
    """After quantize-int8 and QAttention: DynamicQuantizeLinear and MatMulIntegerToFloat stay
    packed, QAttention gets the padded batch; only the dynamic ranges change (real tokens only)."""
    from graphc.passes.quantize_attention import QuantizeAttention

    model = _fused(bert)
    QuantizeInt8()(model)
    assert QuantizeAttention()(model).modified
    feed = _feed(4, batch=4, seq=12)
    ref = make_session(model).run(None, feed)[0]
    result = RemovePadding()(model)
    counts = result.stats.counts
    assert result.modified and counts["attention_on_padded_batch"] == 2 and counts["outputs_unpacked"] == 1
    assert not any(k.startswith("unpacked_for_") for k in counts), counts  # nothing falls back
    packed = {n.op_type for n in model.graph if n.inputs and n.inputs[0] is not None and n.inputs[0].shape is not None
              and len(n.inputs[0].shape) == 3 and n.inputs[0].shape[1] == "packed_tokens"}
    assert {"DynamicQuantizeLinear", "SkipLayerNormalization"} <= packed
    got = make_session(model).run(None, feed)[0]
    keep = feed["attention_mask"].astype(bool)
    assert _row_cos(got[keep], ref[keep]).min() > 0.98 and not got[~keep].any()


def test_a_finished_int4_model_runs_on_real_tokens(bert):
    """After quantize-nbits: MatMulNBits (constant codes, scales, zero points) stays packed; the
    weights are the same, so real tokens' outputs match the int4 model's."""
    from graphc.passes.quantize_nbits import QuantizeNBits

    model = _fused(bert)
    assert QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, accuracy_level=0))(model).modified
    feed = _feed(5, batch=4, seq=12)
    ref = make_session(model).run(None, feed)[0]
    result = RemovePadding()(model)
    counts = result.stats.counts
    assert result.modified and counts["attention_on_longest_row"] == 2, counts
    assert not any(k.startswith("unpacked_for_") for k in counts), counts
    packed_nbits = [n for n in model.graph if n.op_type == "MatMulNBits" and n.inputs[0].shape is not None
                    and n.inputs[0].shape[1] == "packed_tokens"]
    assert len(packed_nbits) >= 6  # Q/K/V (or the merged one), output, FFN in and out per layer
    got = make_session(model).run(None, feed)[0]
    keep = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[keep], ref[keep], atol=5e-5, rtol=1e-4)
    assert not got[~keep].any()


def test_ort_quantize_dynamic_output_runs_on_real_tokens(bert, tmp_path):
    """ORT's own int8 graph (MatMulInteger, Cast, scale Mul): the same packing."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    model = _fused(bert)
    src, dst = tmp_path / "fused.onnx", tmp_path / "ort_int8.onnx"
    io.save_model(model, src)
    quantization.quantize_dynamic(str(src), str(dst), weight_type=quantization.QuantType.QInt8)
    model = io.load_model(dst)
    assert any(n.op_type == "MatMulInteger" for n in model.graph)
    feed = _feed(5, batch=3, seq=10)
    ref = make_session(model).run(None, feed)[0]
    result = RemovePadding()(model)
    assert result.modified and result.stats.counts["nodes_on_real_tokens"] > 10, result.stats
    assert not any(k.startswith("unpacked_for_") for k in result.stats.counts), result.stats.counts
    got = make_session(model).run(None, feed)[0]
    keep = feed["attention_mask"].astype(bool)
    assert _row_cos(got[keep], ref[keep]).min() > 0.98 and not got[~keep].any()


def test_the_recipe_file_runs_it_on_a_finished_model(bert, tmp_path):
    """recipes/remove-padding.toml through graphc.compress: validated, padding gone from the MatMuls."""
    from pathlib import Path

    import graphc

    src, out = tmp_path / "fused.onnx", tmp_path / "unpadded.onnx"
    io.save_model(_fused(bert), src)
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "remove-padding.toml"
    result = graphc.compress(src, out, recipe=str(recipe), attribution=False)
    assert [r.name for r in result.passes if r.modified][0] == "remove-padding"
    assert result.validation is not None and result.validation.passed
    assert any(n.op_type == "NonZero" for n in io.load_model(out).graph)


def test_rows_or_batches_without_real_tokens(bert):
    """A fully padded row, and a batch with no real token at all (T = 0), run and stay finite."""
    model = _fused(bert)
    ref = make_session(model)
    RemovePadding()(model)
    sess = make_session(model)
    rng = np.random.default_rng(6)
    for mask in (np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]), np.zeros((2, 6), np.int64)):
        feed = {"input_ids": rng.integers(0, 100, (2, 6)), "attention_mask": mask,
                "token_type_ids": np.zeros((2, 6), np.int64)}
        got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
        keep = mask.astype(bool)
        assert got.shape == want.shape and np.isfinite(got).all() and not got[~keep].any()
        np.testing.assert_allclose(got[keep], want[keep], atol=2e-5, rtol=1e-4)

"""compact-scales: MatMulNBits / GatherBlockQuantized scales as uint8 log codes; the outputs
barely move, the scale bytes halve, ORT folds the decoder back into constant scales."""

from __future__ import annotations

import numpy as np
import pytest

from graphc.core import io
from graphc.passes import _sensitivity as sens
from graphc.passes.compact_scales import CompactScales, decode, encode
from graphc.passes.fp16_constants import Fp16Constants
from graphc.passes.quantize_gather_block import QuantizeGatherBlock
from graphc.passes.quantize_nbits import QuantizeNBits
from graphc.checks.validate import make_session
from tests.passes.graphs import cosine, run
from tests.passes.test_quantize_gather_block import _ids, _tied


def _scale_bytes(model) -> int:
    """Float scales and log8 codes (not the decoders' offsets, steps and shapes)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if (v.name or "").endswith(("_scales", "_log8")))


def test_encode_decode_within_half_a_log_step():
    scales = np.random.default_rng(0).uniform(0.01, 0.2, (64, 9)).astype(np.float32)
    codes, lo, step = encode(scales)
    assert codes.dtype == np.uint8 and codes.shape == scales.shape and codes.min() == 0 and codes.max() == 255
    rel = np.abs(decode(codes, lo, step) / scales - 1)
    assert rel.max() <= np.expm1(step / 2) + 1e-6 and np.expm1(step / 2) < 0.006  # a factor of 20: ln(20) / 510


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("torch")
    from graphc.models.fixtures import export_tiny

    path = tmp_path_factory.mktemp("compact") / "bert.onnx"
    export_tiny("bert", path)
    return path


def test_int4_bert_outputs_barely_move_and_scale_bytes_halve(bert):
    model = io.load_model(bert)
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, accuracy_level=4))(model)
    feed = {"input_ids": np.random.default_rng(1).integers(0, 100, (2, 11)),
            "attention_mask": np.ones((2, 11), np.int64), "token_type_ids": np.zeros((2, 11), np.int64)}
    ref = make_session(model).run(None, feed)[0]
    before = _scale_bytes(model)
    shapes = {tuple(v.const_value.shape) for v in model.graph.initializers.values() if v.name.endswith("_scales")}
    result = CompactScales(CompactScales.Options(min_elements=16))(model)  # the tiny model's tensors are small
    n_nbits = sum(n.op_type == "MatMulNBits" for n in model.graph)
    assert result.modified and result.stats.counts["tensors_compacted"] == n_nbits
    assert _scale_bytes(model) == before // 2  # float16 → uint8
    assert result.stats.counts["bytes_saved"] == before // 2 - 8 * n_nbits
    # one decoder (and Split) per scales shape and row count ([64] is N=64 x 1 block or 32 x 2)
    assert len(shapes) <= result.stats.counts["decoders"] <= len(shapes) + 1 < n_nbits
    assert sum(n.op_type == "Exp" for n in model.graph) == result.stats.counts["decoders"]
    for node in model.graph:
        if node.op_type == "MatMulNBits":  # the scales now come from the decoder on uint8 codes
            chain = node.inputs[2].producer()
            while chain is not None and chain.op_type != "Exp":
                chain = chain.inputs[0].producer()
            assert chain is not None
    got = make_session(model).run(None, feed)[0]
    assert cosine(got, ref) > 0.9999 and not np.array_equal(got, ref)
    assert not CompactScales(CompactScales.Options(min_elements=16))(model).modified  # nothing left to compact


def test_tied_table_scales_compacted_once():
    model, e = _tied()
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, symmetric=False, accuracy_level=0))(model)
    QuantizeGatherBlock(QuantizeGatherBlock.Options(bits=4, block_size=32, symmetric=False))(model)
    logits_ref, emb_ref = run(model, _ids())
    result = CompactScales(CompactScales.Options(min_elements=16))(model)
    assert result.stats.counts["tensors_compacted"] == 1  # one scales tensor feeds both ops
    Fp16Constants()(model)
    logits, emb = run(model, _ids())
    assert cosine(emb, emb_ref) > 0.9999 and cosine(logits, logits_ref) > 0.9999


def test_wide_or_nonpositive_scales_are_left_with_the_reason(bert):
    model = io.load_model(bert)
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, accuracy_level=0))(model)
    result = CompactScales(CompactScales.Options(max_rel_error=1e-5))(model)
    assert not result.modified
    assert any("8-bit log codes would move them" in s["reason"] for s in result.stats.skipped), result.stats


def test_rows_get_their_own_offset_when_the_tensor_is_too_wide():
    """A table whose rows' scales differ by 1000x (an LM head: rare tokens' rows are small):
    one grid would move scales by 1.4%; a float16 offset per row keeps them within 0.2%."""
    from graphc.passes.compact_scales import _Item

    rng = np.random.default_rng(0)
    scales = (rng.uniform(1, 1.5, (300, 9)) * np.logspace(-3, 0, 300)[:, None]).astype(np.float16)
    item = _Item(value=None, array=scales, rows=300)
    assert CompactScales()._encode(item) is None
    assert item.lo.shape == (300, 1) and item.codes.shape == (300, 9)
    decoded = np.exp(item.lo + item.step * item.codes.astype(np.float64))
    assert np.abs(decoded / scales - 1).max() < 0.002
    wide = _Item(value=None, array=scales.reshape(-1), rows=1)  # rows unknown: one grid only
    assert "within a row" in CompactScales()._encode(wide)


def test_planner_counts_one_byte_a_scale():
    c = sens.QuantConfig(bits=4, block_size=64)
    half = sens.config_bytes(576, 576, c, symmetric=False, scale_dtype="float16")
    log8 = sens.config_bytes(576, 576, c, symmetric=False, scale_dtype="log8")
    assert half - log8 == 576 * 9

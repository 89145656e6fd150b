"""split-vocab: a tied embedding / LM-head table cut into row tiers by token importance; the
float function is unchanged, row-wise quantization of the tiers equals that of the whole table,
and mixed-precision gives the frequent tier more bits."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import PassContext
from graphc.passes import _sensitivity as sens
from graphc.passes.mixed_precision import MixedPrecision
from graphc.passes.quantize_gather_block import QuantizeGatherBlock
from graphc.passes.quantize_nbits import QuantizeNBits
from graphc.passes.split_vocab import SplitVocab
from graphc.checks.validate import make_session

V, H = 512, 32
HOT = np.arange(7, 7 + 24)  # the ids the calibration text uses most


def _tied(vocab=V, tied=True, seed=0, w_scale=0.3, opset=17) -> ir.Model:
    """e = Gather(E, ids); h = tanh(e W); logits = h E^T (or h F^T with its own F, untied)."""
    rng = np.random.default_rng(seed)
    inits = {"E": rng.standard_normal((vocab, H)).astype(np.float32),
             "W": (np.eye(H) * 0.3 if w_scale == "identity" else rng.standard_normal((H, H)) * w_scale).astype(np.float32)}
    head = "E" if tied else "F"
    if not tied:
        inits["F"] = rng.standard_normal((vocab, H)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["ew"], name="mix"),
             helper.make_node("Tanh", ["ew"], ["h"]),
             helper.make_node("Transpose", [head], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "Et"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = ir.serde.deserialize_model(proto)
    for n in model.graph:
        if n.name == "head":
            n.metadata_props["graphc.scope"] = "lm_head"
    return model


def _feeds(n, seed, vocab=V):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (2, 16))
        hot = rng.random((2, 16)) < 0.7  # most reads land on HOT
        ids[hot] = rng.choice(HOT, hot.sum())
        out.append({"input_ids": ids.astype(np.int64)})
    return out


def _logits(model, feeds):
    s = make_session(model)
    return [s.run(["logits"], f)[0] for f in feeds]


def _split(model, calib=None, **options):
    return SplitVocab(SplitVocab.Options(**{"min_rows": 64, **options}),
                      PassContext(calibration=calib if calib is not None else _feeds(4, 1)))(model)


def test_float_function_unchanged_and_tiers_follow_the_fractions():
    test = _feeds(2, 9)
    ref = _logits(_tied(), test)
    result = _split(_tied(), fractions=(1 / 16, 1 / 4))
    model = result.model
    assert result.modified
    assert [o.name for o in model.graph.outputs] == ["logits"]
    for a, b in zip(_logits(model, test), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    tiers = sorted((n.name, v.const_value.shape[0]) for n in model.graph for v in n.inputs
                   if n.op_type == "Gather" and v is not None and v.name.startswith("E_tier") and v.const_value is not None
                   and len(v.const_value.shape) == 2)
    # 1/16, 3/16 and 3/4 of the rows, each framed by two zero rows
    assert [r for _, r in tiers] == [V // 16 + 2, 3 * V // 16 + 2, 3 * V // 4 + 2]
    heads = [n for n in model.graph if n.op_type == "MatMul" and n.name.startswith("head_tier")]
    assert [n.metadata_props["graphc.scope"] for n in heads] == ["lm_head.tier0", "lm_head.tier1", "lm_head.tier2"]
    assert result.stats.counts["tables_split"] == 1 and result.stats.counts["tiers"] == 3
    assert "E" not in model.graph.initializers  # the whole table is gone


def test_the_logits_come_back_in_token_order_bit_for_bit():
    # the reorder is a copy: the same bits as the tiers' logits give by column, through
    # GatherElements (a fast copy in ONNX Runtime, where Gather on the last axis is slow)
    test = _feeds(2, 9) + [{"input_ids": np.array([[3]], np.int64)}]
    model = _split(_tied(), fractions=(1 / 16, 1 / 4)).model
    back = [n for n in model.graph if n.outputs[0].name == "logits"]
    assert [n.op_type for n in back] == ["GatherElements"]
    cat = back[0].inputs[0]
    col = next(v for n in model.graph for v in n.inputs if v is not None and v.name == "E_tier_column").const_value.numpy()
    proto = ir.serde.serialize_model(model)
    proto.graph.output.append(helper.make_tensor_value_info(cat.name, TensorProto.FLOAT, None))
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in test:
        logits, tiers = s.run(["logits", cat.name], f)
        np.testing.assert_array_equal(logits, tiers[..., col])
        assert logits.shape == (*f["input_ids"].shape, V)


def test_an_opset_without_int32_clip_is_left_alone_with_the_reason():
    result = _split(_tied(opset=11))
    assert not result.modified
    assert any("opset 11 < 12" in s["reason"] for s in result.stats.skipped)


def test_the_tokens_calibration_reads_most_lead():
    # W = 0: every next-token distribution is uniform, so the lookups alone rank the rows
    model = _split(_tied(w_scale=0.0), _feeds(16, 1), fractions=(1 / 16,), feeds=16).model
    top = model.graph.initializers["E_tier0"].const_value.numpy()[1:-1]
    table = _tied().graph.initializers["E"].const_value.numpy()
    rows = {tuple(r) for r in top}
    assert all(tuple(table[i]) in rows for i in HOT)


def test_row_wise_quantization_of_the_tiers_equals_the_whole_tables():
    """Blocks run along the hidden size, so a row quantizes alike in any tier; the zero rows
    dequantize to exactly 0 (an id of another tier adds nothing)."""
    test = _feeds(2, 9)

    def int4(model):
        model = QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=16, method="rtn"))(model).model
        return QuantizeGatherBlock(QuantizeGatherBlock.Options(bits=4, block_size=16, method="rtn"))(model)

    whole = int4(_tied())
    split = int4(_split(_tied(), fractions=(1 / 16, 1 / 4)).model)
    assert split.stats.counts.get("tied_tables_shared") == 3  # each tier stored once, head and lookup
    assert {n.op_type for n in split.model.graph} >= {"MatMulNBits", "GatherBlockQuantized"}
    for a, b in zip(_logits(split.model, test), _logits(whole.model, test)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_mixed_precision_gives_the_frequent_tier_more_bits():
    calib = _feeds(4, 1)
    # W = 0.3 I: the model predicts its input token, so the tokens read most are also predicted most
    model = _split(_tied(w_scale="identity"), calib, fractions=(1 / 16,)).model
    ctx = PassContext(calibration=calib)

    def tier_bytes(rows, bits):  # what the planner counts for a tied table (+ the lookup's zero points)
        return sens.config_bytes(rows, H, sens.QuantConfig(bits, 16), symmetric=False,
                                 scale_dtype="float16") + (rows * H // 16 if bits < 8 else 0)

    rows = [model.graph.initializers[f"E_tier{k}"].const_value.shape[0] for k in (0, 1)]
    fixed = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.name not in ("E_tier0", "E_tier1"))
    # room for tier 0 at int8, not for tier 1
    budget = fixed + tier_bytes(rows[0], 8) + tier_bytes(rows[1], 4) + 64
    assert budget < fixed + tier_bytes(rows[0], 4) + tier_bytes(rows[1], 8)
    result = MixedPrecision(MixedPrecision.Options(max_bytes=budget, max_bits=0, bits=(4, 8), block_sizes=(16,),
                                                   metric="kl", feeds=4, exclude=("mix",)), ctx)(model)
    bits = {c["layer"]: c["bits"] for c in result.stats.details["choices"]}
    assert bits == {"lm_head.tier0": 8, "lm_head.tier1": 4}


def test_untied_tables_and_small_tables_are_left_alone_with_the_reason():
    result = _split(_tied(tied=False))
    assert not result.modified
    assert any("not a table tied to an LM head" in s["reason"] for s in result.stats.skipped)
    result = SplitVocab(SplitVocab.Options(min_rows=4096), PassContext(calibration=_feeds(1, 1)))(_tied())
    assert not result.modified
    assert any("min_rows" in s["reason"] for s in result.stats.skipped)


def test_no_calibration_is_an_error():
    with pytest.raises(PassError, match="needs calibration data"):
        SplitVocab(SplitVocab.Options(min_rows=64))(_tied())


@pytest.mark.parametrize("options, match", [
    ({"fractions": (0.5, 0.25)}, "increasing"),
    ({"fractions": (0.0, 0.5)}, "increasing"),
    ({"fractions": (0.5, 1.0)}, "increasing"),
    ({"fractions": ()}, "increasing"),
    ({"fractions": ("x",)}, "numbers"),
    ({"feeds": 0}, "feeds"),
    ({"min_rows": 1}, "min_rows"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(UnsupportedError, match=match):
        SplitVocab(SplitVocab.Options(**options), PassContext(calibration=_feeds(1, 1)))(_tied())

"""merge-tiers: neighbouring tiers of a split head with one planned precision as one table."""

import numpy as np
import pytest

from graphc.core.pass_base import PassContext
from graphc.passes._weights import META_BITS, META_BLOCK, META_HOT_ROWS
from graphc.passes.merge_tiers import MergeTiers
from graphc.passes.quantize_gather_block import QuantizeGatherBlock
from graphc.passes.quantize_nbits import QuantizeNBits
from tests.passes.test_split_vocab import V, _feeds, _logits, _split, _tied

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # five tiers


def _table(node):
    """The tier table a head MatMul (through its Transpose) or a lookup Gather reads, else None."""
    value = node.inputs[1] if node.op_type == "MatMul" else node.inputs[0] if node.op_type == "Gather" else None
    if value is not None and value.producer() is not None and value.producer().op_type == "Transpose":
        value = value.producer().inputs[0]
    return value.name if value is not None and value.name.startswith("E_tier") else None


def _planned(bits_per_tier, block=16):
    """The tied model split in five tiers, each tier's head and lookup planned as ``bits_per_tier``
    (as mixed-precision writes its plan)."""
    model = _split(_tied(), fractions=FRACTIONS).model
    for n in model.graph:
        for k, bits in enumerate(bits_per_tier):
            if _table(n) == f"E_tier{k}":
                n.metadata_props[META_BITS], n.metadata_props[META_BLOCK] = str(bits), str(block)
    return model


def _kernels(model, op):
    return sum(n.op_type == op for n in model.graph)


def _merge(model):
    return MergeTiers(MergeTiers.Options(), PassContext())(model)


def test_runs_of_one_precision_become_one_table_and_the_function_is_unchanged():
    test = _feeds(2, 9) + [{"input_ids": np.array([[0, V - 1, 7]], np.int64)}]
    model = _planned([8, 8, 4, 4, 4])
    ref = _logits(model, test)
    rows = [model.graph.initializers[f"E_tier{k}"].const_value.shape[0] for k in range(5)]
    result = _merge(model)
    assert result.modified and result.stats.counts["tiers_merged"] == 3
    model = result.model
    tables = sorted(v.const_value.shape[0] for v in model.graph.initializers.values()
                    if v.const_value is not None and len(v.const_value.shape) == 2 and v.name.startswith("E_tier"))
    assert tables == sorted([rows[0] + rows[1], rows[2] + rows[3] + rows[4]])
    assert _kernels(model, "MatMul") == 1 + 2 and _kernels(model, "Gather") == 1 + 2  # the mix layer + 2 tiers
    assert _kernels(model, "Add") == 1 and _kernels(model, "Clip") == 2
    heads = [n for n in model.graph if n.op_type == "MatMul" and n.name.startswith("head_tier")]
    assert [(n.metadata_props[META_BITS], n.metadata_props["graphc.scope"]) for n in heads] == [
        ("8", "lm_head.tier0"), ("4", "lm_head.tier2")]
    for a, b in zip(_logits(model, test), ref):
        np.testing.assert_array_equal(a, b)  # the same sums, the rows in the same places


def test_the_joined_tables_quantize_as_the_tiers_did():
    """Blocks run along the hidden size: a row quantizes alike in a tier or in the joined table."""
    test = _feeds(2, 9)

    def int4(model):
        model = QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=16, method="rtn"))(model).model
        return QuantizeGatherBlock(QuantizeGatherBlock.Options(bits=4, block_size=16, method="rtn"))(model).model

    apart = int4(_planned([8, 8, 4, 4, 4]))
    joined = int4(_merge(_planned([8, 8, 4, 4, 4])).model)
    assert _kernels(joined, "MatMulNBits") == 1 + 2 and _kernels(apart, "MatMulNBits") == 1 + 5  # + the mix layer
    assert _kernels(joined, "GatherBlockQuantized") == 2
    for a, b in zip(_logits(joined, test), _logits(apart, test)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [[8, 4, 8, 4, 8], None])
def test_nothing_to_join_is_said(bits):
    model = _planned(bits) if bits else _split(_tied(), fractions=FRACTIONS).model
    if bits is None:  # unplanned tiers all take the quantizer's defaults: one precision, joined
        result = _merge(model)
        assert result.stats.counts["tiers_merged"] == 4
        return
    result = _merge(model)
    assert not result.modified
    assert any("no neighbouring tiers" in n for n in result.stats.notes)


def test_hot_row_plans_and_unmarked_concats_are_left_alone():
    model = _planned([4, 4, 4, 4, 4])
    for n in model.graph:
        if n.op_type == "MatMul" and n.name.startswith("head_tier"):
            n.metadata_props[META_HOT_ROWS] = "1,2"
    result = _merge(model)
    assert not result.modified and "hot rows" in result.stats.skipped[0]["reason"]
    assert not _merge(_tied()).modified  # no split head


def test_the_recipe_joins_tiers_after_the_plan():
    from graphc.core.recipes import BUILTIN

    steps = [s.pass_name for s in BUILTIN["int4"].decoder.steps]
    assert steps.index("mixed-precision") < steps.index("merge-tiers") < steps.index("quantize-nbits")

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphc.core.errors import UnsupportedError
from graphc.passes.lowrank_embedding import LowRankEmbedding
from graphc.passes.quantize_nbits import QuantizeNBits
from tests.passes.graphs import _model, cosine, embedding, ops_of, run

Opts = LowRankEmbedding.Options
VOCAB, DIM = 300, 32


def _table(rank=None, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    t = rng.standard_normal((VOCAB, rank)) @ rng.standard_normal((rank, DIM))
    return (t + noise * rng.standard_normal((VOCAB, DIM))).astype(np.float32)


def lm(table, tied=True, extra_reader=False):
    """ids → Gather(table) → Tanh → [MatMul(Transpose(table)) = logits, as a tied LM head]."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Tanh", ["e"], ["h"])]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", DIM])]
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB]))
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["table"], ["total"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, [DIM]))
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], outputs,
                  {"table": table})


def _ids(seed=1):
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (2, 7)).astype(np.int64)}


def test_low_rank_table_is_found_and_reproduced():
    table = _table(rank=4, noise=1e-4)
    model = lm(table, tied=False)
    res = LowRankEmbedding(Opts(max_error=0.01))(model)
    assert res.modified and res.stats.counts["tables_factorized"] == 1
    assert res.stats.counts["table_params_after"] == 4 * (VOCAB + DIM)
    assert ops_of(model) == ["Gather", "MatMul", "Tanh"]
    assert "table" not in model.graph.initializers
    np.testing.assert_allclose(run(model, _ids())[0], run(lm(table, tied=False), _ids())[0], atol=1e-3)


def test_error_decreases_with_kept_parameters():
    table = _table(seed=3)
    ref = run(lm(table, tied=False), _ids())[0]
    errs = []
    for ratio in (0.2, 0.5, 0.9):
        model = lm(table, tied=False)
        LowRankEmbedding(Opts(rank_rule="ratio", param_ratio=ratio))(model)
        got = run(model, _ids())[0]
        errs.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    assert errs[0] > errs[1] > errs[2], errs


def test_tied_head_shares_the_factors():
    table = _table(rank=6, noise=1e-3, seed=5)
    model = lm(table)
    res = LowRankEmbedding(Opts(max_error=0.02))(model)
    assert res.stats.counts["tied_heads_shared"] == 1
    assert "table" not in model.graph.initializers  # stored once, as A and B (and B^T, small)
    sizes = sorted(v.const_value.numpy().size for v in model.graph.initializers.values())
    assert sum(sizes) == 6 * (VOCAB + DIM) + 6 * DIM < table.size
    ops = ops_of(model)
    assert ops.count("MatMul") == 3 and ops.count("Transpose") == 1  # lookup B, head B^T and A^T
    ref = run(lm(table), _ids())
    got = run(model, _ids())
    assert cosine(got[1], ref[1]) > 0.999 and cosine(got[0], ref[0]) > 0.999


def test_tied_head_skip_leaves_the_table_with_a_reason():
    model = lm(_table(rank=6, seed=5))
    res = LowRankEmbedding(Opts(tied_head="skip"))(model)
    assert not res.modified
    assert "tied to an LM head" in res.stats.skipped[0]["reason"]
    assert "table" in model.graph.initializers


def test_shared_head_factors_can_be_quantized():
    table = _table(rank=8, noise=1e-3, seed=6)
    model = lm(table)
    LowRankEmbedding(Opts(max_error=0.02))(model)
    q = QuantizeNBits(QuantizeNBits.Options(bits=8, block_size=16, min_elements=0))(model)
    assert q.stats.counts["matmuls_quantized"] == 3  # lookup B, head B^T, head A^T (through its Transpose)
    assert cosine(run(model, _ids())[1], run(lm(table), _ids())[1]) > 0.99


def test_skips_small_tables_random_tables_and_other_readers():
    small = LowRankEmbedding()(embedding(vocab=200))
    assert any("200 rows < min_rows=256" in s["reason"] for s in small.stats.skipped)
    flat = LowRankEmbedding()(lm(_table(seed=2), tied=False))
    assert not flat.modified
    assert "is not below break-even rank 28 of the [300, 32] table" in flat.stats.skipped[0]["reason"]
    other = LowRankEmbedding()(lm(_table(rank=2), extra_reader=True))
    assert not other.modified and "also read by ReduceSum" in other.stats.skipped[0]["reason"]


@pytest.mark.parametrize(
    "opts,match",
    [(Opts(max_error=0.0), "max_error=0.0"), (Opts(max_error=2.0), "must lie in"),
     (Opts(rank_rule="ratio", param_ratio=1.5), "param_ratio=1.5"),
     (Opts(tied_head="untie"), "supported: share, skip")],
)
def test_bad_options_are_typed_errors(opts, match):
    with pytest.raises(UnsupportedError, match=match):
        LowRankEmbedding(opts)(lm(_table()))

import numpy as np
import onnx_ir as ir
import pytest

from graphc.core.errors import UnsupportedError
from graphc.passes.quantize_embedding import QuantizeEmbedding
from tests.passes.graphs import cosine, embedding, ops_of, run


def _feed():
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(0, 200, (2, 7)), "tt": rng.integers(0, 2, (2, 7))}


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_large_table_quantized_small_table_kept(scale_dtype):
    model = embedding()
    ref = run(model, _feed())
    result = QuantizeEmbedding(QuantizeEmbedding.Options(scale_dtype=scale_dtype))(model)
    assert result.stats.counts["gathers_quantized"] == 1
    assert any("rows < min_rows" in s["reason"] for s in result.stats.skipped)
    inits = model.graph.initializers
    assert "table" not in inits and "types" in inits
    assert inits["table_int8"].const_value.dtype == ir.DataType.INT8
    assert inits["table_row_scale"].const_value.shape == ir.Shape([200, 1])
    got = run(model, _feed())
    assert cosine(ref[0], got[0]) > 0.9999
    # error per element is at most half a quantization step of its row
    table = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    assert np.abs(ref[0] - got[0]).max() <= np.abs(table).max() / 127 * 0.51 + 1e-3


def test_only_gathered_rows_are_dequantized():
    model = embedding()
    QuantizeEmbedding()(model)
    ops = ops_of(model)
    # Gather int8 rows + Gather scales, then Cast/Mul on the gathered rows (no table-wide DQ)
    assert ops.count("Gather") == 3 and "DequantizeLinear" not in ops


def test_bad_scale_dtype():
    with pytest.raises(UnsupportedError, match="float32, float16"):
        QuantizeEmbedding(QuantizeEmbedding.Options(scale_dtype="int8"))(embedding())

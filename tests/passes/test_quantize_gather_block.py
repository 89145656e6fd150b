import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.core.errors import UnsupportedError
from graphc.passes import _blockquant as bq
from graphc.passes.quantize_gather_block import QuantizeGatherBlock
from graphc.passes.quantize_nbits import QuantizeNBits
from tests.passes.graphs import cosine, embedding, ops_of, run

Opts = QuantizeGatherBlock.Options


def _feed():
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(0, 200, (2, 7)), "tt": rng.integers(0, 2, (2, 7))}


def _tables():
    """graphs.embedding's draws: the 200-row word table and the 2-row type table."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((200, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)


def _float_input(value: ir.Value) -> np.ndarray:
    """A constant behind Cast/Reshape nodes, as float32 (the scales a GatherBlockQuantized reads)."""
    if value.const_value is not None:
        return value.const_value.numpy().astype(np.float32)
    producer = value.producer()
    inner = _float_input(producer.inputs[0])
    if producer.op_type == "Reshape":
        return inner.reshape(producer.inputs[1].const_value.numpy())
    return inner


def _dequant_gbq(node: ir.Node) -> np.ndarray:
    """Numpy dequantization of a GatherBlockQuantized's stored uint8 table → [vocab, hidden]."""
    a = node.attributes
    bits, block = a.get_int("bits"), a.get_int("block_size")
    data = node.inputs[0].const_value.numpy()
    vocab = data.shape[0]
    codes = bq.unpack(data.reshape(vocab, -1), bits, data.reshape(vocab, -1).shape[1] * 8 // bits)
    scales = _float_input(node.inputs[2]).reshape(vocab, -1)
    n_blocks = scales.shape[1]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zv = node.inputs[3]
        if zv.const_value is None:  # a Reshape of the tied head's zero points
            zv = zv.producer().inputs[0]
        zp = zv.const_value.numpy().reshape(vocab, -1)
        zp = bq.unpack(zp, bits, n_blocks) if a.get_int("quantize_axis") == 1 else zp
    else:
        zp = np.full((vocab, n_blocks), 1 << (bits - 1))
    hidden = codes.shape[1]
    idx = np.arange(hidden) // block
    return (codes.astype(np.float32) - zp[:, idx]) * scales[:, idx]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_structure_and_ort_matches_numpy(bits, symmetric):
    model = embedding()
    ref = run(model, _feed())
    result = QuantizeGatherBlock(Opts(bits=bits, block_size=16, symmetric=symmetric))(model)
    s = result.stats.to_dict()
    assert s["gathers_quantized"] == 1 and s["tables_quantized"] == 1
    assert any("rows < min_rows" in k["reason"] for k in s["skipped"])  # the 2-row type table
    assert s["table_bytes_before"] == 200 * 16 * 4 and s["table_bytes_after"] < 200 * 16 * bits / 8 + 200 * 4
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    a = gbq.attributes
    assert (a.get_int("bits"), a.get_int("block_size"), a.get_int("gather_axis"), a.get_int("quantize_axis")) == (
        bits, 16, 0, 1)
    data = gbq.inputs[0].const_value
    assert data.dtype == ir.DataType.UINT8 and data.shape == ir.Shape([200, 16 * bits // 8])
    assert (len(gbq.inputs) > 3) == (not symmetric)
    assert "table" not in model.graph.initializers and "types" in model.graph.initializers
    feed = _feed()
    got = run(model, feed)[0]
    table, types = _tables()
    np.testing.assert_allclose(got, _dequant_gbq(gbq)[feed["ids"]] + types[feed["tt"]], rtol=1e-5, atol=1e-5)
    err = np.linalg.norm(_dequant_gbq(gbq) - table) / np.linalg.norm(table)
    assert err < {2: 0.4, 4: 0.1, 8: 0.006}[bits]
    assert cosine(ref[0], got) > {2: 0.9, 4: 0.99, 8: 0.9999}[bits]


def _tied(vocab=128, hidden=64, folded=False):
    """ids → Gather(E) → Relu → MatMul(E^T) → logits; E^T is a Transpose of E, or (``folded``)
    a separate initializer holding the transposed copy (what constant folding leaves)."""
    rng = np.random.default_rng(0)
    e = rng.standard_normal((vocab, hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(e, "E")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"), helper.make_node("Relu", ["emb"], ["h"])]
    if folded:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(e.T), "ET"))
    else:
        nodes.append(helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["h", "ET"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto), e


def _ids(vocab=128):
    return {"ids": np.random.default_rng(1).integers(0, vocab, (2, 5))}


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("head_bits", [0, 8])
def test_tied_embedding_stored_once(folded, symmetric, head_bits):
    model, e = _tied(folded=folded)
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, symmetric=symmetric, head_bits=head_bits,
                                        accuracy_level=0))(model)
    result = QuantizeGatherBlock(Opts(bits=4, block_size=32, symmetric=symmetric))(model)
    assert result.stats.counts["tied_tables_shared"] == 1 and "tables_quantized" not in result.stats.counts
    assert any("stored once" in n for n in result.stats.notes)
    head = next(n for n in model.graph if n.op_type == "MatMulNBits")
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    assert gbq.inputs[0] is head.inputs[1]  # one packed initializer for both
    bits = head_bits or 4
    if bits == 8 and not symmetric:  # a byte per zero point: the head's own, reshaped, not a copy
        assert gbq.inputs[3].producer().inputs[0] is head.inputs[3]
    assert gbq.attributes.get_int("bits") == bits and gbq.attributes.get_int("quantize_axis") == 2
    assert "E" not in model.graph.initializers and "ET" not in model.graph.initializers
    big = [v for v in model.graph.initializers.values() if v.const_value.size >= 128 * 64 * bits // 8]
    assert len(big) == 1
    logits, emb = run(model, _ids())
    table = _dequant_gbq(gbq)
    ids = _ids()["ids"]
    np.testing.assert_allclose(emb, table[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, np.maximum(table[ids], 0) @ table.T, rtol=1e-3, atol=1e-3)
    assert np.linalg.norm(table - e) / np.linalg.norm(e) < (0.1 if bits == 4 else 0.006)


def test_tied_not_shared_when_hidden_is_padded():
    model, e = _tied(hidden=48)  # K=48 is padded to 2 blocks of 32 in MatMulNBits
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, accuracy_level=0))(model)
    result = QuantizeGatherBlock(Opts(bits=4, block_size=16))(model)
    assert "tied_tables_shared" not in result.stats.counts and result.stats.counts["tables_quantized"] == 1
    assert any("stored twice" in n and "not a multiple of the head's block 32" in n for n in result.stats.notes)
    logits, emb = run(model, _ids())
    ids = _ids()["ids"]
    assert cosine(emb, e[ids]) > 0.99 and logits.shape == (2, 5, 128)


def test_tied_share_disabled_or_head_still_float():
    model, _ = _tied()
    result = QuantizeGatherBlock(Opts(block_size=32))(model)  # quantize-nbits has not run
    assert any("run quantize-nbits first" in n for n in result.stats.notes)
    model, _ = _tied()
    QuantizeNBits(QuantizeNBits.Options(block_size=32))(model)
    result = QuantizeGatherBlock(Opts(block_size=32, share_tied=False))(model)
    assert result.stats.counts["tables_quantized"] == 1 and "tied_tables_shared" not in result.stats.counts


def test_only_gathered_rows_no_float_table():
    model = embedding()
    QuantizeGatherBlock(Opts(block_size=16))(model)
    assert "DequantizeLinear" not in ops_of(model)
    assert not [v for v in model.graph.initializers.values()
                if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= 200 * 16]


@pytest.mark.parametrize(
    "options,expect",
    [
        ({"bits": 3}, "bits=3; supported: 2, 4, 8"),
        ({"block_size": 8}, "block_size=8; supported: 16, 32, 64, 128, 256"),
        ({"method": "gptq"}, "supported: rtn, mse, hqq"),
        ({"method": "hqq", "symmetric": True}, "symmetric=false"),
        ({"scale_dtype": "int8"}, "float32, float16"),
    ],
)
def test_unsupported_options(options, expect):
    with pytest.raises(UnsupportedError, match=expect):
        QuantizeGatherBlock(Opts(**options))(embedding())

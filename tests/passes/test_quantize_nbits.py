import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import PassContext
from graphc.passes import _blockquant as bq
from graphc.passes.quantize_nbits import META_WEIGHT, QuantizeNBits
from tests.passes.graphs import cosine, gemm, mlp, ops_of, rotary_angles, run

Opts = QuantizeNBits.Options


def _x(k=32, seed=1):
    return np.random.default_rng(seed).standard_normal((2, 5, k)).astype(np.float32)


def _weights(k=32, n=48, seed=0):
    rng = np.random.default_rng(seed)  # the draws of graphs.mlp
    w1 = rng.standard_normal((k, n)).astype(np.float32) * 0.2
    b1 = rng.standard_normal(n).astype(np.float32) * 0.1
    w2 = rng.standard_normal((n, k)).astype(np.float32) * 0.2
    w3 = rng.standard_normal((k, k)).astype(np.float32) * 0.2
    return w1, b1, w2, w3


def _init(model, name):
    value = model.graph.initializers[name]
    return value.const_value.numpy()


def _scales_of(model, node):
    """The float scales a MatMulNBits reads (looking through the float16 Cast)."""
    v = node.inputs[2]
    if v.const_value is None:
        v = v.producer().inputs[0]
    return v.const_value.numpy().astype(np.float32)


def _dequant_nbits(model, node):
    """Numpy dequantization of a MatMulNBits node's stored arrays, independent of _blockquant:
    → W [K, N]."""
    a = node.attributes
    k, n, bits, block = a.get_int("K"), a.get_int("N"), a.get_int("bits"), a.get_int("block_size")
    b = node.inputs[1].const_value.numpy()
    n_blocks = -(-k // block)
    assert b.shape == (n, n_blocks, block * bits // 8) and b.dtype == np.uint8
    per = 8 // bits
    codes = np.stack([(b >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1).reshape(n, n_blocks, block)
    scales = _scales_of(model, node).reshape(n, n_blocks)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zp_packed = node.inputs[3].const_value.numpy()
        zp = np.stack([(zp_packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1)
        zp = zp.reshape(n, -1)[:, :n_blocks]
    else:
        zp = np.full((n, n_blocks), 1 << (bits - 1))
    w_t = (codes.astype(np.float32) - zp[:, :, None]) * scales[:, :, None]
    return w_t.reshape(n, -1)[:, :k].T


def _nbits_nodes(model):
    return [n for n in model.graph if n.op_type == "MatMulNBits"]


def test_structure_and_stats():
    model = mlp()
    result = QuantizeNBits(Opts(bits=4, block_size=16, symmetric=False))(model)
    s = result.stats.to_dict()
    assert s["matmuls_quantized"] == 3
    assert any(k["node"] == "act_act" and "not a constant" in k["reason"] for k in s["skipped"])
    assert s["weight_bytes_before"] == 4 * (32 * 48 * 2 + 32 * 32)
    assert s["weight_bytes_after"] < s["weight_bytes_before"] / 5
    assert 0 < s["mean_rel_weight_error"] < 0.15
    nodes = _nbits_nodes(model)
    assert len(nodes) == 3 and ops_of(model).count("MatMul") == 1  # only act x act left
    fc1 = next(n for n in nodes if n.name == "fc1_q4")
    a = fc1.attributes
    assert (a.get_int("K"), a.get_int("N"), a.get_int("bits"), a.get_int("block_size"), a.get_int("accuracy_level")) == (
        32, 48, 4, 16, 4)
    assert fc1.inputs[1].const_value.shape == ir.Shape([48, 2, 8])
    assert fc1.inputs[3].const_value.shape == ir.Shape([48, 1])  # 2 blocks x 4 bits packed in a byte
    assert fc1.metadata_props[META_WEIGHT]
    assert "W1" not in model.graph.initializers


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_matches_numpy_dequantization(bits, symmetric):
    """Packing check: ORT's MatMulNBits output equals x @ (numpy dequantization of the stored
    arrays), for K a multiple of the block and K padded (fc2: K=48 with block 32)."""
    model = mlp()
    QuantizeNBits(Opts(bits=bits, block_size=32, symmetric=symmetric, method="mse", accuracy_level=0))(model)
    x = _x()
    y, scores = run(model, {"x": x})
    by_name = {n.name: n for n in _nbits_nodes(model)}
    w1q, w2q, w3q = (_dequant_nbits(model, by_name[f"{n}_q{bits}"]) for n in ("fc1", "fc2", "fc3"))
    _, b1, _, _ = _weights()
    h = np.maximum(x @ w1q + b1, 0)
    np.testing.assert_allclose(y, h @ w2q, rtol=1e-4, atol=1e-4)
    z = x @ w3q
    np.testing.assert_allclose(scores, z @ z.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weights_close_to_float(bits):
    model = mlp()
    w1, _, w2, w3 = _weights()
    QuantizeNBits(Opts(bits=bits, block_size=16, symmetric=False, method="mse"))(model)
    by_name = {n.name: n for n in _nbits_nodes(model)}
    for w, name in ((w1, "fc1"), (w2, "fc2"), (w3, "fc3")):
        err = np.linalg.norm(_dequant_nbits(model, by_name[f"{name}_q{bits}"]) - w) / np.linalg.norm(w)
        assert err < (0.08 if bits == 4 else 0.006)


def test_accuracy_level_4_runs_close():
    model = mlp()
    ref = run(model, {"x": _x()})
    QuantizeNBits(Opts(bits=8, block_size=32, accuracy_level=4))(model)
    got = run(model, {"x": _x()})
    assert cosine(ref[0], got[0]) > 0.999


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_qdq_emit_checks_and_runs(bits, symmetric):
    model = mlp()
    x = _x()
    ref = run(model, {"x": x})
    QuantizeNBits(Opts(bits=bits, block_size=16, symmetric=symmetric, emit="qdq"))(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert model.opset_imports[""] >= 21
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3
    data = dqs[0].inputs[0].const_value
    want = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4, (8, True): ir.DataType.INT8,
            (8, False): ir.DataType.UINT8}[bits, symmetric]
    assert data.dtype == want and dqs[0].attributes.get_int("block_size") == 16
    got = run(model, {"x": x})
    assert cosine(ref[0], got[0]) > (0.99 if bits == 4 else 0.9999)


def test_qdq_equals_matmulnbits_numerically():
    # ORT fuses DequantizeLinear(4-bit, blocked) → MatMul into MatMulNBits with accuracy_level 4
    # (session option session.qdq_matmulnbits_accuracy_level), so compare with that level
    x = _x()
    a, b = mlp(), mlp()
    QuantizeNBits(Opts(bits=4, block_size=16, symmetric=False, emit="qdq"))(a)
    QuantizeNBits(Opts(bits=4, block_size=16, symmetric=False, emit="ms", accuracy_level=4))(b)
    np.testing.assert_allclose(run(a, {"x": x})[0], run(b, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_qdq_per_channel():
    model = mlp()
    ref = run(model, {"x": _x()})
    QuantizeNBits(Opts(bits=8, block_size=0, emit="qdq"))(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes.get_int("axis") == 1 and "block_size" not in dq.attributes
    assert cosine(ref[0], run(model, {"x": _x()})[0]) > 0.9999


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bias_alpha_beta(trans_b):
    model = gemm(trans_b=trans_b)
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    result = QuantizeNBits(Opts(bits=8, block_size=16, accuracy_level=0))(model)
    assert result.stats.counts["gemms_quantized"] == 1 and ops_of(model) == ["Cast", "MatMulNBits"]
    np.testing.assert_allclose(run(model, {"x": x})[0], ref, rtol=0.02, atol=0.05)


def test_head_bits():
    model = mlp()  # fc2 produces the graph output y
    result = QuantizeNBits(Opts(bits=4, block_size=16, head_bits=8))(model)
    bits = {n.name: n.attributes.get_int("bits") for n in _nbits_nodes(model)}
    assert bits == {"fc1_q4": 4, "fc2_q8": 8, "fc3_q4": 4}
    assert result.stats.counts["head_matmuls_at_head_bits"] == 1


def test_float16_matmul_skipped_with_reason():
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W"], ["y"], name="half")], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 16])],
        [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    model = ir.serde.deserialize_model(proto)
    result = QuantizeNBits()(model)
    assert not result.modified and "not float32" in result.stats.skipped[0]["reason"]


def test_exclude_and_min_elements_skip_with_reason():
    model = mlp()
    result = QuantizeNBits(Opts(exclude=("fc1",), min_elements=32 * 32 + 1))(model)
    reasons = {s["node"]: s["reason"] for s in result.stats.skipped}
    assert reasons["fc1"] == "excluded by option" and "min_elements" in reasons["fc3"]
    assert result.stats.counts["matmuls_quantized"] == 1


@pytest.mark.parametrize(
    "options,expect",
    [
        ({"bits": 3}, "bits=3.*supported: 2, 4, 8"),
        ({"block_size": 24}, "block_size=24.*supported: 16, 32, 64, 128, 256"),
        ({"block_size": 512}, "supported: 16, 32, 64, 128, 256"),
        ({"block_size": 0}, "per-channel.*emit='qdq'.*largest MatMulNBits block is 256"),
        ({"bits": 2, "emit": "qdq"}, "no 2-bit tensor type.*emit='qdq': 4, 8.*emit='ms': 2, 4, 8"),
        ({"block_size": 24, "emit": "qdq"}, "0 \\(per-channel\\), 16, 32, 64, 128, 256"),
        ({"method": "awq"}, "method='awq'; supported: rtn, mse, hqq, gptq"),
        ({"emit": "tensorrt"}, "supported: ms, qdq"),
        ({"method": "hqq", "symmetric": True}, "symmetric=false"),
        ({"head_bits": 3}, "bits=3"),
        ({"scale_dtype": "bfloat16"}, "float32, float16"),
        ({"refine_sweeps": 2}, "refine_sweeps=2.*method='gptq' only"),
        ({"method": "gptq", "refine_sweeps": -1}, "refine_sweeps=-1"),
    ],
)
def test_unsupported_options_list_what_is_supported(options, expect):
    with pytest.raises(UnsupportedError, match=expect):
        QuantizeNBits(Opts(**options))(mlp())


def test_gptq_needs_calibration():
    p = QuantizeNBits(Opts(method="gptq"))
    assert p.needs_calibration
    with pytest.raises(PassError, match="calibration"):
        p(mlp())


def test_gptq_with_calibration_beats_rtn_on_outputs():
    rng = np.random.default_rng(0)
    scale = np.ones(32, np.float32)
    scale[:3] = 6.0  # a few large input channels, as after a transformer LayerNorm
    feeds = [{"x": (rng.standard_normal((4, 16, 32)) * scale).astype(np.float32)} for _ in range(8)]
    test = {"x": (rng.standard_normal((4, 16, 32)) * scale).astype(np.float32)}
    ref = run(mlp(), test)[0]
    errs = {}
    for method, refit, sweeps in (("rtn", False, 0), ("gptq", False, 0), ("gptq", True, 0), ("gptq", False, 2)):
        model = mlp()
        ctx = PassContext(calibration=feeds, calibration_source="test")
        result = QuantizeNBits(Opts(bits=2, block_size=16, symmetric=False, method=method, accuracy_level=0,
                                    refit_scales=refit, refine_sweeps=sweeps), ctx)(model)
        if method == "gptq":
            assert any("gptq Hessians" in n for n in result.stats.notes)
        errs[method, refit, sweeps] = np.linalg.norm(run(model, test)[0] - ref) / np.linalg.norm(ref)
    assert errs["gptq", False, 0] < 0.85 * errs["rtn", False, 0]
    assert errs["gptq", True, 0] < errs["gptq", False, 0]  # scales refitted on the Hessian: held-out error lower too
    assert errs["gptq", False, 2] < errs["gptq", False, 0]  # codes refined on the Hessian: likewise


def test_shared_weight_quantized_once():
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["y1"], name="m1"),
             helper.make_node("MatMul", ["b", "W"], ["y2"], name="m2")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 32]) for n in "ab"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 16]) for n in ("y1", "y2")],
        [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    model = ir.serde.deserialize_model(proto)
    result = QuantizeNBits(Opts(block_size=16, symmetric=True))(model)
    assert result.stats.counts["matmuls_quantized"] == 2
    packed = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8]
    assert len(packed) == 1 and result.stats.counts["weight_bytes_before"] == w.nbytes
    np.testing.assert_allclose(bq.unpack(packed[0].const_value.numpy(), 4, 16).shape, (16, 2, 16))


def test_outer_product_of_rotary_left_in_float():
    """positions [N, 1] x inv_freq [1, D/2]: no linear layer, and a 4-bit inverse frequency
    would turn every rotary angle by position x its error."""
    model, freq = rotary_angles()
    result = QuantizeNBits(Opts(bits=4, block_size=16))(model)
    assert not result.modified and not _nbits_nodes(model)
    assert "K=1 input rows" in result.stats.skipped[0]["reason"]
    pos = np.arange(2048, dtype=np.float32).reshape(-1, 1)
    np.testing.assert_allclose(run(model, {"pos": pos})[0], np.cos(pos * freq), rtol=0, atol=1e-5)  # int4: ~0.5 rad


def test_weights_in_if_bodies_are_quantized_without_calibration_statistics():
    """Each branch's MatMul becomes MatMulNBits inside its body; gptq falls back to mse there
    (no calibration statistics inside bodies), said in a note; both branches still compute
    their float result within 4-bit error."""
    import onnx_ir as ir

    from graphc.checks.validate import make_session
    from tests import third_party_graphs as tp

    model = ir.serde.deserialize_model(tp.if_with_weights(k=64, n=96))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    refs = [make_session(model).run(None, {"x": x, "sr": np.array(sr)})[0] for sr in (16000, 8000)]
    result = QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, method="gptq"),
                           context=PassContext(calibration=[{"x": x, "sr": np.array(16000)}])).call(model)
    stats = result.stats
    assert result.modified and stats.counts["subgraph_matmuls"] == 2 and stats.counts["matmuls_quantized"] == 2
    assert any("quantized with mse, not gptq" in n for n in stats.notes)
    bodies = [a.value for n in model.graph for a in n.attributes.values() if a.type == ir.AttributeType.GRAPH]
    assert all(any(n.op_type == "MatMulNBits" for n in b) for b in bodies) and len(bodies) == 2
    for sr, ref in zip((16000, 8000), refs):
        got = make_session(model).run(None, {"x": x, "sr": np.array(sr)})[0]
        cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cos > 0.99, (sr, cos)


def test_batches_for_workers_bound_the_bytes_in_flight_but_keep_every_worker_busy():
    from types import SimpleNamespace

    from graphc.passes import _blockquant as bq
    from graphc.passes import quantize_nbits as qn

    def spec(k, n, method=bq.Method.GPTQ):
        return (SimpleNamespace(shape=(k, n)), method, 4, 32)

    small = [spec(64, 64) for _ in range(20)]
    assert [len(b) for b in qn._batches(small, 2)] == [8, 8, 4]  # 4 per worker
    big = [spec(8192, 2048) for _ in range(5)]  # 64 MB weight + 512 MB Hessian each
    assert [len(b) for b in qn._batches(big, 2)] == [2, 2, 1]  # past the bytes, one per worker
    rtn = [spec(8192, 2048, bq.Method.RTN) for _ in range(9)]  # no Hessian: 64 MB each
    assert [len(b) for b in qn._batches(rtn, 2)] == [8, 1]
    mixed = [spec(64, 64), spec(8192, 2048), spec(64, 64), spec(64, 64)]
    assert sum(qn._batches(mixed, 2), []) == mixed  # order kept

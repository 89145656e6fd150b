"""awq-scale: activation-aware channel scaling folded into norms / gated FFNs (float-exact),
lowering the error of 4-bit weights; hand-built graphs and the tiny Llama export."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.core import io
from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import PassContext
from graphc.passes.awq_scale import AwqScale
from graphc.passes.quantize_nbits import QuantizeNBits
from graphc.checks.validate import make_session, synthesize_inputs

K, F = 64, 128  # hidden, FFN


def _block(seed=0, residual_reader=False, head=False) -> ir.Model:
    """LayerNorm(γ, β) → q, k MatMuls; RMSNorm → gate/up SwiGLU → down. A few channels of γ are
    large (the outlier channels AWQ is about)."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(K, np.float32)
    gamma[[3, 17, 40]] = 12.0
    inits = {
        "g1": gamma, "b1": (rng.standard_normal(K) * 0.1).astype(np.float32),
        "g2": (1 + rng.random(K)).astype(np.float32),
        "Wq": (rng.standard_normal((K, K)) * 0.1).astype(np.float32),
        "Wk": (rng.standard_normal((K, K)) * 0.1).astype(np.float32),
        "Wg": (rng.standard_normal((K, F)) * 0.1).astype(np.float32),
        "Wu": (rng.standard_normal((K, F)) * 0.1).astype(np.float32),
        "Wd": (rng.standard_normal((F, K)) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], axis=-1, epsilon=1e-5, name="ln"),
        helper.make_node("MatMul", ["n1", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n1", "Wk"], ["k"], name="k_proj"),
        helper.make_node("Add", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["x", "qk"], ["h"]),
        helper.make_node("SimplifiedLayerNormalization", ["h", "g2"], ["n2"], axis=-1, epsilon=1e-5, name="rms"),
        helper.make_node("MatMul", ["n2", "Wg"], ["gate"], name="gate_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sg"]),
        helper.make_node("Mul", ["gate", "sg"], ["silu"]),
        helper.make_node("MatMul", ["n2", "Wu"], ["up"], name="up_proj"),
        helper.make_node("Mul", ["silu", "up"], ["prod"]),
        helper.make_node("MatMul", ["prod", "Wd"], ["d"], name="down_proj"),
        helper.make_node("Add", ["h", "d"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", K])]
    if residual_reader:  # the normalized value also goes elsewhere: it must not be scaled
        nodes.append(helper.make_node("Add", ["n1", "x"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["b", "s", K]))
    if head:  # the FFN's down projection makes a graph output: an LM head's position
        outputs.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, ["b", "s", K]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10  # (SimplifiedLayerNormalization is ORT's, unknown to onnx.checker)
    return ir.serde.deserialize_model(proto)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 16, K)).astype(np.float32)} for _ in range(n)]


def _out(model, feeds):
    session = make_session(model)
    return [session.run(["y"], f)[0] for f in feeds]


def _rel(outs, refs):
    return float(np.mean([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(outs, refs)]))


def _awq(model, calib, **options):
    return AwqScale(AwqScale.Options(**{"block_size": 32, **options}), PassContext(calibration=calib))(model)


def _int4(model):
    QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32, method="rtn"))(model)


def test_scaling_keeps_the_float_function_and_folds_into_norms_and_up():
    model, calib, test = _block(), _feeds(4, 1), _feeds(2, 9)
    ref = _out(model, test)
    result = _awq(model, calib)
    assert result.modified
    groups = result.stats.details["groups"]
    kinds = {tuple(g["matmuls"]): g["kind"] for g in groups}
    assert kinds.get(("q_proj", "k_proj")) == "norm"  # γ and β of the LayerNorm carry 1/s
    assert all(0 < g["alpha"] < 1 and g["error_reduction"] >= 0.01 for g in groups)
    assert _rel(_out(model, test), ref) < 1e-5
    ln = next(n for n in model.graph if n.name == "ln")
    assert not np.allclose(ln.inputs[1].const_value.numpy(), _block().graph.initializers["g1"].const_value.numpy())
    assert kinds.get(("down_proj",)) == "gated"  # the gated product's scale went into up's columns


@pytest.mark.parametrize("best", [0, 1, 5, 8, 13, 19])
def test_coarse_to_fine_search_finds_the_full_grids_minimum_of_a_unimodal_error(best):
    from graphc.passes.awq_scale import _search

    calls = []

    def error(j):
        calls.append(j)
        return (j - best) ** 2 + 0.5 * (j > best)

    for step, most in ((4, 11), (2, 12)):  # the coarse points + at most 2 (step - 1) around the best
        calls.clear()
        got = _search(20, step, error)
        assert min(got, key=got.get) == best and 0 in got
        assert len(calls) == len(set(calls)) <= most
    assert sorted(_search(20, 1, error)) == list(range(20))


def test_coarse_search_chooses_the_full_grids_alphas_here():
    full, coarse = _block(), _block()
    calib = _feeds(4, 1)
    a = _awq(full, calib).stats.details["groups"]
    b = _awq(coarse, calib, coarse_step=2).stats.details["groups"]
    assert [g["alpha"] for g in a] == [g["alpha"] for g in b]


def test_scaling_lowers_the_4bit_output_error():
    calib, test = _feeds(4, 1), _feeds(2, 9)
    ref = _out(_block(), test)
    plain = _block()
    _int4(plain)
    scaled = _block()
    _awq(scaled, calib)
    _int4(scaled)
    e_plain, e_awq = _rel(_out(plain, test), ref), _rel(_out(scaled, test), ref)
    assert e_awq < 0.8 * e_plain, (e_awq, e_plain)


def test_a_second_reader_of_the_normalized_value_leaves_its_group_alone():
    model = _block(residual_reader=True)
    _awq(model, _feeds(2, 1))
    assert next(n for n in model.graph if n.name == "ln").inputs[1].name == "g1"
    assert next(n for n in model.graph if n.name == "q_proj").inputs[1].name == "Wq"


def test_a_matmul_making_a_graph_output_is_not_scaled():
    model = _block(head=True)
    result = _awq(model, _feeds(2, 1))
    assert next(n for n in model.graph if n.name == "down_proj").inputs[1].name == "Wd"
    assert any(s["node"] == "down_proj" and "graph output" in s["reason"] for s in result.stats.skipped)


@pytest.mark.parametrize("options, error, match", [
    ({"bits": 3}, UnsupportedError, "bits=3; supported: 2, 4, 8"),
    ({"block_size": 48}, UnsupportedError, "block_size=48; supported: 16, 32, 64, 128, 256"),
    ({"method": "gptq"}, UnsupportedError, "not a search quantizer"),
    ({"method": "bogus"}, Exception, "method"),
    ({"grid": 1}, UnsupportedError, "grid=1"),
    ({"grid": "x"}, UnsupportedError, "grid='x'; needs a whole number"),
    ({"min_gain": 1.5}, UnsupportedError, "min_gain=1.5; needs a fraction"),
    ({"coarse_step": 0}, UnsupportedError, "coarse_step=0; needs a whole number >= 1"),
])
def test_bad_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        _awq(_block(), _feeds(1, 1), **options)


def test_no_calibration_is_an_error():
    with pytest.raises(PassError, match="needs calibration data"):
        AwqScale()(_block())


def test_tiny_llama_export_is_unchanged_in_float_and_closer_at_4bit(tmp_path):
    pytest.importorskip("torch")
    from graphc.models.fixtures import export_tiny

    path = tmp_path / "llama.onnx"
    export_tiny("llama", path)
    model = io.load_model(path)
    calib = synthesize_inputs(model, count=4, seed=1)
    test = synthesize_inputs(model, count=2, seed=7)
    name = make_session(model).get_outputs()[0].name

    def logits(m):
        s = make_session(m)
        return [s.run([name], f)[0] for f in test]

    ref = logits(model)
    plain = io.load_model(path)
    result = _awq(model, calib, block_size=16)
    layers = int(model.metadata_props["graphc.arch.num_layers"])
    assert result.stats.counts.get("groups_scaled", 0) >= layers  # most groups gain from scaling
    assert _rel(logits(model), ref) < 1e-4
    for m in (plain, model):
        QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=16, method="rtn"))(m)
    assert _rel(logits(model), ref) < _rel(logits(plain), ref)


def test_few_calibration_tokens_search_through_a_thin_factor_with_the_same_choices(monkeypatch):
    """16 calibration tokens on 64-128 wide inputs: the errors come from a factor of G with 16
    rows instead of G itself; the alphas and error reductions are the K x K path's."""
    from graphc.passes import _gram_factor, awq_scale

    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((1, 8, K)).astype(np.float32)} for _ in range(2)]
    used = []
    real = awq_scale.thin_factor
    monkeypatch.setattr(awq_scale, "thin_factor", lambda g, t: used.append(r := real(g, t)) or r)
    thin = _awq(_block(), calib).stats.details["groups"]
    assert used and all(f is not None and f.shape[0] <= 16 for f in used)
    monkeypatch.setattr(_gram_factor, "MAX_RANK_FRACTION", 0.0)
    used.clear()
    full = _awq(_block(), calib).stats.details["groups"]
    assert used and all(f is None for f in used)
    assert [(g["matmuls"], g["alpha"]) for g in thin] == [(g["matmuls"], g["alpha"]) for g in full]
    assert [g["error_reduction"] for g in thin] == pytest.approx([g["error_reduction"] for g in full], abs=1e-4)

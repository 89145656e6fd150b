"""split-skip-norm: fused skip + norm ops as Add nodes and the plain norm op.

Numeric (ONNX Runtime on the split graph against the fused one: the residual sum bit for bit,
the normalized output within float rounding), ONNX Runtime does not fuse the split form back,
and each case that stays fused says why.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphc.core.pass_base import PassContext
from graphc.core.target import TABLE, Target
from graphc.passes.split_skip_norm import SplitSkipNorm

D = 16


def _model(op: str, *, bias: bool = True, beta: bool = True, outputs: int = 4, dtype=TensorProto.FLOAT,
           opset: int = 17) -> ir.Model:
    """x, s [batch, seq, D] → op → y and the residual sum (both graph outputs)."""
    np_dtype = np.float32 if dtype == TensorProto.FLOAT else np.float16
    rng = np.random.default_rng(0)
    shape = ["batch", "seq", D]
    inits = [helper.make_tensor("gamma", dtype, [D], rng.uniform(0.5, 1.5, D).astype(np_dtype).tolist()),
             helper.make_tensor("beta", dtype, [D], rng.uniform(-0.5, 0.5, D).astype(np_dtype).tolist()),
             helper.make_tensor("bias", dtype, [D], rng.uniform(-0.5, 0.5, D).astype(np_dtype).tolist())]
    if op == "SkipLayerNormalization":
        ins = ["x", "s", "gamma", "beta" if beta else "", "bias" if bias else ""]
    else:
        ins = ["x", "s", "gamma", "bias" if bias else ""]
    while ins and not ins[-1]:
        ins.pop()
    outs = ["y", "mean", "inv_std", "sum"][:outputs]
    nodes = [helper.make_node(op, ins, outs, domain="com.microsoft", epsilon=1e-5, name="norm0")]
    graph_outs = [helper.make_tensor_value_info("y", dtype, shape)]
    if outputs >= 4:  # the residual stream goes on, as in a pre-norm decoder
        graph_outs.append(helper.make_tensor_value_info("sum", dtype, shape))
    if outputs >= 2 and outputs < 4:
        graph_outs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, shape),
                                           helper.make_tensor_value_info("s", dtype, shape)], graph_outs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, feed: dict, *, optimized: str | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _split(model: ir.Model, target: Target = Target.X86_AVX2, **options):
    return SplitSkipNorm(SplitSkipNorm.Options(simplified=True, **options), PassContext(target=TABLE[target]))(model)


def _feed(dtype=np.float32):
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, 5, D)).astype(dtype) * 3, "s": rng.standard_normal((2, 5, D)).astype(dtype)}


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("op,bias", [("SkipLayerNormalization", True), ("SkipSimplifiedLayerNormalization", True),
                                     ("SkipSimplifiedLayerNormalization", False)])
def test_split_matches_the_fused_op_and_ort_keeps_it_split(op, bias, tmp_path):
    model = _model(op, bias=bias)
    feed = _feed()
    fused = _run(model, feed)
    result = _split(model)
    assert result.modified and result.stats.counts["split"] == 1
    plain = "LayerNormalization" if op == "SkipLayerNormalization" else "SimplifiedLayerNormalization"
    assert _ops(model) == ["Add", *(["Add"] if bias else []), plain]
    split = _run(model, feed, optimized=str(tmp_path / "opt.onnx"))
    np.testing.assert_allclose(split[0], fused[0], rtol=1e-5, atol=1e-5)
    # the residual stream: the same sums in the same order, bit for bit
    np.testing.assert_array_equal(split[1], fused[1])
    kept = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert op not in kept, f"ONNX Runtime fused the split form back: {kept}"


def test_layer_norm_without_bias_stays_fused():
    model = _model("SkipLayerNormalization", bias=False)
    result = _split(model)
    assert not result.modified and _ops(model)[0] == "SkipLayerNormalization"
    assert "fuse Add + LayerNormalization back" in result.stats.skipped[0]["reason"]


def test_a_read_mean_output_stays_fused():
    model = _model("SkipLayerNormalization", outputs=2)
    result = _split(model)
    assert not result.modified and "mean" in result.stats.skipped[0]["reason"]


def test_float16_and_old_opsets_stay_fused():
    half = _model("SkipSimplifiedLayerNormalization", dtype=TensorProto.FLOAT16)
    assert not _split(half).modified
    old = _model("SkipLayerNormalization", opset=14)
    result = _split(old)
    assert not result.modified and "opset 14" in result.stats.skipped[0]["reason"]


def test_rms_form_stays_fused_by_default():
    model = _model("SkipSimplifiedLayerNormalization")
    result = SplitSkipNorm(context=PassContext(target=TABLE[Target.X86_AVX2]))(model)
    assert not result.modified and "simplified" in result.stats.skipped[0]["reason"]
    model = _model("SkipLayerNormalization")
    assert SplitSkipNorm(context=PassContext(target=TABLE[Target.X86_AVX2]))(model).modified


def test_arm64_target_keeps_the_fused_form():
    model = _model("SkipLayerNormalization")
    result = _split(model, Target.ARM64)
    assert not result.modified and _ops(model)[0] == "SkipLayerNormalization"
    assert "arm64" in result.stats.notes[0]


def test_layer_norm_without_beta_splits():
    model = _model("SkipLayerNormalization", beta=False)
    feed = _feed()
    fused = _run(model, feed)
    assert _split(model).modified
    np.testing.assert_allclose(_run(model, feed)[0], fused[0], rtol=1e-5, atol=1e-5)


def test_an_unknown_machine_kind_is_refused():
    from graphc.core.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="targets='x86'; supported: arm64, x86_64"):
        _split(_model("SkipLayerNormalization"), targets=("x86",))

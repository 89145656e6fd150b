"""Deployment targets: CPU detection, int8 formulations per target, and the saturation of
AVX2's u8×s8 kernel reproduced in numpy (so every machine checks every target's arithmetic)."""

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphc.core import target as tg
from graphc.checks import target_checks as tc
from graphc.core.errors import GraphcError, UnsupportedError
from graphc.core.pass_base import PassContext
from graphc.passes.quantize_int8 import QuantizeInt8
from tests.passes.graphs import _model, cosine, run


def saturation_prone(seed: int = 0, k: int = 128, n: int = 64) -> ir.Model:
    """One MatMul whose activations sit near the top of their range (uint8 codes near 255)
    and whose weights sit near ±max: every adjacent product pair overflows an int16."""
    rng = np.random.default_rng(seed)
    w = (rng.choice([-1.0, 1.0], size=(k, n)) * rng.uniform(0.9, 1.0, size=(k, n))).astype(np.float32)
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        {"W": w},
    )


def saturation_feed(seed: int = 1, k: int = 128) -> dict:
    x = np.random.default_rng(seed).uniform(3.0, 4.0, size=(8, k)).astype(np.float32)
    x[:, 0] = -0.5  # the range includes 0 and a little below: zero point near 0, codes near 255
    return {"x": x}


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """ONNX DynamicQuantizeLinear in numpy."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8), scale, zp


def emulated_output(model: ir.Model, feed: dict, on: str) -> np.ndarray:
    """The quantized single-MatMul model's output as ``on``'s kernel computes it."""
    node = next(n for n in model.graph if n.op_type == "MatMulIntegerToFloat")
    inits = model.graph.initializers
    w = inits[node.inputs[1].name].const_value.numpy()
    scale_value = node.inputs[3]
    producer = scale_value.producer()
    scale = (inits[producer.inputs[0].name] if producer is not None else inits[scale_value.name]).const_value.numpy()
    wzp = int(inits[node.inputs[5].name].const_value.numpy()) if len(node.inputs) > 5 and node.inputs[5] is not None else 0
    xq, xs, xzp = dynamic_quantize(feed["x"])
    acc = tg.emulate_gemm(xq, w, xzp, wzp, on)
    return acc.astype(np.float64) * xs * scale.astype(np.float64).reshape(1, -1)


def test_flags_name_the_target():
    assert tg.from_flags({"avx2", "fma"}, "x86_64") is tg.Target.X86_AVX2
    assert tg.from_flags({"avx2", "avx512f", "avx512bw"}, "x86_64") is tg.Target.X86_AVX512
    assert tg.from_flags({"avx2", "avx512bw", "avx512_vnni"}, "x86_64") is tg.Target.X86_AVX512_VNNI
    assert tg.from_flags({"avx2", "avx_vnni"}, "x86_64") is tg.Target.X86_AVX_VNNI
    assert tg.from_flags({"asimd", "asimddp"}, "arm64") is tg.Target.ARM64


def test_unknown_target_lists_the_supported_ones():
    with pytest.raises(UnsupportedError, match="x86-avx2.*arm64"):
        tg.resolve("pentium")


def test_table_says_which_targets_saturate():
    saturating = {t for t, info in tg.TABLE.items() if info.saturates}
    assert saturating == {tg.Target.X86_AVX2, tg.Target.X86_AVX512}
    for info in tg.TABLE.values():
        assert info.int8_form in tg.exact_forms(info) and info.matmul_form in tg.exact_forms(info)


def test_host_probe_agrees_with_the_host_target():
    """The probe that decides ``auto`` on x86: a saturating kernel here means an AVX2-class target."""
    here = tg.host()
    if here.arch == "x86_64":
        assert tg.u8s8_saturates_here() == here.saturates


def test_emulated_avx2_kernel_saturates_and_vnni_does_not():
    rng = np.random.default_rng(0)
    a = rng.integers(240, 256, size=(4, 64)).astype(np.uint8)
    b = (rng.choice([-1, 1], size=(64, 32)) * rng.integers(120, 128, size=(64, 32))).astype(np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    spread = exact.max() - exact.min()
    assert np.array_equal(tg.emulate_gemm(a, b, 0, 0, "x86-avx512-vnni"), exact)
    assert np.array_equal(tg.emulate_gemm(a, b, 0, 0, "arm64"), exact)
    off = np.abs(tg.emulate_gemm(a, b, 0, 0, "x86-avx2") - exact).max() / spread
    assert off > 0.1  # the 23-25% seen on a real AVX2 machine
    # the same codes as uint8 around 128 (u8u8): exact on AVX2
    b_u8 = (b.astype(np.int16) + 128).astype(np.uint8)
    assert np.array_equal(tg.emulate_gemm(a, b_u8, 0, 128, "x86-avx2"), exact)
    # 7-bit codes: the pair sum stays inside int16 even with the u8s8 kernel
    b7 = np.clip(b // 2, -63, 63).astype(np.int8)
    assert np.array_equal(tg.emulate_gemm(a, b7, 0, 0, "x86-avx2"), a.astype(np.int64) @ b7.astype(np.int64))


def _pair_sums(q: np.ndarray) -> np.ndarray:
    q = np.abs(np.pad(q.astype(np.int64), ((0, q.shape[0] % 2), (0, 0))))
    return q[0::2] + q[1::2]


@pytest.mark.parametrize("shape", [(64, 32), (67, 5), (1, 3)])
def test_pair_bounded_codes_are_exact_on_the_avx2_kernel_and_the_bound_is_tight(shape):
    from graphc.passes._quant import pair_bounded_int8

    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    w[0] = np.abs(w).max() * np.sign(w[0])  # a pair of large weights, as in the saturating case
    for axis, dtype in ((1, np.float16), (None, np.float32)):
        q, scale = pair_bounded_int8(w, axis, dtype)
        assert q.dtype == np.int8 and np.abs(q.astype(np.int16)).max() <= 127 and _pair_sums(q).max() <= 128
        assert np.abs(q * scale.astype(np.float32) - w).max() <= 0.6 * scale.astype(np.float32).max()
        a = np.full((3, shape[0]), 255, np.uint8)
        assert np.array_equal(tg.emulate_gemm(a, q, 0, 0, "x86-avx2"), a.astype(np.int64) @ q.astype(np.int64))
    # one more unit in a pair (129) is enough to saturate: 255 · 129 > 32,767
    a = np.full((1, 2), 255, np.uint8)
    assert tg.emulate_gemm(a, np.array([[127], [1]], np.int8), 0, 0, "x86-avx2")[0, 0] == 255 * 128
    assert tg.emulate_gemm(a, np.array([[127], [2]], np.int8), 0, 0, "x86-avx2")[0, 0] == 32767


def test_pair_bounded_codes_are_exact_in_onnx_runtime_here():
    """The same codes through this machine's own u8×s8 kernel (on an AVX2 CPU: the saturating
    one), with the activations at 255 where every unbounded pair would overflow."""
    from graphc.passes._quant import pair_bounded_int8

    rng = np.random.default_rng(4)
    for m, k, n in ((1, 384, 64), (64, 1536, 96), (7, 67, 33)):
        w = (rng.choice([-1.0, 1.0], size=(k, n)) * rng.uniform(0.5, 1.0, size=(k, n))).astype(np.float32)
        q, _ = pair_bounded_int8(w, 1)
        a = rng.integers(250, 256, size=(m, k)).astype(np.uint8)
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                                  [helper.make_tensor("b", TensorProto.INT8, [k, n], q.tobytes(), raw=True)])
        model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
        model.ir_version = 8
        assert np.array_equal(run(model, {"a": a})[0], a.astype(np.int64) @ q.astype(np.int64))


@pytest.mark.parametrize("name", [t.value for t in tg.Target])
def test_each_target_gets_the_form_its_table_entry_says(name):
    info = tg.resolve(name)
    model = saturation_prone()
    result = QuantizeInt8(context=PassContext(target=info))(model)
    assert result.stats.details == {"target": name, "int8_form": info.matmul_form.value}
    # the table: pair-bounded MatMul weights where u8×s8 saturates, plain u8s8 elsewhere
    assert info.matmul_form is (tg.Int8Form.U8S8P if info.saturates else tg.Int8Form.U8S8)
    node = next(n for n in model.graph if n.op_type == "MatMulIntegerToFloat")
    w = model.graph.initializers[node.inputs[1].name].const_value.numpy()
    assert w.dtype == np.int8 and len(node.inputs) == 5
    pairs = _pair_sums(w)  # K = 128: every row has a partner
    if info.saturates:  # weights all near ±max: the largest pair sets the scale, at the bound
        assert pairs.max() in (127, 128)
    else:
        assert np.abs(w.astype(np.int16)).max() == 127 and pairs.max() > 128


@pytest.mark.parametrize("name", [t.value for t in tg.Target])
def test_saturation_prone_layer_is_right_on_every_target(name):
    """Compiled for a target and computed with that target's kernel arithmetic (emulated):
    cosine >= 0.999 to float on a layer that breaks u8×s8 on AVX2."""
    model = saturation_prone()
    feed = saturation_feed()
    ref = run(model, feed)[0]
    QuantizeInt8(context=PassContext(target=name))(model)
    assert cosine(ref, emulated_output(model, feed, name)) >= 0.999


def test_the_emulation_catches_a_vnni_model_run_on_avx2():
    """The check above can fail: the VNNI formulation, computed by AVX2's kernel, is far off."""
    model = saturation_prone()
    feed = saturation_feed()
    ref = run(model, feed)[0]
    QuantizeInt8(context=PassContext(target="x86-avx512-vnni"))(model)
    assert cosine(ref, emulated_output(model, feed, "x86-avx512-vnni")) >= 0.999
    wrong = emulated_output(model, feed, "x86-avx2")
    assert cosine(ref, wrong) < 0.999  # the bar the test above holds every target to
    assert np.abs(wrong - ref).max() > 0.2 * np.abs(ref).max()  # saturation shrinks the outputs


def test_saturation_prone_layer_runs_right_on_this_machine():
    """Compiled for this machine (auto) and run by ONNX Runtime here: cosine >= 0.999."""
    model = saturation_prone()
    feed = saturation_feed()
    ref = run(model, feed)[0]
    QuantizeInt8()(model)
    assert cosine(ref, run(model, feed)[0]) >= 0.999


def test_a_saturating_form_is_refused_for_a_saturating_target():
    with pytest.raises(UnsupportedError, match="u8s8.*saturates on target x86-avx2"):
        QuantizeInt8(QuantizeInt8.Options(form="u8s8"), PassContext(target="x86-avx2"))(saturation_prone())


def test_exact_on_host_rewrite_keeps_the_arithmetic():
    """Validation's u8u8 copy of a u8s8 model computes the same outputs (here, and on AVX2)."""
    model = saturation_prone()
    feed = saturation_feed()
    QuantizeInt8(context=PassContext(target="x86-avx512-vnni"))(model)
    assert tc.saturating_gemms(model) == ["fc_int8"]
    before = emulated_output(model, feed, "x86-avx512-vnni")
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert tc.exact_on_host(copy)
    assert tc.saturating_gemms(copy) == []
    np.testing.assert_allclose(run(copy, feed)[0], before, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(emulated_output(copy, feed, "x86-avx2"), before, rtol=1e-9)


def test_pair_bounded_weights_are_not_flagged_as_saturating():
    """A u8s8p model (the AVX2 default) is exact on a saturating kernel: validation neither
    rewrites it nor warns about it; the same model in u8s8 is flagged. The check follows the
    kernel's pairs (rows 2i, 2i+1 of a [K, N] weight), not a 7-bit bound."""
    model = saturation_prone()
    QuantizeInt8(context=PassContext(target="x86-avx2"))(model)  # u8s8p
    assert tc.saturating_gemms(model) == []
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert not tc.exact_on_host(copy)
    other = saturation_prone()
    QuantizeInt8(context=PassContext(target="x86-avx512-vnni"))(other)
    assert tc.saturating_gemms(other) == ["fc_int8"]
    assert tc.exact_when_saturating(np.array([[127, -1], [1, 127], [-64, 0]], np.int8))  # pairs 128, 128; last row alone
    assert not tc.exact_when_saturating(np.array([[100, 0], [29, 0]], np.int8))  # 129
    along_k = np.array([[100, 0], [100, 0]], np.int8)
    assert not tc.exact_when_saturating(along_k) and tc.exact_when_saturating(along_k.T)  # pairs run along K, not N


def test_compress_records_the_target_and_says_when_it_is_not_this_machine(tmp_path):
    from graphc.front.api import compress

    src = tmp_path / "m.onnx"
    ir.save(saturation_prone(), src)
    other = "arm64" if tg.host().arch == "x86_64" else "x86-avx2"
    result = compress(src, tmp_path / "o.onnx", recipe="int8", target=other,
                      feeds=[saturation_feed(s) for s in range(2)])
    prov = json.loads(result.model.metadata_props["graphc.target"])
    assert prov["target"] == other
    assert any(n.startswith(f"target {other} is not this machine") for n in result.notices)
    here = compress(src, tmp_path / "h.onnx", recipe="int8", feeds=[saturation_feed(s) for s in range(2)])
    assert json.loads(here.model.metadata_props["graphc.target"]) == {
        "target": tg.host().name, "int8_forms": [tg.host().matmul_form.value]}  # no Conv: no Conv form
    assert not any("is not this machine" in n for n in here.notices)
    assert here.validation.output_cosine >= 0.999


def test_cli_unknown_target_is_one_line(tmp_path, capsys):
    from graphc.front.cli import main

    src = tmp_path / "m.onnx"
    ir.save(saturation_prone(), src)
    assert main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--target", "z80"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown target 'z80'" in err[0] and "x86-avx2" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_target_errors_are_graphc_errors():
    assert issubclass(UnsupportedError, GraphcError)


def test_conv_and_recurrent_passes_refuse_the_matmul_only_form():
    """Their weights' reduction order is not a MatMul's K: pair bounds along axis 0 mean nothing there."""
    from graphc.passes._quant import target_form

    for target in ("x86-avx2", "x86-avx512-vnni"):
        with pytest.raises(UnsupportedError, match="form='u8s8p' bounds weight pairs along a MatMul's K axis"):
            target_form(PassContext(target=target), "u8s8p", "quantize-conv")
        assert target_form(PassContext(target=target), "auto", "quantize-conv") is tg.resolve(target).int8_form

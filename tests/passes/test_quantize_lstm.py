"""quantize-lstm: LSTM → DynamicQuantizeLSTM with the target's int8 form; what it leaves alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphc.checks.validate import make_session
from graphc.core.pass_base import PassContext, PassStats
from graphc.core.target import emulate_gemm, resolve, runs_here
from graphc.passes.quantize_lstm import LstmInt8Options, QuantizeLstm, _per_row
from tests import third_party_graphs as tp


def _feeds(seed=0, seq=12, batch=3, width=16, hidden=32, d=2, layout=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, width) if layout else (seq, batch, width)).astype(np.float32)
    h0 = (rng.standard_normal((batch, d, hidden) if layout else (d, batch, hidden)) * 0.5).astype(np.float32)
    return {"x": x, "h0": h0}


def _run(model: ir.Model, feeds):
    return make_session(model).run(None, feeds)


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("target", ["x86-avx512-vnni", "x86-avx2"])
@pytest.mark.parametrize("direction", ["bidirectional", "forward"])
def test_lstm_becomes_dynamic_quantize_lstm_close_to_float(target, direction):
    model = ir.serde.deserialize_model(tp.lstm(direction=direction))
    d = 2 if direction == "bidirectional" else 1
    feeds = _feeds(d=d)
    ref = _run(model, feeds)
    stats = PassStats()
    assert QuantizeLstm(context=PassContext(target=resolve(target))).run(model, stats)
    ops = [(n.op_type, n.domain) for n in model.graph]
    assert ("DynamicQuantizeLSTM", "com.microsoft") in ops and ("LSTM", "") not in ops
    assert stats.counts["lstms_quantized"] == 1
    form = resolve(target).int8_form.value
    assert stats.details["int8_form"] == form
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeLSTM")
    wq, rq = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
    assert wq.shape == (d, 16, 4 * 32) and rq.shape == (d, 32, 4 * 32)  # transposed to [D, K, 4H]
    assert wq.dtype == (np.uint8 if form == "u8u8" else np.int8)
    assert node.inputs[8].const_value.numpy().shape == (d, 4 * 32)  # one scale per gate row
    assert node.inputs[7] is not None and node.inputs[7].name == "P"  # peepholes kept
    rows = d * 4 * 32
    assert stats.counts["weight_bytes_before"] == 4 * rows * (16 + 32)
    assert stats.counts["weight_bytes_after"] == rows * (16 + 32) + 2 * rows * (4 + 1)  # codes, scales, zero points
    if not runs_here(resolve(target)) and resolve(target).int8_form.value == "u8s8":
        return  # u8s8 codes are for CPUs whose kernel does not saturate; this one does (AVX2)
    got = _run(model, feeds)
    # the float LSTM's outputs, within int8 error (u8u8 is exact on every CPU, u8s8 where the
    # kernel does not saturate)
    for a, b in zip(ref, got):
        assert _cos(a, b) > 0.999
        assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_u8u8_codes_are_the_u8s8_codes_shifted():
    w = np.random.default_rng(1).standard_normal((2, 8, 5)).astype(np.float32)
    q8, s8, z8 = _per_row(w, resolve("x86-avx512-vnni").int8_form)
    qu, su, zu = _per_row(w, resolve("x86-avx2").int8_form)
    assert z8.dtype == np.int8 and not z8.any() and zu.dtype == np.uint8 and (zu == 128).all()
    np.testing.assert_array_equal(qu.astype(np.int16) - 128, q8)
    np.testing.assert_array_equal(su, s8)
    # per gate row: each row's largest weight maps to ±127
    np.testing.assert_array_equal(np.abs(q8).max(axis=2), 127)
    np.testing.assert_allclose(s8, np.abs(w).max(axis=2) / 127, rtol=1e-6)


def test_avx2_form_does_not_saturate_where_u8s8_would():
    """The GEMM inside DynamicQuantizeLSTM is MLAS's: on a saturating target the u8×s8 codes of
    a weight at full range meet activations near 255 and the pair sums clip; the u8u8 codes this
    pass writes there multiply exactly (numpy model of the kernel, any machine)."""
    avx2 = resolve("x86-avx2")
    w = np.full((1, 16, 64), 0.5, np.float32)
    w[:, 1::2, :] = -0.5  # rows of one sign: every adjacent product pair adds up
    q8, _, _ = _per_row(w, avx2.int8_form)  # the form this pass picks for AVX2
    a = np.full((4, 64), 255, np.uint8)
    exact = (a.astype(np.int64) - 0) @ (q8[0].T.astype(np.int64) - 128)
    np.testing.assert_array_equal(emulate_gemm(a, q8[0].T.copy(), 0, 128, avx2), exact)
    s8 = (q8[0].T.astype(np.int16) - 128).astype(np.int8)
    assert not np.array_equal(emulate_gemm(a, s8, 0, 0, avx2), a.astype(np.int64) @ s8.astype(np.int64))


def test_layout_one_and_small_weights_are_skipped_with_reasons():
    model = ir.serde.deserialize_model(tp.lstm(layout=1))
    stats = PassStats()
    assert not QuantizeLstm().run(model, stats)
    assert "layout=1" in stats.skipped[0]["reason"]
    model = ir.serde.deserialize_model(tp.lstm(hidden=4, width=4))
    stats = PassStats()
    assert not QuantizeLstm(LstmInt8Options(min_elements=1024)).run(model, stats)
    assert "min_elements" in stats.skipped[0]["reason"]


def test_form_that_saturates_on_the_target_is_refused():
    from graphc.core.errors import UnsupportedError

    model = ir.serde.deserialize_model(tp.lstm())
    with pytest.raises(UnsupportedError, match="saturates"):
        QuantizeLstm(LstmInt8Options(form="u8s8"), context=PassContext(target=resolve("x86-avx2"))).run(model, PassStats())

"""quantize-rnn-weights: GRU / RNN / float LSTM weights as int8 codes dequantized at load."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphc.checks.validate import make_session
from graphc.core.pass_base import PassContext, PassStats
from graphc.passes.quantize_rnn_weights import QuantizeRnnWeights, RnnWeightsOptions
from tests import third_party_graphs as tp


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_weights_become_int8_codes_and_outputs_stay_close(kind):
    proto = tp.gru(hidden=48, width=24) if kind == "gru" else tp.lstm(hidden=48, width=24)
    model = ir.serde.deserialize_model(proto)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((10, 1, 24)).astype(np.float32)}
    if kind == "lstm":
        feeds["h0"] = (rng.standard_normal((2, 1, 48)) * 0.5).astype(np.float32)
    ref = make_session(model).run(None, feeds)
    stats = PassStats()
    assert QuantizeRnnWeights().run(model, stats)
    assert stats.counts[f"{kind}s_quantized"] == 1
    node = next(n for n in model.graph if n.op_type == kind.upper())
    for index in (1, 2):
        mul = node.inputs[index].producer()
        assert mul.op_type == "Mul" and mul.inputs[0].producer().op_type == "Cast"
        codes = mul.inputs[0].producer().inputs[0].const_value.numpy()
        scale = mul.inputs[1].const_value.numpy()
        assert codes.dtype == np.int8 and np.abs(codes).max() == 127
        assert scale.shape == codes.shape[:2] + (1,)  # one scale per gate row
    floats = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT
              and v.const_value.size >= 1024]
    assert not floats  # the float W and R are gone from the file
    got = make_session(model).run(None, feeds)
    for a, b in zip(ref, got):
        assert _cos(a, b) > 0.9999  # weights' rounding only: float arithmetic


def test_budget_keeps_a_costly_layer_float_and_says_so():
    model = ir.serde.deserialize_model(tp.gru(hidden=48, width=24))
    feeds = [{"x": np.random.default_rng(i).standard_normal((10, 1, 24)).astype(np.float32)} for i in range(2)]
    stats = PassStats()
    # a budget nothing can meet: the layer stays float, with its measured cost
    changed = QuantizeRnnWeights(RnnWeightsOptions(max_error=1e-9), context=PassContext(calibration=feeds)).run(model, stats)
    assert not changed and "kept float for the error budget" in stats.skipped[0]["reason"]
    assert stats.details["rnn_error_all_int8"] > 1e-9


def test_small_and_non_constant_weights_are_skipped_with_reasons():
    stats = PassStats()
    assert not QuantizeRnnWeights().run(ir.serde.deserialize_model(tp.gru(hidden=4, width=4)), stats)
    assert "min_elements" in stats.skipped[0]["reason"]
    stats = PassStats()
    assert not QuantizeRnnWeights().run(ir.serde.deserialize_model(tp.paddle_conv()), stats)
    assert stats.notes == ["no GRU, RNN or float LSTM with constant weights found"]

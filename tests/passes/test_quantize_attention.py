"""quantize-attention on a tiny BERT from the dynamo exporter (the real graph shape)."""

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

from graphc.core import io  # noqa: E402
from graphc.core.pass_base import PassContext  # noqa: E402
from graphc.passes.fuse_ort import FuseOrt  # noqa: E402
from graphc.passes.quantize_attention import QuantizeAttention  # noqa: E402
from graphc.passes.quantize_int8 import QuantizeInt8  # noqa: E402
from graphc.checks.validate import make_session  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert_path(tmp_path_factory):
    from graphc.models.fixtures import export_tiny

    path = tmp_path_factory.mktemp("tiny") / "bert.onnx"
    export_tiny("bert", path)
    return path


def _int8_mha(path) -> ir.Model:
    model = io.load_model(path)
    FuseOrt(FuseOrt.Options(attention="mha"))(model)
    QuantizeInt8()(model)
    return model


def _feed(batch=3, seq=9, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq // 2 :] = 0
    mask[-1, 2:] = 0
    return {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask, "token_type_ids": np.zeros((batch, seq), np.int64)}


def _masked_out(model, feed):
    out = make_session(model).run(None, feed)[0]
    return out[feed["attention_mask"].astype(bool)]


def test_mha_over_int8_projections_becomes_qattention_exactly(tiny_bert_path):
    model = _int8_mha(tiny_bert_path)
    feeds = [_feed(), _feed(2, 5, 1)]
    before = [_masked_out(model, f) for f in feeds]
    result = QuantizeAttention()(model)
    assert result.stats.counts["attention_quantized"] == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("QAttention") == 2 and "MultiHeadAttention" not in ops
    assert ops.count("MatMulIntegerToFloat") == 6  # O projection and the two FFN matmuls stay
    for f, ref in zip(feeds, before):
        # same int8 weights and scales, same quantized input: differences are float rounding
        np.testing.assert_allclose(_masked_out(model, f), ref, atol=2e-3)


def test_not_a_padding_bias_is_left_alone(tiny_bert_path):
    model = _int8_mha(tiny_bert_path)
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    causal = np.triu(np.full((1, 1, 16, 16), -1e9, np.float32), k=1)
    value = ir.Value(name="causal", const_value=ir.tensor(causal, name="causal"))
    model.graph.register_initializer(value)
    mha.replace_input_with(5, value)
    result = QuantizeAttention()(model)
    assert result.stats.counts["attention_quantized"] == 1
    reasons = [s["reason"] for s in result.stats.skipped]
    assert len(reasons) == 1 and "not a key-padding mask" in reasons[0]


def test_float_projections_are_left_alone(tiny_bert_path):
    model = io.load_model(tiny_bert_path)
    FuseOrt(FuseOrt.Options(attention="mha"))(model)
    result = QuantizeAttention()(model)
    assert not result.modified
    assert all("run quantize-int8 first" in s["reason"] for s in result.stats.skipped)

"""Files other exporters wrote (Paddle, tf2onnx, custom domains): they load, run, validate and
compress, and what graphc cannot do is said in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphc.core import io
from graphc.front.api import compress, validate
from graphc.front.cli import main
from graphc.core.errors import InputsError, ToleranceError, ValidationError
from graphc.checks.nonfinite import first_nonfinite
from graphc.core.pass_base import PassContext, PassStats
from graphc.passes.quantize_int8 import Int8Options, QuantizeInt8
from graphc.core.recipes import Recipe, Step, Tolerance
from graphc.checks.validate import compare, output_metrics, synthesize_inputs
from tests import third_party_graphs as tp


def _json(capsys):
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


# ----------------------------------------------------------------- dims written -1


def test_minus_one_dims_are_synthesized_as_free(tmp_path, capsys):
    path = tp.save(tp.paddle_conv(), tmp_path / "cls.onnx")
    feeds = synthesize_inputs(io.load_model(path), count=2)
    x = feeds[0]["x"]
    assert x.shape[0] > 0 and x.shape[1] == 3 and x.shape[2] == x.shape[3] == 64  # image: free H, W at 64
    assert -1.0 <= x.min() and x.max() <= 1.0  # normalized pixels, not a standard normal
    assert main(["validate", path, path, "--json"]) == 0
    assert _json(capsys)["passed"]


# ----------------------------------------------------------------- zero medians, NaN weights


def test_zero_median_outliers_are_skipped_with_a_reason_and_no_warning(tmp_path):
    model = ir.serde.deserialize_model(tp.tf2onnx_onehot())
    calib = [{"bytes": np.random.default_rng(0).integers(0, 4, (2, 16)).astype(np.int32)}]  # 4 of 64 channels lit
    p = QuantizeInt8(Int8Options(outlier_ratio=4.0, outlier_channels=4),
                     PassContext(calibration=calib, calibration_source="test feeds"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning fails the test
        result = p.call(model)
    notes = " ".join(result.stats.notes)
    assert "median channel range is 0" in notes and "model/onehot:0" in notes
    assert result.stats.counts["matmuls_quantized"] == 2
    for t in model.graph.initializers.values():
        if t.const_value is not None and t.const_value.dtype.is_floating_point():
            assert np.all(np.isfinite(t.const_value.numpy()))


def test_non_finite_weight_is_skipped_with_a_reason():
    proto = tp.tf2onnx_onehot()
    w = next(t for t in proto.graph.initializer if t.name.startswith("model/dense"))
    a = onnx.numpy_helper.to_array(w).copy()
    a[0, 0] = np.nan
    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))
    model = ir.serde.deserialize_model(proto)
    stats = PassStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizeInt8().run(model, stats)
    assert {"node": "model/dense/MatMul", "reason": "weight holds 1 NaN/inf value(s): no finite scale represents it"} \
        in stats.skipped
    assert stats.counts["matmuls_quantized"] == 1  # the other MatMul still is


# ----------------------------------------------------------------- the validation gate


def _nan_after_log(tmp_path):
    """y = Log(x @ w): the rewritten copy below has a negated weight, so Log goes NaN."""
    proto = tp.custom_domain()
    del proto.graph.node[1:]
    proto.graph.node[0].output[0] = "h"
    proto.graph.node.append(onnx.helper.make_node("Abs", ["h"], ["a"], name="abs"))
    proto.graph.node.append(onnx.helper.make_node("Log", ["a"], ["l"], name="log"))
    proto.graph.node.append(onnx.helper.make_node("MatMul", ["l", "w2"], ["y"], name="fc2"))
    del proto.opset_import[1:]
    original = ir.serde.deserialize_model(proto)
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    bad.graph.node[1].op_type = "Neg"  # Log of a negative number: NaN from node 'log' on
    return original, ir.serde.deserialize_model(bad)


def test_non_finite_output_fails_and_names_the_first_non_finite_tensor(tmp_path):
    original, bad = _nan_after_log(tmp_path)
    feeds = [{"x": np.ones((2, 8), np.float32)}]
    report = compare(original, bad, feeds)
    assert report.nonfinite_outputs == ["y"] and not report.passed
    assert first_nonfinite(bad, feeds[0], original) == ("l", "Log")
    assert first_nonfinite(original, feeds[0], original) is None


def test_nan_in_the_reference_is_not_blamed_on_the_result():
    ref = [np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)]
    got = [np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)]
    m = output_metrics("y", ref, got)
    assert np.isfinite(m.max_abs) and m.cosine == pytest.approx(1.0)


def test_rows_of_a_probability_map_are_whole_maps():
    """A detector's map [N, 1, H, W]: one pixel line holding a few faint values whose
    direction changed is not a failed row; a channel map that changed is."""
    ref = np.zeros((1, 1, 8, 8), np.float32)
    ref[0, 0, 2:6, 2:6] = 0.9
    ref[0, 0, 7, :2] = [0.02, 0.0]  # faint text edge
    got = ref.copy()
    got[0, 0, 7, :2] = [0.0, 0.02]  # moved by one pixel: that line alone has cosine 0
    m = output_metrics("map", [ref], [got])
    assert m.min_row_cosine == pytest.approx(m.cosine) and m.min_row_cosine > 0.999
    two = np.concatenate([ref, ref], axis=1)  # [1, 2, 8, 8]: one row per channel
    changed = two.copy()
    changed[0, 1] = np.roll(changed[0, 1], 3, axis=0)
    assert output_metrics("maps", [two], [changed]).min_row_cosine < 0.5
    tokens = np.ones((1, 3, 4), np.float32)  # rank 3 [B, S, H] stays per token
    flipped = tokens.copy()
    flipped[0, 1] = -1.0
    assert output_metrics("h", [tokens], [flipped]).min_row_cosine == pytest.approx(-1.0)


def test_tolerance_failure_names_the_output(tmp_path):
    path = tp.save(tp.tf2onnx_onehot(), tmp_path / "m.onnx")
    recipe = Recipe("strict", "never met", (Step("quantize-int8"),), Tolerance(min_cosine=1.5))
    with pytest.raises(ToleranceError, match=r"output 'logits' cosine"):
        compress(path, tmp_path / "o.onnx", recipe=recipe, attribution=False)
    assert not (tmp_path / "o.onnx").exists()


# ----------------------------------------------------------------- custom domains


def test_custom_domain_ops_load_pass_through_and_validation_says_why_not(tmp_path, monkeypatch, capsys):
    path = tp.save(tp.custom_domain(), tmp_path / "c.onnx")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", path, "--json"]) == 0
    assert _json(capsys)["op_counts"]["ai.onnx.contrib::StringNormalizerLike"] == 1
    out = tmp_path / "o.onnx"
    assert main(["compress", path, "-o", str(out), "--no-validate", "--json"]) == 0
    data = _json(capsys)
    assert data["bytes_after"] < data["bytes_before"]
    nodes = [n for n in onnx.load(out).graph.node if n.domain == "ai.onnx.contrib"]
    assert len(nodes) == 1 and nodes[0].attribute[0].s == b"\xff\x00"  # untouched, bytes attribute too
    assert main(["compress", path, "-o", str(tmp_path / "v.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "custom domain 'ai.onnx.contrib'" in err and "onnxruntime-extensions" in err
    # ORT's symbolic shape inference stops at the unknown op: it must not leave its temp file here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "o.onnx"]


# ----------------------------------------------------------------- the user's inputs


def test_inputs_npz_npy_and_folder_are_used_and_reported(tmp_path, capsys):
    path = tp.save(tp.paddle_conv(), tmp_path / "cls.onnx")
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 3, 48, 96)).astype(np.float32)
    np.savez(tmp_path / "one.npz", x=x)
    np.savez(tmp_path / "two.npz", **{"0/x": x, "1/x": x[:, :, :, :64]})
    np.save(tmp_path / "x.npy", x.astype(np.float64))  # cast to the model's float32
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", x)
    for given, count in (("one.npz", 1), ("two.npz", 2), ("x.npy", 1), ("folder", 1)):
        assert main(["validate", path, path, "--inputs", str(tmp_path / given), "--json"]) == 0
        report = _json(capsys)
        assert report["samples"] == count and report["input_source"].startswith("the user's inputs")
    out = tmp_path / "o.onnx"
    assert main(["compress", path, "-o", str(out), "--inputs", str(tmp_path / "two.npz"), "--json"]) == 0
    assert _json(capsys)["validation"]["input_source"] == "the user's inputs (two.npz: 2 feeds)"


@pytest.mark.parametrize("content, message", [
    ({"y": np.zeros((1, 3, 8, 8), np.float32)}, "array 'y' is not a model input"),
    ({"x": np.zeros((1, 4, 8, 8), np.float32)}, "dim 1 is 4, the model fixes it at 3"),
    ({"x": np.zeros((3, 8, 8), np.float32)}, "has 3 dims"),
    ({"x": np.zeros((1, 3, 8, 8), np.int64)}, "is int64, the model takes float32"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, content, message):
    path = tp.save(tp.paddle_conv(), tmp_path / "cls.onnx")
    np.savez(tmp_path / "bad.npz", **content)
    assert main(["compress", path, "-o", str(tmp_path / "o.onnx"), "--inputs", str(tmp_path / "bad.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "bad.npz" in err
    assert not (tmp_path / "o.onnx").exists()


def test_input_shape_fixes_synthesized_dims(tmp_path, capsys):
    path = tp.save(tp.paddle_conv(), tmp_path / "cls.onnx")
    report = validate(path, path, input_shapes=["x=1,3,48,40"])
    assert "x=1,3,48,40" in report.input_source
    with pytest.raises(InputsError, match="dim 1 is fixed at 3"):
        validate(path, path, input_shapes=["x=1,4,48,40"])
    with pytest.raises(InputsError, match="not a model input"):
        validate(path, path, input_shapes=["nope=1"])
    assert main(["validate", path, path, "--input-shape", "x=1,3,x"]) == 1
    assert "expected NAME=D1,D2" in capsys.readouterr().err


def test_string_input_is_synthesized():
    proto = tp.custom_domain()
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.STRING
    model = ir.serde.deserialize_model(proto)
    x = synthesize_inputs(model, count=1)[0]["x"]
    assert x.dtype == object and isinstance(x.flat[0], str)


def test_validation_error_for_unrunnable_custom_op_is_typed(tmp_path):
    path = tp.save(tp.custom_domain(), tmp_path / "c.onnx")
    with pytest.raises(ValidationError, match="no kernel here"):
        validate(path, path)


# ----------------------------------------------------------------- subgraphs, recurrent layers, never silent


def test_weights_inside_if_branches_are_quantized():
    from graphc.checks.validate import make_session

    model = ir.serde.deserialize_model(tp.if_with_weights())
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    ref = [make_session(model).run(None, {"x": x, "sr": np.array(sr)})[0] for sr in (16000, 8000)]
    result = QuantizeInt8().call(model)
    assert result.stats.counts["subgraph_gemms_quantized"] == 2
    for sr, r in zip((16000, 8000), ref):
        got = make_session(model).run(None, {"x": x, "sr": np.array(sr)})[0]
        assert np.abs(got - r).max() < 0.02 * np.abs(r).max()


def test_gru_weights_are_int8_dequantized_at_load_and_other_recipes_say_why_not(tmp_path, capsys):
    path = tp.save(tp.gru(hidden=48, width=24), tmp_path / "gru.onnx")
    assert main(["compress", path, "-o", str(tmp_path / "o.onnx"), "--json"]) == 0
    result = _json(capsys)
    assert "GRU" not in {e["op"] for e in result.get("left_float", [])}
    rnn = next(p for p in result["passes"] if p["name"] == "quantize-rnn-weights")["stats"]
    assert rnn["grus_quantized"] == 1
    assert main(["compress", path, "-o", str(tmp_path / "o2.onnx"), "--recipe", "fuse"]) == 0
    text = capsys.readouterr().out
    assert "left in float:" in text and "GRU" in text and "quantize-rnn-weights" in text


def test_lstm_is_quantized_by_int8_and_validated(tmp_path, capsys):
    path = tp.save(tp.lstm(hidden=48, width=24), tmp_path / "lstm.onnx")
    out = tmp_path / "o.onnx"
    assert main(["compress", path, "-o", str(out), "--json"]) == 0
    result = _json(capsys)
    assert "LSTM" not in {e["op"] for e in result.get("left_float", [])}
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node if "LSTM" in n.op_type] == ["DynamicQuantizeLSTM"]
    assert out.stat().st_size < 0.45 * (tmp_path / "lstm.onnx").stat().st_size
    # batch-first LSTMs have no quantized kernel (ONNX Runtime runs none at all): left float,
    # and the summary says why
    path = tp.save(tp.lstm(hidden=48, width=24, layout=1), tmp_path / "lstm_bf.onnx")
    assert main(["compress", path, "-o", str(tmp_path / "o2.onnx"), "--json", "--no-validate"]) == 0
    left = {e["op"]: e for e in _json(capsys)["left_float"]}
    assert "layout=1" in left["LSTM"]["reasons"][0]


def test_lstms_in_a_branch_no_feed_takes_are_named_unmeasured(tmp_path, capsys):
    path = tp.save(tp.if_with_lstms(), tmp_path / "vad.onnx")
    rng = np.random.default_rng(0)
    feeds = {f"{i}/{k}": v for i in range(3) for k, v in
             {"x": rng.standard_normal((6, 1, 16)).astype(np.float32), "sr": np.array(16000)}.items()}
    np.savez(tmp_path / "in.npz", **feeds)
    assert main(["compress", path, "-o", str(tmp_path / "o.onnx"), "--inputs", str(tmp_path / "in.npz"), "--json"]) == 0
    result = _json(capsys)
    lstm = next(p for p in result["passes"] if p["name"] == "quantize-lstm")["stats"]
    assert lstm["lstms_quantized"] == 2 and lstm["lstm_unmeasured"] == ["rnn_b/LSTM"]  # the 8 kHz branch
    assert any("quantize-lstm: 1 LSTM(s) in If/Loop bodies quantized unmeasured" in n for n in result["notices"])
    # feeds that take both branches measure both: no such notice
    feeds.update({f"3/{k}": v for k, v in {"x": rng.standard_normal((6, 1, 16)).astype(np.float32),
                                           "sr": np.array(8000)}.items()})
    np.savez(tmp_path / "in2.npz", **feeds)
    assert main(["compress", path, "-o", str(tmp_path / "o2.onnx"), "--inputs", str(tmp_path / "in2.npz"), "--json"]) == 0
    result = _json(capsys)
    assert not any("unmeasured" in n for n in result["notices"])


def test_folding_a_constant_if_drops_the_weights_only_the_other_branch_read(tmp_path):
    from graphc.passes.cleanup import FoldConstants

    model = ir.serde.deserialize_model(tp.if_with_lstms(const_cond=True))
    FoldConstants().call(model)
    assert "If" not in [n.op_type for n in model.graph]
    from graphc.passes.cleanup import RemoveUnused

    RemoveUnused().call(model)
    assert sorted(model.graph.initializers) == ["R_a", "W_a"]  # the else branch's weights are gone


def test_a_run_that_shrank_nothing_says_so(tmp_path, capsys):
    path = tp.save(tp.gru(), tmp_path / "gru.onnx")
    assert main(["compress", path, "-o", str(tmp_path / "o.onnx"), "--recipe", "cleanup"]) == 0
    assert "shrank nothing" in capsys.readouterr().out


# ----------------------------------------------------------------- inspection of foreign graphs


def test_inspect_counts_constant_node_weights_and_groups_foreign_names(tmp_path, capsys):
    from graphc.checks.inspection import inspect_model, module_of_text

    info = inspect_model(ir.serde.deserialize_model(tp.paddle_conv(channels=16)))
    assert info.params == 16 * 3 * 3 * 3 + 16 * 16 * 9 + 16 + 16 * 4 + 4 + 4 * 16  # conv2d_0's Constant included
    assert {"conv2d_0", "conv2d_1", "linear_0", "batch_norm_0"} <= set(info.by_layer)
    assert info.by_layer["conv2d_0"]["params"] == 16 * 3 * 3 * 3
    assert module_of_text("model/dense/MatMul") == "dense"
    assert module_of_text("jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Conv_0/transpose_3:0") == "Conv_0"
    assert module_of_text("/encoder/LayerNorm/Add") == "encoder/LayerNorm"
    assert module_of_text("node_MatMul_12") is None
    proto = tp.paddle_conv()
    proto.metadata_props.add(key="character", value="\n".join(chr(0x4E00 + i) for i in range(3000)))
    path = tp.save(proto, tmp_path / "m.onnx")
    assert main(["inspect", path]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("character ="))
    assert len(line) < 160 and "(5,999 chars)" in line

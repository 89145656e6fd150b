"""End to end on the real all-MiniLM-L6-v2: export → compress int8 → validate → inspect."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from graphc.front.cli import main  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(minilm_export):
    return minilm_export


@pytest.fixture(scope="module")
def compressed(exported, tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("minilm") / "minilm.int8.onnx"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["compress", str(exported), "-o", str(out), "--recipe", "int8", "--json"])
    assert code == 0
    return out, json.loads(buf.getvalue())


def test_export_records_architecture(exported):
    from graphc.core import io

    meta = io.load_model(exported).metadata_props
    assert meta["graphc.model_recipe"] == "minilm"
    assert meta["graphc.arch.num_layers"] == "6" and meta["graphc.arch.num_heads"] == "12"
    assert meta["graphc.arch.head_dim"] == "32" and meta["graphc.arch.hidden_size"] == "384"


def test_int8_is_small_and_validated_on_real_text(compressed, exported):
    out, data = compressed
    v = data["validation"]
    assert v["passed"] and "real texts" in v["input_source"]
    assert out.stat().st_size < 0.26 * exported.stat().st_size
    q = next(p for p in data["passes"] if p["name"] == "quantize-int8")
    assert q["stats"]["matmuls_quantized"] == 36
    fuse = next(p for p in data["passes"] if p["name"] == "fuse-ort")
    assert fuse["stats"]["ops.MultiHeadAttention"] == 6 and fuse["stats"]["ops.SkipLayerNormalization"] == 12


def test_sentence_embeddings_stay_close(compressed, exported):
    from graphc.models import get_model_spec
    from graphc.models.minilm import embed
    from graphc.checks.validate import make_session

    out, _ = compressed
    recipe = get_model_spec("minilm")
    feeds = recipe.feeds(recipe.eval_texts(96), batch=32)
    cos = []
    ref_s, got_s = make_session(exported), make_session(out)
    for feed in feeds:
        ref = embed(ref_s.run(None, feed)[0], feed["attention_mask"])
        got = embed(got_s.run(None, feed)[0], feed["attention_mask"])
        cos.extend((ref * got).sum(axis=1))
    assert np.mean(cos) > 0.993 and np.min(cos) > 0.98


def test_inspect_diff_shows_the_rewrite(compressed, exported, capsys):
    out, _ = compressed
    assert main(["inspect", str(exported), "--diff", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    # Q/K/V projections live inside QAttention; O and the two FFN matmuls stay separate
    assert d["ops_changed"]["com.microsoft::MatMulIntegerToFloat"]["after"] == 18
    assert d["ops_changed"]["com.microsoft::QAttention"]["after"] == 6
    layers = {x["layer"]: x for x in d["layers"]}
    assert {f"layer.{i}" for i in range(6)} <= set(layers)
    assert all(layers[f"layer.{i}"]["bytes_after"] < layers[f"layer.{i}"]["bytes_before"] / 3 for i in range(6))


def test_compress_names_the_worst_layer(compressed):
    _, data = compressed
    layers = [x["layer"] for x in data["attribution"]["layers"]]
    assert {f"layer.{i}" for i in range(6)} <= set(layers)
    assert data["worst_layer"] in layers
    # the per-layer errors end at the validated output: same tensor, same feeds
    last = data["attribution"]["layers"][-1]
    assert abs(last["cosine"] - data["validation"]["output_cosine"]) < 1e-3

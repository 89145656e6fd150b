import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphc.core.errors import GraphcError, PassError, UnsupportedError
from graphc.core.pass_base import PassContext, PassStats
from graphc.passes._plan import precision as pp
from graphc.passes import _sensitivity as sens
from graphc.passes.mixed_precision import META_BITS, META_BLOCK, MixedPrecision
from graphc.passes.quantize_gather_block import QuantizeGatherBlock
from graphc.passes.quantize_nbits import QuantizeNBits
from tests.passes.graphs import _model, cosine, embedding, run

Opts = MixedPrecision.Options
K, N = 64, 32


def _two_branch(seed=0, loud=1.0, quiet=0.01):
    """y = x @ Wa + x @ Wb: Wa (scale ``loud``) dominates the output, Wb (``quiet``) barely
    shows; same shapes, so the same bytes at any configuration."""
    rng = np.random.default_rng(seed)
    inits = {"Wa": rng.standard_normal((K, N)).astype(np.float32) * loud,
             "Wb": rng.standard_normal((K, N)).astype(np.float32) * quiet}
    nodes = [helper.make_node("MatMul", ["x", "Wa"], ["a"], name="loud"),
             helper.make_node("MatMul", ["x", "Wb"], ["b"], name="quiet"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])], inits)


def _ctx(seed=1, k=K):
    x = np.random.default_rng(seed).standard_normal((4, 32, k)).astype(np.float32)
    return PassContext(calibration=[{"x": x}], calibration_source="test")


def _run(model, ctx=None, **options):
    result = MixedPrecision(Opts(**options), ctx or _ctx())(model)
    return result.stats.to_dict()


def _by_layer(stats):
    return {c["layer"]: c for c in stats["choices"]}


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_ranks_the_planted_layer_first():
    stats = _run(_two_branch(), max_bits=8.5, measure_all=True)
    sens_rows = stats["sensitivities"]
    assert all(r["measured"] for r in sens_rows)
    for config in {r["config"] for r in sens_rows}:
        err = {r["layer"]: r["error"] for r in sens_rows if r["config"] == config}
        assert err["Wa"] > 100 * err["Wb"] > 0, config  # ~ (1/0.01)^2 apart


def test_predicted_from_probe_close_to_measured():
    """The default predicts other configurations from the int4/b32 probe by the squared
    weight-error ratio: within a factor 2 of measuring them."""
    measured = {(r["layer"], r["config"]): r["error"] for r in _run(_two_branch(), max_bits=8.5, measure_all=True)["sensitivities"]}
    predicted = _run(_two_branch(), max_bits=8.5)["sensitivities"]
    assert {r["config"] for r in predicted if r["measured"]} == {"int4/b32"}
    for r in predicted:
        ratio = r["error"] / measured[(r["layer"], r["config"])]
        assert 0.5 < ratio < 2.0, (r, ratio)


def test_gptq_probes_measure_less_error_than_rtn():
    """method='gptq' measures MatMuls quantized by GPTQ on the calibration Hessians (what
    quantize-nbits' recipe runs): less output error than round-to-nearest at the probe."""
    def probe(method):
        rows = _run(_two_branch(), _ctx(k=K), max_bits=8.5, method=method)["sensitivities"]
        return {r["layer"]: r["error"] for r in rows if r["measured"]}

    rtn, gptq = probe("rtn"), probe("gptq")
    assert gptq["Wa"] < rtn["Wa"]


def test_gptq_probes_are_fitted_without_the_measured_feeds():
    """GPTQ fits the tokens of its Hessian: a probe measured on tokens inside the Hessian looks
    better than on new text. With held_out (the default) the probes' Hessians leave the measured
    feed out, so the measured error is the larger, out-of-sample one (16 tokens a feed, K = 64:
    GPTQ overfits strongly here)."""
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 16, K)).astype(np.float32)} for _ in range(4)]

    def probe(held_out):
        stats = _run(_two_branch(), PassContext(calibration=feeds, calibration_source="test"), max_bits=8.5,
                     method="gptq", feeds=1, held_out=held_out)
        return {r["layer"]: r["error"] for r in stats["sensitivities"] if r["measured"]}, stats["notes"]

    inside, _ = probe(False)
    held, notes = probe(True)
    assert held["Wa"] > 1.2 * inside["Wa"]
    assert any("probe Hessians from calibration feeds 2-4" in n for n in notes)
    one = _run(_two_branch(), PassContext(calibration=feeds[:1], calibration_source="test"), max_bits=8.5,
               method="gptq", feeds=1)
    assert any("include the measured feeds" in n for n in one["notes"])


def test_row_errors_ignore_padding():
    ref = np.ones((1, 3, 4), np.float32)
    out = ref.copy()
    out[0, 2] = -1  # a padding row, opposite
    mask = np.array([[1, 1, 0]])
    assert sens.row_errors(out, ref, mask).tolist() == [0.0, 0.0]
    assert sens.row_errors(out, ref, None).max() == pytest.approx(2.0)


def test_config_bytes_match_the_quantizer():
    from graphc.passes import _blockquant as bq

    w = np.random.default_rng(0).standard_normal((48, 100)).astype(np.float32)
    for bits, block, sym in ((2, 16, False), (4, 32, True), (8, 64, False), (4, 128, False)):
        q = bq.quantize(w, bits, block, symmetric=sym, method=bq.Method.RTN, scale_dtype=np.float16)
        assert sens.config_bytes(48, 100, sens.QuantConfig(bits, block), symmetric=sym,
                                 scale_dtype="float16") == q.nbytes()


# ----------------------------------------------------------------------------- planner


def test_planner_gives_the_sensitive_layer_more_bits_within_the_budget():
    model = _two_branch()
    stats = _run(model, max_bits=6.0)
    by = _by_layer(stats)
    assert by["Wa"]["bits"] > by["Wb"]["bits"]
    assert stats["planned_bytes"] <= 6.0 * 2 * K * N / 8
    assert stats["planned_bits_per_weight"] <= 6.0
    nodes = {n.name: n for n in model.graph}
    for layer, node in (("Wa", "loud"), ("Wb", "quiet")):
        assert nodes[node].metadata_props[META_BITS] == str(by[layer]["bits"])
        assert nodes[node].metadata_props[META_BLOCK] == str(by[layer]["block_size"])


def test_stats_are_json_with_every_choice():
    stats = json.loads(json.dumps(_run(_two_branch(), max_bits=5.0)))
    assert {c["layer"] for c in stats["choices"]} == {"Wa", "Wb"}
    for c in stats["choices"]:
        assert {"layer", "bits", "block_size", "bytes", "predicted_error", "nodes"} <= set(c)
    assert stats["predicted_error"] == pytest.approx(sum(c["predicted_error"] for c in stats["choices"]), rel=1e-3)


@pytest.mark.parametrize("budget", [3.0, 4.0, 5.0, 6.0, 9.0])
def test_plan_respects_size_budget_and_is_best_of_all_assignments(budget):
    rng = np.random.default_rng(int(budget))
    layers = []
    for _ in range(4):
        opts = [pp.Option(f"o{j}", int(n), float(e)) for j, (n, e) in
                enumerate(zip(rng.integers(100, 1000, 5), rng.random(5)))]
        layers.append(opts)
    max_bytes = int(budget * 400)
    import itertools

    feasible = [p for p in itertools.product(range(5), repeat=4)
                if sum(layers[i][j].nbytes for i, j in enumerate(p)) <= max_bytes]
    if not feasible:
        with pytest.raises(PassError, match="cannot be met"):
            pp.plan(layers, max_bytes=max_bytes)
        return
    pick = pp.plan(layers, max_bytes=max_bytes)
    assert sum(layers[i][j].nbytes for i, j in enumerate(pick)) <= max_bytes
    best = min(sum(layers[i][j].error for i, j in enumerate(p)) for p in feasible)
    got = sum(layers[i][j].error for i, j in enumerate(pick))
    assert got == pytest.approx(best, abs=1e-12)  # the exact optimum (a unit is one byte here)


def test_plan_error_budget_buys_fewest_bytes():
    layers = [[pp.Option("2", 100, 0.1), pp.Option("4", 200, 0.01), pp.Option("8", 400, 0.0001)]] * 3
    pick = pp.plan(layers, max_error=0.05)
    assert sum(layers[i][j].error for i, j in enumerate(pick)) <= 0.05
    assert sorted(pick) == [1, 1, 1]  # 3 x 0.01; any layer at 2 bits would exceed
    with pytest.raises(PassError, match="max_error=1e-05 cannot be met"):
        pp.plan(layers, max_error=1e-5)


def test_error_budget_through_the_pass():
    stats = _run(_two_branch(), max_bits=0, max_error=1e-3)
    assert stats["predicted_error"] <= 1e-3


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"max_bits": -1.0}, UnsupportedError, "negative"),
        ({"max_bytes": -5}, UnsupportedError, "negative"),
        ({"max_bits": 0}, UnsupportedError, "no budget"),
        ({"max_bytes": 10}, UnsupportedError, "max_bits and max_bytes are size budgets"),
        ({"max_error": 1.5}, UnsupportedError, "not below 1"),
        ({"max_bits": 4.0, "bits": [3]}, UnsupportedError, "supported: 2, 4, 8"),
        ({"max_bits": 4.0, "block_sizes": [48]}, UnsupportedError, "supported: 16"),
        ({"max_bits": 4.0, "method": "awq"}, UnsupportedError, "supported: rtn, mse, hqq, gptq"),
        ({"max_bits": 4.0, "damp": 0.0}, UnsupportedError, "damp=0.0"),
        ({"max_bits": 1.0}, PassError, "max_bytes=.* cannot be met: the smallest option"),
        ({"max_bits": 0, "max_bytes": 100}, PassError, "cannot be met"),
        ({"max_bits": 0, "max_error": 1e-12, "bits": [2]}, PassError, "max_error=1e-12 cannot be met"),
    ],
)
def test_bad_budget_is_a_clear_typed_error(options, error, match):
    with pytest.raises(error, match=match):
        _run(_two_branch(), **options)


def test_no_calibration_is_an_error():
    with pytest.raises(PassError, match="needs calibration data"):
        MixedPrecision(Opts(max_bits=4.0), PassContext())(_two_branch())


def test_unknown_option_names_the_pass():
    with pytest.raises(GraphcError, match="mixed-precision accepts"):
        MixedPrecision.from_dict({"budget": 4})


# ----------------------------------------------------------------------------- end to end


def test_quantizers_follow_the_plan_and_outputs_stay_close():
    model = _two_branch()
    x = _ctx(seed=7).calibration[0]["x"]
    ref = run(model, {"x": x})[0]
    by = _by_layer(_run(model, max_bits=6.0))
    result = QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32))(model)
    assert result.stats.counts["matmuls_at_planned_precision"] == 2
    nbits = {n.name: n for n in model.graph if n.op_type == "MatMulNBits"}
    for layer, node in (("Wa", "loud_q"), ("Wb", "quiet_q")):
        q = nbits[f"{node}{by[layer]['bits']}"]
        assert q.attributes.get_int("bits") == by[layer]["bits"]
        assert q.attributes.get_int("block_size") == by[layer]["block_size"]
    assert cosine(run(model, {"x": x})[0], ref) > 0.99


def test_embedding_table_is_planned_and_gather_block_follows():
    model = embedding(vocab=200, dim=32)
    ids = np.random.default_rng(0).integers(0, 200, (4, 6)).astype(np.int64)
    feed = {i.name: (ids if "id" in i.name else np.zeros_like(ids)) for i in model.graph.inputs}
    stats = MixedPrecision(Opts(max_bits=3.5), PassContext(calibration=[feed]))(model).stats.to_dict()
    (choice,) = [c for c in stats["choices"] if c["kind"] == "embedding"]
    assert 8 * choice["bytes"] / choice["params"] <= 3.5
    result = QuantizeGatherBlock()(model)
    assert result.stats.counts["tables_at_planned_precision"] == 1
    (gbq,) = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    assert gbq.attributes.get_int("bits") == choice["bits"] == 2
    assert gbq.attributes.get_int("block_size") == choice["block_size"]


def test_planned_unsupported_config_is_refused_by_the_qdq_emitter():
    model = _two_branch()
    _run(model, max_bits=3.0, bits=[2])
    with pytest.raises(UnsupportedError, match="bits=2 with emit='qdq'"):
        QuantizeNBits(QuantizeNBits.Options(emit="qdq"))(model)


def test_report_shows_sensitivities_and_planner():
    from graphc.report.html import render_report
    from graphc.report.data import planner_rows

    stats = _run(_two_branch(), max_bits=6.0)
    sens_rows, plan_rows = planner_rows([{"name": "mixed-precision", "stats": stats}])
    assert {r["layer"] for r in sens_rows} == {"Wa", "Wb"} and all(r["metric"] == "1 - cos at int4/b32" for r in sens_rows)
    assert [r["choice"] for r in plan_rows] == [f"int{c['bits']}/b{c['block_size']}" for c in stats["choices"]]
    html = render_report({"title": "t", "sensitivities": sens_rows, "planner": plan_rows})
    assert "plot-sensitivity" in html and "plot-planner" in html
    assert planner_rows([{"name": "cse", "stats": {}}]) == (None, None)


def test_embedding_rows_used_in_calibration_kept_at_more_bits():
    """Calibration reads 20 of 1000 rows: the plan keeps those at more bits than the rest (split
    table, id → row map), and the gathered values match numpy's dequantization of each part."""
    from graphc.passes import _blockquant as bq

    model = embedding(vocab=1000, dim=64)
    table = model.graph.initializers["table"].const_value.numpy().copy()
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.arange(20), rng.integers(0, 20, 60)]).reshape(4, 20).astype(np.int64)
    feed = {"ids": ids, "tt": np.zeros_like(ids)}
    stats = MixedPrecision(Opts(max_bits=3.2), PassContext(calibration=[feed]))(model).stats.to_dict()
    (c,) = [c for c in stats["choices"] if c["kind"] == "embedding"]
    assert c["used_rows"] >= 20 and c["other_rows_bits"] < c["bits"]
    assert 8 * c["bytes"] / c["params"] <= 3.2
    QuantizeGatherBlock()(model)
    assert sorted(n.op_type for n in model.graph if n.op_type in ("GatherBlockQuantized", "Where")) == [
        "GatherBlockQuantized", "GatherBlockQuantized", "Where"]
    all_ids = np.array([[0, 5, 19, 20, 150, 999]], np.int64)
    got = run(model, {"ids": all_ids, "tt": np.zeros_like(all_ids)})[0][0]
    types = embedding(vocab=1000, dim=64).graph.initializers["types"].const_value.numpy()[0]
    hot = bq.quantize(table[:20], c["bits"], c["block_size"], symmetric=False, method=bq.Method.MSE,
                      scale_dtype=np.float16).dequantize()
    cold = bq.quantize(table[20:], c["other_rows_bits"], c["other_rows_block_size"], symmetric=False,
                       method=bq.Method.MSE, scale_dtype=np.float16).dequantize()
    want = np.stack([hot[0], hot[5], hot[19], cold[0], cold[130], cold[979]]) + types
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_row_splits_promote_by_norm_only_as_far_as_calibration_supports():
    from graphc.passes import _row_use

    rng = np.random.default_rng(0)
    table = rng.standard_normal((400, 8)).astype(np.float32)
    table[200:] *= 0.1  # rows 200.. small: never read below
    ids = rng.integers(0, 200, 3000)  # reads only the large-norm half
    splits = _row_use.row_splits(table, ids)
    assert [s.promoted for s in splits] == list(_row_use.PROMOTE)
    assert set(splits[0].hot.tolist()) == set(np.unique(ids).tolist())
    assert all(s.cold_share <= splits[0].cold_share for s in splits)
    # every row of 0..199 is read, so Good-Turing expects almost no unseen reads
    assert splits[0].cold_share < 0.01
    # a table every read covers has nothing to split
    assert _row_use.row_splits(table[:200], ids) == []


def test_row_splits_cross_validated_share_falls_faster_than_rows_when_norm_predicts_use():
    from graphc.passes import _row_use

    rng = np.random.default_rng(1)
    table = rng.standard_normal((5000, 8)).astype(np.float32) * rng.uniform(0.05, 1.0, (5000, 1)).astype(np.float32)
    p = np.linalg.norm(table, axis=1) ** 6
    ids = rng.choice(5000, size=4000, p=p / p.sum())
    splits = _row_use.row_splits(table, ids)
    base = splits[0].cold_share
    assert base > 0.01
    for s in splits[1:]:
        assert s.cold_share < (1 - s.promoted) * base  # better than promoting rows at random


def _tied(vocab=128, hidden=64, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["e", "Et"], ["logits"], name="head")]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])], {"E": table})
    ids = rng.integers(0, vocab, (2, 8)).astype(np.int64)
    return model, PassContext(calibration=[{"ids": ids}], calibration_source="test")


def test_tied_table_is_one_layer_planned_on_the_head_and_stored_once():
    model, ctx = _tied()
    result = MixedPrecision(Opts(max_bits=8.5, bits=(4, 8), block_sizes=(32, 64)), ctx)(model)
    choices = result.stats.details["choices"]
    assert [c["nodes"] for c in choices] == [["head", "embed"]]  # one layer, the head first
    c = choices[0]
    unpacked_zero_points = 128 * (64 // c["block_size"]) if c["bits"] < 8 else 0  # the gather's own copy
    assert c["bytes"] == sens.config_bytes(128, 64, sens.QuantConfig(c["bits"], c["block_size"]),
                                           symmetric=False, scale_dtype="float16") + unpacked_zero_points
    nodes = {n.name: n for n in result.model.graph}
    for name in ("head", "embed"):
        assert nodes[name].metadata_props[META_BITS] == str(c["bits"])
    out = QuantizeNBits(QuantizeNBits.Options(bits=4, block_size=32), ctx)(result.model)
    out = QuantizeGatherBlock(QuantizeGatherBlock.Options(bits=4, block_size=32), ctx)(out.model)
    assert out.stats.counts.get("tied_tables_shared") == 1
    heads = [n for n in out.model.graph if n.op_type == "MatMulNBits"]
    assert [(n.attributes.get_int("bits"), n.attributes.get_int("block_size")) for n in heads] == [
        (c["bits"], c["block_size"])]


def test_tied_table_candidates_are_blocks_that_divide_the_hidden_size():
    model, ctx = _tied(hidden=96)
    stats = MixedPrecision(Opts(max_bits=8.5, bits=(4,), block_sizes=(16, 32, 64)), ctx)(model).stats.to_dict()
    assert {r["block_size"] for r in stats["sensitivities"]} == {16, 32}  # 96 is not a multiple of 64


def test_tied_table_whose_head_is_excluded_stays_out_of_the_plan():
    model, ctx = _tied()
    result = MixedPrecision(Opts(max_bits=4.5, exclude=("head",)), ctx)(model)
    assert not result.modified
    assert any("tied to an LM head" in s["reason"] for s in result.stats.skipped)


# ----------------------------------------------------------------------------- kl metric


def test_row_kl_matches_the_definition_and_is_zero_on_the_reference():
    rng = np.random.default_rng(0)
    ref, out = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
    want = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(sens.row_kl(out, sens.log_softmax(ref)), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sens.row_kl(ref, sens.log_softmax(ref)), 0, atol=1e-6)


def test_kl_metric_ranks_the_planted_layer_first_and_reports_a_perplexity_rise():
    stats = _run(_two_branch(), max_bits=8.5, measure_all=True, metric="kl")
    for config in {r["config"] for r in stats["sensitivities"]}:
        err = {r["layer"]: r["error"] for r in stats["sensitivities"] if r["config"] == config}
        assert err["Wa"] > 100 * err["Wb"] > 0, config
    assert "predicted_cosine" not in stats
    assert stats["predicted_kl"] == stats["predicted_error"] > 0
    assert stats["predicted_perplexity_rise"] == pytest.approx(np.expm1(stats["predicted_kl"]), rel=1e-2, abs=1e-5)


def test_unknown_metric_is_refused_with_the_supported_ones():
    with pytest.raises(UnsupportedError, match="cosine, kl"):
        _run(_two_branch(), max_bits=4.5, metric="mse")


@pytest.mark.slow
def test_minilm_plan_meets_the_bits_budget_and_ranks_ffn_above_attention(minilm_export):
    """Real all-MiniLM-L6-v2 (tweets as calibration): every block's FFN expansion is more
    sensitive than its attention query/key projections, the table is split by row use, and
    the plan stays within the bits budget."""
    pytest.importorskip("transformers")
    from graphc.front.api import calibration_context
    from graphc.core.io import load_model

    model = load_model(minilm_export)
    ctx = calibration_context(model, 64)
    stats = MixedPrecision(Opts(max_bits=3.95, feeds=1), ctx)(model).stats.to_dict()
    assert stats["layers_planned"] == 38 and stats["planned_bits_per_weight"] <= 3.95
    measured = {r["layer"]: r["error"] for r in stats["sensitivities"] if r["measured"]}
    for i in range(6):
        ffn = measured[f"encoder.layer.{i}.intermediate.dense"]
        assert ffn > measured[f"encoder.layer.{i}.attention.self.query"]
        assert ffn > measured[f"encoder.layer.{i}.attention.self.key"]
    (word,) = [c for c in stats["choices"] if c["layer"] == "embeddings.word_embeddings"]
    assert word["used_rows"] < 30522 and word["other_rows_bits"] == 2


def test_compress_report_and_json_show_the_plan(tmp_path):
    """compress with a mixed-precision recipe: the JSON summary lists the choices and the HTML
    report draws the sensitivities and the planner."""
    import graphc
    from graphc.core.recipes import Recipe, Step, Tolerance

    recipe = Recipe("mixed-test", "test", (Step("mixed-precision", {"max_bits": 6.0}),
                                           Step("quantize-nbits", {"method": "rtn"})), Tolerance(min_cosine=0.9))
    model = _two_branch()
    feeds = _ctx(seed=3).calibration
    result = graphc.compress(model, recipe=recipe, feeds=feeds, report=tmp_path / "r.html", attribution=False)
    summary = json.loads(json.dumps(result.to_dict()))
    (plan,) = [p for p in summary["passes"] if p["name"] == "mixed-precision"]
    assert {c["layer"] for c in plan["stats"]["choices"]} == {"Wa", "Wb"}
    html = (tmp_path / "r.html").read_text()
    assert 'id="plot-planner"' in html and "plot-sensitivity" in html


def test_plan_takes_one_large_upgrade_when_it_beats_many_small_ones_and_is_monotone():
    # an LM head whose better option is one large step (slope below the small layers') but
    # whose absolute gain is larger than all of them together: a hull greedy spends the bytes
    # on the small steps first and then cannot afford the head
    head = [pp.Option("int4", 100, 2.0), pp.Option("int8", 1500, 0.01)]
    small = [pp.Option("int4", 100, 0.1), pp.Option("int8", 150, 0.02)]
    layers = [head] + [small] * 20
    least = 21 * 100
    pick = pp.plan(layers, max_bytes=least + 1400)
    assert pick[0] == 1  # head upgraded: 0.01 + 20 x 0.1 = 2.01 < 2.0 + 20 x 0.02 = 2.4
    errors = []
    for extra in range(0, 2500, 50):
        pick = pp.plan(layers, max_bytes=least + extra)
        assert sum(layers[i][j].nbytes for i, j in enumerate(pick)) <= least + extra
        errors.append(sum(layers[i][j].error for i, j in enumerate(pick)))
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))  # more bytes never plan worse


def test_plan_with_coarse_units_stays_within_the_budget_and_near_the_optimum():
    rng = np.random.default_rng(7)
    layers = [[pp.Option(f"o{j}", int(n), float(e)) for j, (n, e) in
               enumerate(zip(rng.integers(10_000, 200_000, 4), rng.random(4)))] for _ in range(30)]
    least = sum(min(o.nbytes for o in opts) for opts in layers)
    fine = pp.plan(layers, max_bytes=least + 1_000_000, resolution=10**7)
    coarse = pp.plan(layers, max_bytes=least + 1_000_000, resolution=200)
    err = lambda p: sum(layers[i][j].error for i, j in enumerate(p))
    assert sum(layers[i][j].nbytes for i, j in enumerate(coarse)) <= least + 1_000_000
    assert err(coarse) <= err(fine) * 1.05 + 1e-9
    assert err(fine) <= err(coarse) + 1e-12


def test_plan_accepts_fractional_byte_estimates_and_a_float_budget():
    # split-table options estimate bytes as floats; the budget may come from max_bits * params / 8
    layers = [[pp.Option("a", 100.5, 1.0), pp.Option("b", 300.25, 0.1)], [pp.Option("a", 50.0, 0.5), pp.Option("b", 90.7, 0.2)]]
    assert pp.plan(layers, max_bytes=392.0) == [1, 1]  # 301 + 91 whole bytes: exactly the budget
    assert pp.plan(layers, max_bytes=390.5) == [1, 0]  # 300.25 + 90.7 would not fit
    assert pp.plan(layers, max_error=0.75) == [1, 0]


def test_kl_from_a_cached_reference_matches_float64_kl():
    import pickle

    from graphc.passes import _sensitivity as sens

    def truth(out, ref):
        lp, lq = (a.astype(np.float64) for a in (ref, out))
        lp = lp - lp.max(-1, keepdims=True)
        lq = lq - lq.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        return (np.exp(lp) * (lp - lq)).sum(-1)

    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((64, 3000)) * 4).astype(np.float32)
    for noise in (1e-3, 0.3):  # KLs of ~4e-7 and ~0.035 nats a row
        out = ref + (rng.standard_normal(ref.shape) * noise).astype(np.float32)
        cached = pickle.loads(pickle.dumps(sens.SoftmaxRef(ref)))  # travels to Ray workers
        expected = truth(out, ref)
        np.testing.assert_allclose(sens.kl_rows(out, cached), expected, rtol=1e-4, atol=3e-7)
        # no worse than the direct float32 formula it replaces
        direct = np.abs(sens.row_kl(out, sens.log_softmax(ref)) - expected).max()
        assert np.abs(sens.kl_rows(out, cached) - expected).max() <= direct * 1.01
    np.testing.assert_allclose(sens.kl_rows(ref, sens.SoftmaxRef(ref)), 0.0, atol=3e-7)


def test_kl_rows_split_over_threads_is_each_row_computed_alone(monkeypatch):
    """The rows of a block go to a few threads, each with its own buffer: every row's KL is the
    one computed for that row alone, for any split (uneven ones included), and a buffer left
    larger by a bigger block earlier is reused without reading stale values."""
    rng = np.random.default_rng(1)
    ref = (rng.standard_normal((300, 500)) * 3).astype(np.float32)
    out = ref + (rng.standard_normal(ref.shape) * 0.2).astype(np.float32)
    cached = sens.SoftmaxRef(ref)
    alone = np.array([sens.kl_rows(out[i:i + 1], sens.SoftmaxRef(ref[i:i + 1]))[0] for i in range(len(out))])
    assert alone.min() > 0
    for threads in (1, 2, 3, 7):
        monkeypatch.setattr(sens, "_kl_threads", lambda threads=threads: threads)
        np.testing.assert_array_equal(sens.kl_rows(out, cached), alone)
    small = sens.kl_rows(out[:70], sens.SoftmaxRef(ref[:70]))
    np.testing.assert_array_equal(small, alone[:70])
    assert sens._kl_buffers
    sens.release_kl_buffers()
    assert not sens._kl_buffers
    np.testing.assert_array_equal(sens.kl_rows(out, cached), alone)


def test_kl_rows_in_a_forked_child_does_not_wait_on_the_parents_threads():
    import multiprocessing

    rng = np.random.default_rng(2)
    ref = (rng.standard_normal((256, 300)) * 3).astype(np.float32)
    out = ref + (rng.standard_normal(ref.shape) * 0.2).astype(np.float32)
    cached = sens.SoftmaxRef(ref)
    want = sens.kl_rows(out, cached)  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(sens.kl_rows(out, cached)))
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    np.testing.assert_array_equal(queue.get(timeout=5), want)


def _table_two_layers_head(width: int):
    """A float model: a [300, 192] table looked up, MatMuls 192 -> 320 -> ``width``, an untied
    head ``width`` -> 300."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"table": rng.standard_normal((300, 192)), "w1": rng.standard_normal((192, 320)),
             "w2": rng.standard_normal((320, width)), "head": rng.standard_normal((width, 300))}
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["g"]), helper.make_node("MatMul", ["g", "head"], ["logits"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 300])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_size_like_is_the_bytes_ort_own_4bit_quantizer_writes(tmp_path):
    """size_like = "rtn4-b128" against ONNX Runtime's MatMulNBitsQuantizer (RTN, 4 bits, block 128,
    symmetric, MatMul and Gather) on the same graph: K not a multiple of the block included."""
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from graphc.passes import _sensitivity as sens
    from graphc.passes.mixed_precision import MixedPrecision

    proto = _table_two_layers_head(192)
    model = ir.serde.deserialize_model(proto)  # first: ORT's quantizer rewrites the proto it is given
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, op_types_to_quantize=("MatMul", "Gather"))
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    quantizer.process()
    ort_bytes = 0
    for t in quantizer.model.model.graph.initializer:
        a = numpy_helper.to_array(t)
        ort_bytes += (a.size + 1) // 2 if t.data_type in (TensorProto.INT4, TensorProto.UINT4) else a.nbytes
    layers, _ = sens.find_layers(model.graph, min_cols=64)
    assert sorted(layer.kind for layer in layers) == ["embedding", "matmul", "matmul", "matmul"]
    budget = MixedPrecision(MixedPrecision.Options(max_bits=0, size_like="rtn4-b128"))._size_like(layers, 0)
    assert budget == pytest.approx(ort_bytes * 0.995, rel=1e-3)


def test_probe_tokens_measures_on_the_first_tokens_only():
    from graphc.passes.mixed_precision import MixedPrecision

    mp = MixedPrecision(MixedPrecision.Options(max_bits=4.0, probe_tokens=16))
    stats = PassStats()
    feeds = [{"input_ids": np.arange(64).reshape(2, 32), "attention_mask": np.ones((2, 32), np.int64)}]
    cut = mp._cropped(feeds, stats)
    assert cut[0]["input_ids"].shape == (2, 16) and (cut[0]["input_ids"] == feeds[0]["input_ids"][:, :16]).all()
    kv = [{**feeds[0], "past_key_values.0.key": np.zeros((2, 1, 0, 8), np.float32)}]
    assert mp._cropped(kv, stats) is kv and "measured whole" in stats.notes[-1]
    with pytest.raises(UnsupportedError, match="probe_tokens"):
        MixedPrecision(MixedPrecision.Options(max_bits=4.0, probe_tokens=1))._validate()


def test_kl_is_taken_on_the_logits_alone():
    from graphc.passes import _sensitivity as sens

    kv = ["logits", "present.0.key", "present.0.value"]
    assert sens.measured_outputs(kv, "kl") == ["logits"]
    assert sens.measured_outputs(kv, "cosine") == kv
    assert sens.measured_outputs(["y"], "kl") == ["y"]  # no logits: every output, as before


def test_gptq_probes_candidate_errors_pass_the_hessians_tokens_and_plan_alike_through_the_thin_factor(monkeypatch):
    """The probes' items carry their Hessian's token count (48: feeds 2-4 of 16 tokens), and with
    few tokens next to the width the candidates' weight errors go through the thin factor: the
    same plan as through the K x K Hessian."""
    from graphc.passes import _gram_factor

    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 16, K)).astype(np.float32)} for _ in range(4)]
    seen = []
    real = sens.thin_factor
    monkeypatch.setattr(sens, "thin_factor", lambda h, t: seen.append((t, f := real(h, t))) or f)

    def plan():
        stats = _run(_two_branch(), PassContext(calibration=feeds, calibration_source="test"), max_bits=4.5,
                     method="gptq", feeds=1)
        return {c["layer"]: (c["bits"], c["block_size"]) for c in stats["choices"]}

    full = plan()
    assert seen and all(t == 48 and f is None for t, f in seen)  # 48 > K / 4: the K x K form
    seen.clear()
    monkeypatch.setattr(_gram_factor, "MAX_RANK_FRACTION", 1.0)
    thin = plan()
    assert seen and all(t == 48 and f is not None and f.shape[0] <= 48 for t, f in seen)
    assert thin == full


def test_size_like_genai_int4_leaves_an_untied_table_float():
    """The model builder quantizes an untied LM head but looks rows up in a float table: the
    ``genai-int4`` budget counts the table at its float bytes, every MatMul at 4-bit blocks of
    32 with a float32 scale each (K padded to whole blocks)."""
    from graphc.passes import _sensitivity as sens
    from graphc.passes.mixed_precision import GRAPH_MARGIN, MixedPrecision

    model = ir.serde.deserialize_model(_table_two_layers_head(200))
    layers, _ = sens.find_layers(model.graph, min_cols=64)
    assert not any(layer.tied for layer in layers) and len(layers) == 4

    def nbits(k, n):  # MatMulNBits [K, N]: N x ceil(K / 32) blocks of 16 bytes and a 4-byte scale
        return n * -(-k // 32) * (16 + 4)

    want = 300 * 192 * 4 + nbits(192, 320) + nbits(320, 200) + nbits(200, 300)
    budget = MixedPrecision(MixedPrecision.Options(max_bits=0, size_like="genai-int4"))._size_like(layers, 1000)
    assert budget == 1000 + int(want * (1 - GRAPH_MARGIN))
    with pytest.raises(UnsupportedError, match="size_like='rtn4'"):
        MixedPrecision(MixedPrecision.Options(max_bits=0, size_like="rtn4"))._validate()

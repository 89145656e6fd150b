import numpy as np
import pytest
from onnx import TensorProto, helper

from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import PassContext
from graphc.passes import _lowrank as lr
from graphc.passes.quantize_int8 import QuantizeInt8
from graphc.passes.svd_linear import SvdLinear
from tests.passes.graphs import _model, cosine, mlp, ops_of, run

Opts = SvdLinear.Options


def _anisotropic(rng, shape, k, spread=3.0):
    """Activations whose channels differ in scale by 10^spread and are correlated (one fixed
    rotation of scaled independent channels; ``rng`` draws the tokens), as LayerNorm outputs
    with outlier gains are."""
    scales = np.logspace(-spread / 2, spread / 2, k)
    mix = np.linalg.qr(np.random.default_rng(1234).standard_normal((k, k)))[0]
    z = rng.standard_normal((*shape, k)) * scales
    return (z @ mix).astype(np.float32)


def _ctx(feeds):
    return PassContext(calibration=feeds, calibration_source="test")


def _err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("k,n", [(24, 40), (40, 24)])
def test_full_rank_reconstructs_exactly(k, n):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    gram = np.cov(rng.standard_normal((500, k)), rowvar=False)
    for metric in (lr.Metric.plain(), lr.Metric.whitened(gram, 0.01), lr.Metric.asvd(np.abs(rng.standard_normal(k)), 0.5)):
        f = lr.factorize(w, metric, rank=min(k, n))
        assert f.rank == min(k, n) and f.error < 1e-6
        np.testing.assert_allclose(f.a @ f.b, w, atol=1e-4)


def test_error_decreases_with_rank_and_matches_the_measured_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    measured = []
    for rank in (2, 8, 16, 32):
        f = lr.factorize(w, lr.Metric.plain(), rank=rank)
        measured.append(_err(f.a @ f.b, w))
        assert f.error == pytest.approx(measured[-1], rel=1e-4)
    assert measured == sorted(measured, reverse=True) and len(set(measured)) == 4


def test_error_rank_is_the_smallest_rank_within_budget():
    s = np.array([10.0, 5.0, 1.0, 0.5, 0.1])
    for budget in (0.01, 0.05, 0.1, 0.5):
        r = lr.error_rank(s, budget)
        assert lr.relative_error(s, r) <= budget
        assert r == 0 or lr.relative_error(s, r - 1) > budget
    assert lr.break_even_rank(64, 64) == 31 and lr.break_even_rank(576, 1536) == 418


def test_whitened_error_is_the_output_error_on_the_calibration_data():
    rng = np.random.default_rng(2)
    x = _anisotropic(rng, (2000,), 32).astype(np.float64)
    w = rng.standard_normal((32, 40))
    f = lr.factorize(w, lr.Metric.whitened(x.T @ x / len(x), 1e-9), rank=8)
    assert _err(x @ (f.a.astype(np.float64) @ f.b), x @ w) == pytest.approx(f.error, rel=1e-3)


# --------------------------------------------------------------------------- the pass


def test_factorizes_matmuls_keeps_head_and_runs_in_ort():
    model = mlp(k=64, n=96)
    x = np.random.default_rng(3).standard_normal((2, 8, 64)).astype(np.float32)
    ref = run(mlp(k=64, n=96), {"x": x})
    res = SvdLinear(Opts(method="plain", rank_rule="ratio", param_ratio=0.5))(model)
    assert res.modified
    st = res.stats
    assert st.counts["layers_factorized"] == 2  # fc1 [64, 96], fc3 [64, 64]
    assert st.counts["params_removed"] == 64 * 96 - 19 * 160 + 64 * 64 - 16 * 128
    assert {"node": "fc2", "reason": "produces a graph output (LM head; include_head=true factorizes it)"} in st.skipped
    assert ops_of(model).count("MatMul") == 6  # 2 x 2 factors + head + scores
    names = set(model.graph.initializers)
    assert "W1" not in names and "W3" not in names and "W2" in names
    assert {n.metadata_props.get("graphc.pass") for n in model.graph if n.name.endswith(("_svd_a", "_svd_b"))} == {
        "svd-linear"}
    got = run(model, {"x": x})
    assert all(np.isfinite(g).all() for g in got)
    assert 0.5 < cosine(got[0], ref[0]) < 0.999  # rank 19 of 64 on a random weight: lossy, but related


def test_gemm_bias_alpha_beta_kept_exact_on_a_low_rank_weight():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((40, 4)) @ rng.standard_normal((4, 48))).astype(np.float32)  # [N, K], rank 4
    c = rng.standard_normal(40).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)
    def build():
        return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 48])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40])], {"W": w, "C": c})
    model = build()
    res = SvdLinear(Opts(method="plain", max_error=1e-3, include_head=True, min_elements=0))(model)
    assert res.stats.counts["layers_factorized"] == 1 and ops_of(model) == ["Gemm", "Gemm"]
    x = rng.standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], run(build(), {"x": x})[0], rtol=1e-4, atol=1e-4)
    assert model.graph.node(0).inputs[1].const_value.numpy().shape == (48, 4)


def test_whitened_beats_plain_on_anisotropic_activations():
    calib = [{"x": _anisotropic(np.random.default_rng(10 + i), (4, 64), 64)} for i in range(4)]  # 1024 tokens
    test = {"x": _anisotropic(np.random.default_rng(99), (4, 64), 64)}
    ref = run(mlp(k=64, n=96), test)
    errors = {}
    for method in ("plain", "asvd", "whitened"):
        model = mlp(k=64, n=96)
        res = SvdLinear(Opts(method=method, rank_rule="ratio", param_ratio=0.5), _ctx(calib))(model)
        assert res.stats.counts["layers_factorized"] == 2 and "plain_fallbacks" not in res.stats.counts
        errors[method] = _err(run(model, test)[1], ref[1])  # scores: from fc3 alone
    # measured: plain 0.333, asvd 0.302, whitened 0.022 (same ranks, held-out activations)
    assert errors["whitened"] < 0.5 * errors["plain"], errors
    assert errors["asvd"] < errors["plain"], errors


def test_error_budget_picks_rank_per_layer_and_skips_with_reasons():
    calib = [{"x": _anisotropic(np.random.default_rng(i), (4, 64), 64, spread=4.0)} for i in range(4)]
    model = mlp(k=64, n=96)
    res = SvdLinear(Opts(method="whitened", max_error=0.05), _ctx(calib))(model)
    st = res.stats
    # fc1 reads the anisotropic x: a few directions carry the output; fc2 reads Relu(h): flat
    assert st.counts["layers_factorized"] >= 1 and st.counts["max_rel_error"] <= 0.05
    plain = SvdLinear(Opts(method="plain", max_error=0.05))(mlp(k=64, n=96))
    assert not plain.modified
    reasons = [s["reason"] for s in plain.stats.skipped]
    assert any("is not below break-even rank 38 of the [64, 96] weight" in r for r in reasons), reasons
    small = SvdLinear(Opts(method="plain", min_elements=5000))(mlp(k=64, n=96))
    assert any("4096 elements < min_elements=5000" in s["reason"] for s in small.stats.skipped)


def test_too_few_calibration_tokens_fall_back_to_plain():
    calib = [{"x": _anisotropic(np.random.default_rng(0), (1, 16), 64)}]  # 16 tokens for 64 channels
    res = SvdLinear(Opts(method="whitened", rank_rule="ratio", param_ratio=0.5), _ctx(calib))(mlp(k=64, n=96))
    assert res.stats.counts["plain_fallbacks"] == 2
    assert any("16 calibration tokens < 128" in n for n in res.stats.notes)


def test_factors_are_quantized_by_quantize_int8():
    calib = [{"x": _anisotropic(np.random.default_rng(i), (4, 64), 64)} for i in range(4)]
    test = {"x": _anisotropic(np.random.default_rng(7), (2, 16), 64)}
    model = mlp(k=64, n=96)
    SvdLinear(Opts(method="whitened", rank_rule="ratio", param_ratio=0.6), _ctx(calib))(model)
    svd_out = run(model, test)
    q = QuantizeInt8()(model)
    assert q.stats.counts["matmuls_quantized"] == 5  # 4 factors + the head
    ops = ops_of(model)
    assert ops.count("MatMulIntegerToFloat") == 5 and "MatMul" in ops  # scores stay float
    assert not any(n.endswith(("_svd_a", "_svd_b")) for n in model.graph.initializers)  # float factors gone
    got = run(model, test)
    assert cosine(got[0], svd_out[0]) > 0.99


@pytest.mark.parametrize(
    "opts,match",
    [
        (Opts(max_error=0.0), "max_error=0.0"),
        (Opts(max_error=1.0), "must lie in"),
        (Opts(rank_rule="ratio", param_ratio=1.0), "param_ratio=1.0"),
        (Opts(rank_rule="ratio", param_ratio=-0.1), "param_ratio=-0.1"),
        (Opts(method="svd++"), "method='svd\\+\\+'; supported: plain, whitened, asvd"),
        (Opts(rank_rule="energy"), "supported: error, ratio"),
    ],
)
def test_impossible_budgets_and_unknown_choices_are_typed_errors(opts, match):
    with pytest.raises(UnsupportedError, match=match) as e:
        SvdLinear(opts)(mlp())
    assert "\n" not in str(e.value)


def test_activation_aware_without_calibration_is_a_pass_error():
    with pytest.raises(PassError, match="needs calibration data"):
        SvdLinear(Opts(method="whitened"))(mlp(k=64, n=96))


def test_ratio_leaving_rank_zero_is_skipped():
    res = SvdLinear(Opts(method="plain", rank_rule="ratio", param_ratio=0.01, min_elements=0))(mlp(k=64, n=96))
    assert not res.modified
    assert any("leaves rank 0" in s["reason"] for s in res.stats.skipped)



def test_compress_recipe_svd_then_int8_on_a_llama_like_graph():
    """End to end through graphc.compress: the recipe's svd-linear asks for calibration
    (synthesized for a bare model), its factors are then quantized by quantize-int8."""
    import graphc
    from graphc.core.recipes import recipe_from_dict
    from tests.fuzz.strategies import Spec, build

    proto = build(Spec(hidden=32, layers=2, ffn_mult=4, norm="rmsnorm_decomposed", prenorm=True, act="swiglu",
                       mask="causal", token_types=False, lm_head=True))
    recipe = recipe_from_dict({"name": "svd-int8", "passes": [
        {"name": "svd-linear", "options": {"rank_rule": "ratio", "param_ratio": 0.9, "min_elements": 0,
                                           "min_tokens_per_channel": 0.5}},
        {"name": "quantize-int8"}]})
    result = graphc.compress(proto, recipe=recipe, force=True, attribution=False)
    svd, q = result.passes
    assert svd.modified and q.modified
    assert svd.stats["layers_factorized"] == 14 and "plain_fallbacks" not in svd.stats  # 7 per block, not the head
    assert "calibrated on" in " ".join(svd.stats["notes"])
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("MatMulIntegerToFloat") == 2 * 14 + 1  # both factors of each layer, and the head
    assert result.validation.output_cosine > 0.5  # random weights, 10% removed per layer, then int8

"""Every registered pass, fuzzed on random transformer-like graphs (tests/fuzz/strategies.py)
and on real tiny BERT / Llama exports from both torch exporters.

For each pass (default options) the outcome is A, the result is valid ONNX that ORT loads and
that matches the model before the pass within the pass's tolerance (harness.TOLERANCES), or
B, a deliberate GraphcError. Passes listed in harness.PREPARE are also fuzzed where the int8
recipe runs them (after the passes they build on). A pass claiming a float type
(``GraphcPass.dtypes``) must reach outcome A on models of that type; on models of other types
it must leave the model as it is with a reason in its stats, refuse, or still match.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc
from graphc.core.errors import GraphcError
from graphc.core.registry import all_passes
from graphc.checks.validate import make_session, run_feeds, synthesize_inputs
from tests.fuzz import harness as H
from tests.fuzz import plans as P
from tests.fuzz.strategies import build, specs

PASSES = sorted(all_passes())
# per pass; 20 keeps `make test` under 10 minutes on a quiet 2-core machine (30 took this file
# to ~260 s of test time, the suite to 9:56 on an AVX2 EPYC). `make fuzz` runs 200 per pass
# (GRAPHC_FUZZ_EXAMPLES), outside `make test`.
EXAMPLES = int(os.environ.get("GRAPHC_FUZZ_EXAMPLES", "20"))

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.mark.parametrize("name", PASSES)
def test_pass_on_random_transformers(name):
    """Each pass on graphs drawn for it (tests/fuzz/plans.py), with the options its plan
    gives; outcome A or B every time, and at least the plan's share of the examples
    actually transformed (a pass that regresses to skipping everything fails here)."""
    plan = P.plan_for(name)
    seen: Counter = Counter()

    examples = max(4, round(EXAMPLES * plan.share))

    @settings(FUZZ, max_examples=examples)
    @given(spec=P.specs_for(name), prepared=P.prepared_for(name, H.PREPARE))
    def run(spec, prepared):
        model = ir.serde.deserialize_model(build(spec))
        if prepared and H.prepare(model, H.PREPARE[name]) is not None:
            seen["prepare refused"] += 1  # an earlier pass refused (its own property allows it)
            return
        outcome = H.assert_outcome(name, model, prepared, options=plan.options, tol=plan.tol,
                                   may_refuse=plan.may_refuse)
        seen["refused" if outcome.kind == "refused" else "modified" if outcome.result.modified else "unchanged"] += 1

    run()
    total = sum(seen.values())
    assert total >= examples // 2, seen  # hypothesis ran the examples
    assert seen["modified"] >= plan.min_transformed * total, (
        f"{name} transformed {seen['modified']} of {total} examples, the plan wants at least "
        f"{plan.min_transformed:.0%}: {dict(seen)}")


def test_every_pass_has_a_plan():
    """A pass with no plan would be fuzzed on graphs it may skip every time."""
    missing = [n for n in PASSES if n not in P.PLANS]
    assert not missing, f"add a plan for {missing} to tests/fuzz/plans.py"
    for name, plan in P.PLANS.items():
        assert plan.min_transformed > 0 or plan.why, f"{name}: a plan that transforms nothing must say why"


@pytest.mark.parametrize("name", [n for n in PASSES if P.float32_only(n)])
@settings(FUZZ, max_examples=max(3, EXAMPLES // 10))
@given(spec=specs(dtypes=("float16",)))
def test_float32_passes_leave_float16_models_alone(name, spec):
    """A pass that claims float32 only, on a float16 graph: it leaves it as it is with a
    reason, refuses, or still matches (harness.assert_outcome)."""
    model = ir.serde.deserialize_model(build(spec))
    plan = P.plan_for(name)
    H.assert_outcome(name, model, False, options=plan.options, tol=plan.tol, may_refuse=plan.may_refuse)


def test_every_pass_has_a_fuzz_tolerance():
    """A new pass is fuzzed automatically (held to DEFAULT_TOL meanwhile); it needs its own
    tolerance, with the reason, in tests/fuzz/harness.py."""
    missing = [n for n in PASSES if n not in H.TOLERANCES]
    assert not missing, f"add a tolerance for {missing} to TOLERANCES in tests/fuzz/harness.py"
    assert set(H.PREPARE) <= set(PASSES)
    for steps in H.PREPARE.values():
        assert set(steps) <= set(PASSES)


# --------------------------------------------------------------------------- the recipe


@settings(FUZZ, max_examples=25)
@given(spec=specs())
def test_int8_recipe_on_random_transformers(spec):
    """graphc.compress with the whole int8 recipe (synthesized calibration: outlier
    smoothing, QAttention when the attention fuses), forced past its tolerance: the result is
    still valid, loadable and within RECIPE_INT8_TOL of the original."""
    proto = build(spec)
    try:
        result = graphc.compress(proto, recipe="int8", force=True, attribution=False)
    except GraphcError as e:
        assert not H.is_crash(e), f"crash: {e!r} from {e.__cause__!r}"
        return
    graphc.core.model_checks.register_ort_onnx_domain_ops()
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=False)
    make_session(result.model)
    cosine = result.validation.output_cosine
    if cosine < H.RECIPE_INT8_TOL.cos:  # judged only on well-conditioned graphs (see harness)
        model = ir.serde.deserialize_model(proto)
        feeds = synthesize_inputs(model, count=2)
        kappa = H.condition(proto, feeds, run_feeds(make_session(model, threads=1), feeds, "original"))
        assert kappa > H.KAPPA_MAX and cosine >= H.ILL_CONDITIONED_COS, (kappa, result.validation.to_dict())
    if spec.dtype == "float16":  # nothing to quantize: fusions and cleanup only
        assert not any(r.name.startswith("quantize") and r.modified for r in result.passes)


# --------------------------------------------------------------------------- real exports


@pytest.mark.parametrize("name", PASSES)
def test_pass_on_real_exports(name, tiny_exports):
    """Fixed examples: tiny BERT and tiny Llama from the dynamo and the legacy exporter."""
    for label, path in tiny_exports.items():
        for prepared in (False, True) if name in H.PREPARE else (False,):
            model = graphc.core.io.load_model(path)
            if prepared and H.prepare(model, H.PREPARE[name]) is not None:
                continue
            try:
                H.assert_outcome(name, model, prepared)
            except AssertionError as e:
                raise AssertionError(f"{label} (prepared={prepared}): {e}") from None


def test_int8_recipe_on_real_exports(tiny_exports):
    for label, path in tiny_exports.items():
        result = graphc.compress(path, recipe="int8", force=True, attribution=False)
        onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=False)
        assert result.validation.passed, (label, result.validation.to_dict())
        ops = {n.op_type for n in result.model.graph}
        if label.startswith("llama"):  # a causal LM: int8's decoder form, 8-bit block-wise weights
            assert "MatMulNBits" in ops and "MatMulInteger" not in ops, (label, sorted(ops))
        else:
            assert "DynamicQuantizeLinear" in ops or "MatMulIntegerToFloat" in ops, label
        if label == "bert-dynamo":
            assert "QAttention" in ops, sorted(ops)


def test_harness_catches_a_broken_pass(monkeypatch):
    """Negative control: a pass that corrupts the graph, one that changes the numbers and
    one that crashes are each caught (outcome A and B are not vacuous)."""
    from graphc.passes.trim_outputs import TrimUnusedOutputs
    from tests.fuzz.strategies import Spec

    def fresh():
        return ir.serde.deserialize_model(build(Spec(hidden=16, heads=2)))

    def scale_output(self, model, stats):
        out = model.graph.outputs[0]
        node = out.producer()
        factor = ir.Value(name="k", const_value=ir.tensor(np.array(1.01, np.float32)))
        model.graph.register_initializer(factor)
        mul = ir.node("Mul", [node.inputs[0], factor])
        model.graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
        return True

    def crash(self, model, stats):
        raise KeyError("boom")

    def dangle(self, model, stats):
        model.graph.outputs[0].producer().replace_input_with(0, ir.Value(name="nowhere"))
        return True

    for run, expected in ((scale_output, "relative max error"), (crash, "crashed"), (dangle, None)):
        monkeypatch.setattr(TrimUnusedOutputs, "run", run)
        with pytest.raises(Exception, match=expected):  # dangle: the checker or the save refuses it
            H.check_pass("trim-outputs", fresh())


def test_a_pass_that_skips_everything_fails_its_plan(monkeypatch):
    """Negative control for the transformed share: compact-metadata made a no-op is caught."""
    from graphc.passes.cleanup import CompactMetadata

    monkeypatch.setattr(CompactMetadata, "run", lambda self, model, stats: False)
    with pytest.raises(AssertionError, match="compact-metadata transformed 0 of"):
        test_pass_on_random_transformers("compact-metadata")

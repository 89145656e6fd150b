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


import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc
from graphc.errors import GraphcError
from graphc.registry import all_passes
from graphc.validate import make_session, run_feeds, synthesize_inputs
from tests.fuzz import harness as H
from tests.fuzz.strategies import build, specs

PASSES = sorted(all_passes())
EXAMPLES = 30  # per pass; the whole tests/fuzz suite stays well under 3 minutes on 2 cores

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.mark.parametrize("name", PASSES)
@FUZZ
@given(spec=specs(), prepared=st.booleans())
def test_pass_on_random_transformers(name, spec, prepared):
    model = ir.serde.deserialize_model(build(spec))
    prepared = prepared and name in H.PREPARE
    if prepared and H.prepare(model, H.PREPARE[name]) is not None:
        return  # an earlier pass refused (its own property says that was allowed)
    H.assert_outcome(name, model, prepared)


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
    graphc.io.register_ort_onnx_domain_ops()
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
            model = graphc.io.load_model(path)
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

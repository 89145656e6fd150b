"""Probes that start at their layer's segment (passes/_cut_evaluator.py): the whole-model
evaluator's errors, the same numbers in a worker as here, and the whole model only where needed."""

import numpy as np
import pytest

from graphc.checks.validate import synthesize_inputs
from graphc.core.io import load_model
from graphc.passes import _cut_evaluator as cut
from graphc.passes import _probes
from graphc.passes import _sensitivity as sens


def _setup(path, metric):
    model = load_model(path)
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=32, exclude=())
    return model, layers, synthesize_inputs(model, count=2, seed=0)


def _quantized(layer, bits=4):
    q, _ = sens.quantize_view(layer, layer.view(), sens.QuantConfig(bits, 32), symmetric=False,
                              method=sens.bq.Method.RTN, scale_dtype="float16")
    return q


@pytest.mark.parametrize("metric", ["kl", "cosine"])
def test_cut_probes_measure_what_whole_passes_measure(tiny_llama, metric):
    model, layers, feeds = _setup(tiny_llama, metric)
    ev = cut.evaluator(model, layers, feeds, metric)
    assert isinstance(ev, cut.CutEvaluator) and ev.start_count >= cut.MIN_SEGMENTS
    whole = sens.Evaluator(model, layers, feeds, metric=metric)
    starts, wanted = [], []
    for layer in layers:
        replaced = {layer.value.name: _quantized(layer)}
        starts.append(ev.start(replaced))
        got, want = ev.error(replaced), whole.error(replaced)
        wanted.append(want)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-10), layer.name
    assert sum(w > 1e-6 for w in wanted) >= len(layers) // 2  # (this random model barely uses q and k)
    # the table starts at the first segment, later layers later: most probes skip part of the model
    assert starts[0] == 0 and starts[1:] == sorted(starts[1:]) and starts[-1] == max(ev.starts)
    assert sorted(set(starts)) == ev.starts
    # two weights at once start at the earlier one's segment
    a, b = layers[1], layers[-1]
    pair = {a.value.name: _quantized(a), b.value.name: _quantized(b)}
    assert ev.start(pair) == min(ev.start({a.value.name: pair[a.value.name]}), ev.start({b.value.name: pair[b.value.name]}))
    assert ev.error(pair) == pytest.approx(whole.error(pair), rel=1e-4)
    assert ev.error({}) == 0.0


def test_a_worker_rebuilt_from_the_payload_gets_the_same_numbers(tiny_llama):
    import pickle

    model, layers, feeds = _setup(tiny_llama, "kl")
    ev = cut.evaluator(model, layers, feeds, "kl")
    payload = pickle.loads(pickle.dumps(ev.payload()))
    shared = _probes.ProbeShared("cut-payload", payload, threads=1)
    _probes.forget("cut-payload")
    item = _probes.ProbeItem(layers[3].value.name, layers[3].transposed, "rtn", (sens.QuantConfig(4, 32),),
                             (sens.QuantConfig(4, 32),))
    try:
        remote = _probes.probe_layer(shared, item)  # rebuilt from the payload in this process
        assert sens.KL_THREADS == 1  # a worker's KL keeps to its share of the cores, as its ONNX Runtime
    finally:
        sens.KL_THREADS = None
    assert isinstance(_probes._EVALUATORS["cut-payload"], cut.CutEvaluator)
    _probes.register_local("cut-local", ev)
    local = _probes.probe_layer(_probes.ProbeShared("cut-local", {}), item)
    assert remote.measured == local.measured  # bit for bit
    _probes.forget("cut-local")


def test_a_model_that_does_not_cut_gets_the_whole_model_evaluator(tiny_llama):
    from tests.passes.test_mixed_precision import _tied

    model, layers, feeds = _setup(tiny_llama, "kl")
    assert isinstance(cut.evaluator(model, layers, feeds, "kl", cut=False), sens.Evaluator)
    head = cut.evaluator(model, layers[-1:], feeds, "kl")  # only the head planned: its probe runs the last segment
    assert isinstance(head, cut.CutEvaluator) and head.starts == [0, head.start({"lm_head": _quantized(layers[-1])})]
    model, ctx = _tied()  # a lookup and a head: too few segments to be worth a session each
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=32, exclude=())
    assert isinstance(cut.evaluator(model, layers, ctx.calibration, "kl"), sens.Evaluator)


def test_mixed_precision_plans_the_same_with_and_without_cut_probes(tiny_llama):
    from graphc.core.pass_base import PassContext
    from graphc.passes.mixed_precision import MixedPrecision

    stats = {}
    for on in (True, False):
        model = load_model(tiny_llama)
        ctx = PassContext(calibration=synthesize_inputs(model, count=2, seed=1), calibration_source="test")
        options = MixedPrecision.Options(max_bits=5, bits=(2, 4, 8), block_sizes=(32,), metric="kl", cut_probes=on)
        stats[on] = MixedPrecision(options, ctx)(model).stats.to_dict()
    assert stats[True]["probe_cuts"] >= cut.MIN_SEGMENTS and "probe_cuts" not in stats[False]
    errors = {on: np.array([r["error"] for r in s["sensitivities"]]) for on, s in stats.items()}
    np.testing.assert_allclose(errors[True], errors[False], rtol=1e-4)
    assert stats[True]["choices"] == stats[False]["choices"]


def test_a_part_onnx_runtime_refuses_falls_back_to_the_whole_model(tiny_llama, monkeypatch):
    from graphc.core.errors import ValidationError

    model, layers, feeds = _setup(tiny_llama, "kl")

    def refuse(*args, **kwargs):
        raise ValidationError("ONNX Runtime cannot load the model during sensitivity measurement (from cut 3): no")

    from graphc.core import streaming

    monkeypatch.setattr(streaming, "load", refuse)  # every part's session
    assert isinstance(cut.evaluator(model, layers, feeds, "kl"), sens.Evaluator)


def test_cut_sessions_share_the_process_arena(tiny_llama):
    """Every cut's session runs on the one arena registered with ONNX Runtime's environment."""
    from graphc.core import session

    model, layers, feeds = _setup(tiny_llama, "kl")
    options = session.session_options()
    assert session.use_shared_arena(options) and session.use_shared_arena(session.session_options())
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    ev = cut.evaluator(model, layers, feeds, "kl")
    assert isinstance(ev, cut.CutEvaluator)
    layer = layers[-1]
    replaced = {layer.value.name: _quantized(layer)}
    assert ev.error(replaced) == pytest.approx(sens.Evaluator(model, layers, feeds, metric="kl").error(replaced), rel=1e-4)

"""Runs segment by segment (graphc.core.streaming): the same outputs, sums and written bytes as
the whole-model session, with one segment's weights loaded at a time."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphc
from graphc.checks.validate import make_session, synthesize_inputs
from graphc.core import ort_large, streaming
from graphc.core.calibrate import input_moments
from graphc.core.io import load_model
from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama

SEGMENT = 40_000  # bytes of weights: a tiny Llama layer is ~100 kB, so each layer is cut in pieces


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    write_synthetic_llama(path, PRESETS["tiny"])
    return path


def _feeds(model, count=3):
    return synthesize_inputs(model, count=count, seed=0)


def test_cuts_fall_where_few_values_cross_and_cover_every_node_once(tiny):
    model = load_model(tiny)
    runner = streaming.StreamedModel(model, segment_bytes=SEGMENT)
    assert len(runner.segments) >= 6
    graph = runner.proto.graph
    own = [i for seg in runner.segments for i in range(seg.start, seg.stop)]
    assert own == list(range(len(graph.node)))  # consecutive, no gap, no overlap
    for seg in runner.segments:
        # what crosses a cut: the residual stream (and the projections' shared inputs), never a weight
        assert 1 <= len(seg.reads) <= 3, seg
        assert not set(seg.reads) & {t.name for t in graph.initializer}
        sizes = sum(runner.arrays[w].nbytes if w in runner.arrays else 0 for w in seg.weights)
        assert sizes <= SEGMENT * 2


def test_streamed_outputs_equal_the_whole_session(tiny):
    model = load_model(tiny)
    feeds = _feeds(model)
    ref = [make_session(model).run(None, f) for f in feeds]
    got = streaming.StreamedModel(model, segment_bytes=SEGMENT).run(feeds)
    for r, g in zip(ref, got):
        for a, b in zip(r, g):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_activations_past_the_bound_go_to_a_temporary_folder_and_are_removed(tiny, monkeypatch):
    model = load_model(tiny)
    feeds = _feeds(model)
    made = []
    original = streaming.ActivationCache.put

    def put(self, i, name, array):
        original(self, i, name, array)
        made.append(self._folder.name if self._folder is not None else None)

    monkeypatch.setattr(streaming.ActivationCache, "put", put)
    ref = streaming.StreamedModel(model, segment_bytes=SEGMENT).run(feeds)
    with streaming.streaming("always", cache_bytes=1):
        got = streaming.StreamedModel(model, segment_bytes=SEGMENT).run(feeds)
    folders = {f for f in made if f is not None}
    assert len(folders) == 1  # the second run spilled
    assert not os.path.exists(folders.pop())
    for r, g in zip(ref, got):
        for a, b in zip(r, g):
            np.testing.assert_array_equal(a, b)


def test_each_session_holds_one_segment_of_weights(tiny, monkeypatch):
    """Bounded memory, structurally: the weights handed to any one session stay within a segment."""
    model = load_model(tiny)
    monkeypatch.setattr(ort_large, "MIN_EXTERNAL", 1)  # every weight is supplied beside the bytes
    held = []
    real = ort_large.session_from_proto

    def recording(proto, arrays, **kw):
        held.append(sum(a.nbytes for a in arrays.values()))
        return real(proto, arrays, **kw)

    monkeypatch.setattr(ort_large, "session_from_proto", recording)
    streaming.StreamedModel(model, segment_bytes=SEGMENT).run(_feeds(model, 1))
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    largest = max(v.const_value.nbytes for v in model.graph.initializers.values())
    assert len(held) >= 6
    assert max(held) <= SEGMENT + largest < total / 2


def test_moments_equal_the_whole_model_sweep(tiny):
    model = load_model(tiny)
    feeds = _feeds(model)
    values = [n.inputs[0] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    with streaming.streaming("never"):
        whole = input_moments(model, values, feeds, pass_name="t")
    with streaming.streaming("always", segment_bytes=SEGMENT):
        streamed = input_moments(model, values, feeds, pass_name="t")
    assert whole.keys() == streamed.keys() and len(whole) >= 5
    for name in whole:
        assert whole[name].tokens == streamed[name].tokens
        np.testing.assert_allclose(streamed[name].gram, whole[name].gram, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(streamed[name].abs_mean, whole[name].abs_mean, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_compress_writes_the_same_bytes_streamed(tiny, tmp_path, recipe):
    """Calibration (GPTQ Hessians, AWQ, the probes' held-out sums), the reference run and
    validation all stream; the written file is the whole-model run's, byte for byte."""
    results = {}
    for mode in ("never", "always"):
        with streaming.streaming(mode, segment_bytes=SEGMENT):
            r = graphc.compress(tiny, tmp_path / f"{mode}.onnx", recipe=recipe, attribution=False)
        results[mode] = r
    assert (tmp_path / "never.onnx").read_bytes() == (tmp_path / "always.onnx").read_bytes()
    a, b = results["never"].validation, results["always"].validation
    assert a.output_cosine == pytest.approx(b.output_cosine, abs=1e-6)
    assert a.max_abs == pytest.approx(b.max_abs, rel=1e-4, abs=1e-6)


def test_weights_decoded_at_load_are_recomputed_in_each_segment(tiny, tmp_path):
    """An int4 model's scales are computed from constants (log8 codes): ONNX Runtime folds them
    at load. Handed over a cut as a segment input they would not be constants; each segment
    that reads them recomputes them instead, and the outputs stay the whole model's."""
    out = tmp_path / "q.onnx"
    graphc.compress(tiny, out, recipe="int4", attribution=False)
    model = load_model(out)
    runner = streaming.StreamedModel(model, segment_bytes=SEGMENT)
    graph = runner.proto.graph
    made_by = {o: n for n in graph.node for o in n.output}
    for seg in runner.segments:
        for name in seg.reads:
            assert name not in made_by or made_by[name].input, name
    feeds = _feeds(model, 2)
    ref = [make_session(model).run(None, f) for f in feeds]
    for r, g in zip(ref, runner.run(feeds)):
        np.testing.assert_allclose(r[0], g[0], rtol=1e-5, atol=1e-6)


def test_nodes_out_of_order_are_not_streamed():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["t"], ["y"]), onnx.helper.make_node("Neg", ["x"], ["t"])],
                                   "g", [x], [y])
    with pytest.raises(streaming.NotStreamable, match="before it is made"):
        streaming.plan_segments(graph, {}, 1)


def test_an_unknown_mode_is_refused():
    with pytest.raises(graphc.GraphcError, match="supported: auto, always, never"):
        with streaming.streaming("sometimes"):
            pass


def test_auto_streams_only_large_models(tiny, monkeypatch):
    model = load_model(tiny)
    assert not streaming.applies(model)
    monkeypatch.setattr(streaming, "AUTO_BYTES", 1000)
    assert streaming.applies(model)
    with streaming.streaming("never"):
        assert not streaming.applies(model)


def test_cli_stream_option(tiny, tmp_path):
    from graphc.front.cli import main

    assert main(["compress", str(tiny), "-o", str(tmp_path / "q.onnx"), "--recipe", "int8", "--stream", "always",
                 "--no-progress"]) == 0
    assert ir.load(tmp_path / "q.onnx").graph is not None


def _probe_items(layers, configs, method="rtn", hessians=None):
    from graphc.passes import _probes, _siblings

    hessians = hessians or {}
    return [_probes.ProbeItem(layer.value.name, layer.transposed, method, tuple(configs), tuple(configs),
                              hessians.get(layer.value.name),
                              layer.member_keys if isinstance(layer, _siblings.Siblings) else ())
            for layer in layers]


@pytest.mark.parametrize("metric,siblings", [("kl", False), ("cosine", False), ("kl", True)])
def test_streamed_probes_measure_what_the_whole_model_session_measures(tiny, metric, siblings):
    """Each probe starts at its layer's segment from the reference's values and runs to the end;
    the errors are the whole-model session's (same numbers: the arithmetic is node for node).
    ``siblings``: Q/K/V and gate/up probed as groups (every member replaced)."""
    from graphc.passes import _probes, _siblings, _streamed_probes
    from graphc.passes import _sensitivity as sens

    model = load_model(tiny)
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=32, exclude=())
    units = _siblings.group(layers) if siblings else layers
    assert any(isinstance(u, _siblings.Siblings) for u in units) == siblings
    feeds = _feeds(model, 2)
    configs = (sens.QuantConfig(4, 32), sens.QuantConfig(2, 32))
    items = _probe_items(units, configs)
    with streaming.streaming("always", segment_bytes=SEGMENT):
        streamed = _streamed_probes.probe_results(model, items, feeds, metric, symmetric=False, scale_dtype="float16",
                                                  damp=0.01)
    evaluator = sens.Evaluator(model, layers, feeds, metric=metric)
    shared = _probes.ProbeShared(f"streaming-{metric}-{siblings}", evaluator.payload())  # one key per evaluator
    assert len(streamed) == len(units) >= 6
    for item, got in zip(items, streamed):
        want = _probes.probe_layer(shared, item)
        for c in configs:
            assert got.measured[c] == pytest.approx(want.measured[c], rel=1e-4, abs=1e-9), (item.weight, c)
        assert got.weight_error == want.weight_error


def test_each_probe_lets_its_outputs_go_when_it_finishes(tiny, monkeypatch):
    """A probe's error is taken as soon as its outputs are made, and its values dropped: the
    outputs of at most one probe (besides the reference's) are held at any time, however many
    probes run (they all used to wait for the last one, ~1 GB of logits on a 2.3 GB Llama)."""
    from graphc.passes import _streamed_probes
    from graphc.passes import _sensitivity as sens

    model = load_model(tiny)
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=32, exclude=())
    items = _probe_items(layers, (sens.QuantConfig(4, 32), sens.QuantConfig(2, 32)))
    outputs = {o.name for o in model.graph.outputs}
    holding: set[int] = set()
    most = [0]
    put, drop = streaming.ActivationCache.put, streaming.ActivationCache.drop

    def tracked_put(self, i, name, array):
        put(self, i, name, array)
        if name in outputs:
            holding.add(i)
            most[0] = max(most[0], len(holding))

    def tracked_drop(self, i, name):
        drop(self, i, name)
        if name in outputs:
            holding.discard(i)

    monkeypatch.setattr(streaming.ActivationCache, "put", tracked_put)
    monkeypatch.setattr(streaming.ActivationCache, "drop", tracked_drop)
    feeds = _feeds(model, 1)
    with streaming.streaming("always", segment_bytes=SEGMENT):
        results = _streamed_probes.probe_results(model, items, feeds, "kl", symmetric=False, scale_dtype="float16",
                                                 damp=0.01)
    assert len(results) == len(items) >= 6 and all(r.measured for r in results)
    assert 1 <= most[0] <= 2  # the reference's row and the probe being finished


def test_a_tied_table_is_replaced_at_the_lookup_and_at_the_head():
    from graphc.passes.mixed_precision import MixedPrecision
    from tests.passes.test_mixed_precision import _tied

    stats = {}
    for mode in ("never", "always"):
        model, ctx = _tied()
        with streaming.streaming(mode, segment_bytes=1):  # the lookup and the head in different segments
            result = MixedPrecision(MixedPrecision.Options(max_bits=8.5, bits=(2, 4), block_sizes=(32,)), ctx)(model)
        stats[mode] = result.stats.to_dict()
    assert stats["always"].get("probe_streamed") == 1 and "probe_streamed" not in stats["never"]
    errors = {mode: [r["error"] for r in s["sensitivities"]] for mode, s in stats.items()}
    assert errors["always"] == pytest.approx(errors["never"], rel=1e-5)
    assert min(errors["always"]) > 0  # the table was replaced (in both places: see the next line)
    assert stats["always"]["choices"] == stats["never"]["choices"]


def test_new_large_weights_of_a_streamed_model_live_in_a_temporary_file(tiny, tmp_path, monkeypatch):
    """awq-scale rewrites every projection of a decoder: on a model that streams the new arrays
    go to the run's temporary weights file, not memory; the written model is the same."""
    from graphc.core import scratch

    monkeypatch.setattr(scratch, "MIN_BYTES", 1024)
    results = {}
    for mode in ("never", "always"):
        with streaming.streaming(mode, segment_bytes=SEGMENT):
            results[mode] = graphc.compress(tiny, tmp_path / f"{mode}.onnx", recipe="int4", attribution=False)
    assert results["never"].scratch is None
    store = results["always"].scratch
    assert store.count >= 4  # awq's scaled projections
    assert (tmp_path / "never.onnx").read_bytes() == (tmp_path / "always.onnx").read_bytes()
    folder = store._dir.name
    assert os.path.isdir(folder)
    del results, store
    import gc

    gc.collect()
    assert not os.path.exists(folder)  # removed with the result


def test_attribution_of_a_streamed_model_names_the_same_layers(tiny, tmp_path):
    found = {}
    for mode in ("never", "always"):
        with streaming.streaming(mode, segment_bytes=SEGMENT, cache_bytes=1 if mode == "always" else None):
            r = graphc.compress(tiny, tmp_path / f"{mode}.onnx", recipe="int8")
        found[mode] = r.attribution
    a, b = found["never"], found["always"]
    assert a.worst_layer == b.worst_layer and len(a.tensors) == len(b.tensors) >= 10
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name
        assert x.cosine == pytest.approx(y.cosine, abs=1e-6)


def test_a_streamed_run_says_so(tiny, tmp_path):
    with streaming.streaming("always", segment_bytes=SEGMENT):
        r = graphc.compress(tiny, tmp_path / "q.onnx", recipe="int8", attribution=False)
    assert any("segment by segment" in n for n in r.notices)
    with streaming.streaming("never"):
        r = graphc.compress(tiny, tmp_path / "p.onnx", recipe="int8", attribution=False)
    assert not any("segment by segment" in n for n in r.notices)


@pytest.mark.parametrize("metric", ["kl", "cosine"])
def test_probes_started_from_written_cut_values_equal_the_one_process_run(tiny, metric):
    """The form workers run: the reference's values at each cut written to a folder once, the
    items grouped by the segment their probes start in, each group run from those values with
    its Hessians read from .npy files. Every number equals the one-process lockstep run's
    (GPTQ probes, one Hessian per input shared by the layers reading it)."""
    from graphc.core.executor import LocalExecutor
    from graphc.passes import _sensitivity as sens
    from graphc.passes import _streamed_probes

    model = load_model(tiny)
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=False, min_rows=1, min_cols=32, exclude=())
    feeds = _feeds(model, 2)
    inputs = {layer.value.name: layer.nodes[0].inputs[0].name for layer in layers}
    rng = np.random.default_rng(0)
    grams = {}
    for name in sorted(set(inputs.values())):
        cols = next(layer.shape[1] for layer in layers if inputs[layer.value.name] == name)
        x = rng.standard_normal((64, cols))
        grams[name] = x.T @ x / 64
    configs = (sens.QuantConfig(4, 32), sens.QuantConfig(2, 32))
    items = _probe_items(layers, configs, method="gptq")
    hessian = lambda i: grams[inputs[items[i].weight]]  # noqa: E731
    saved = []

    class Recording(LocalExecutor):
        def map(self, fn, chunks, **kw):
            chunks = list(chunks)
            saved.append(chunks)
            return super().map(fn, chunks, **kw)

    reported = []
    with streaming.streaming("always", segment_bytes=SEGMENT):
        one = _streamed_probes.probe_results(model, items, feeds, metric, symmetric=False, scale_dtype="float16",
                                             damp=0.01, hessian=hessian)
        spread = _streamed_probes.probe_on_workers(model, items, feeds, metric, Recording(), symmetric=False,
                                                   scale_dtype="float16", damp=0.01, hessian=hessian,
                                                   hessian_key=lambda i: inputs[items[i].weight],
                                                   report=reported.append)
    assert len(one) == len(spread) == len(items) >= 6
    for a, b in zip(one, spread):
        assert a.measured == b.measured and a.weight_error == b.weight_error
    assert max(a.measured[configs[1]] for a in one) > 0
    (chunks,) = saved
    assert len(chunks) >= 3 and sum(len(c.items) for c in chunks) == len(items)
    files = {f for c in chunks for f in c.hessians}
    assert len(files) == len(grams) and not any(os.path.exists(f) for f in files)  # one per input, removed
    assert reported[-1] == 2 * len(items) and reported == sorted(reported)


def test_streamed_probes_stay_in_the_driver_on_a_multi_node_cluster():
    """Workers on other machines cannot read this machine's weight and cut files: the probes run
    here, segment by segment, and a notice says why."""
    import dataclasses

    from graphc.passes.mixed_precision import MixedPrecision
    from tests.passes.test_mixed_precision import _tied

    class TwoNodes:
        workers, threads_per_item, single_node = 2, 1, False

        def map(self, fn, items, **kw):
            raise AssertionError("nothing may be sent to workers")

    model, ctx = _tied()
    ctx = dataclasses.replace(ctx, executor=TwoNodes())
    with streaming.streaming("always", segment_bytes=1):
        stats = MixedPrecision(MixedPrecision.Options(max_bits=8.5, bits=(2, 4), block_sizes=(32,)), ctx)(model).stats
    assert stats.counts["probe_streamed"] == 1 and stats.counts["probe_workers"] == 1
    (notice,) = stats.details["notices"]
    assert "several nodes" in notice and "\n" not in notice


def test_a_worker_rebuilds_the_model_from_its_files_and_refuses_a_missing_one(tmp_path):
    """What reaches a worker: the protobuf without weights, each external weight's file, offset
    and length (absolute, whatever the worker's directory), in-memory weights as arrays or inside
    the protobuf (a pass's rewritten weight here)."""
    from graphc.core.errors import DistributedError
    from graphc.passes import _streamed_probes

    path = tmp_path / "ext.onnx"
    write_synthetic_llama(path, PRESETS["tiny"])
    onnx.save(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=1024)
    model = load_model(path)
    name = next(n for n, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor))
    fresh = model.graph.initializers[name].const_value.numpy() * 2  # as a pass's rewritten weight
    model.graph.initializers[name].const_value = ir.tensor(fresh, name=name)
    parts = _streamed_probes.model_parts(model)
    assert parts.files and all(os.path.isabs(f) for f, _, _ in parts.files.values()) and name not in parts.files
    again = _streamed_probes.rebuild(parts)
    for key, value in model.graph.initializers.items():
        np.testing.assert_array_equal(again.graph.initializers[key].const_value.numpy(), value.const_value.numpy())
    os.rename(tmp_path / "w.bin", tmp_path / "moved.bin")
    with pytest.raises(DistributedError, match=r"cannot read the weights file .*w\.bin.*shared") as info:
        _streamed_probes.rebuild(parts)
    assert "\n" not in str(info.value)

"""``mixed-precision``'s sensitivity probes on a model that streams (graphc.core.streaming).

A probe is the model's output with one weight quantized. The whole-model path
(``_sensitivity.Evaluator``) runs every probe through one ONNX Runtime session that holds every
weight; here the model goes segment by segment, and all probes move through it together:

- the float reference runs through segment ``j``; its values at the next cut are kept;
- a probe whose weight is first read in segment ``j`` starts there, from the reference's values
  at that cut (everything before is the float model's, exactly): its weight is quantized (GPTQ
  with the layer's Hessian, as the whole-model path does) and replaces the float one in every
  segment that reads it (a tied table: the lookup and the LM head);
- probes that started earlier run segment ``j`` from their own values.

So a probe runs only the segments from its layer to the end (the layers before it are the
reference's, computed once: on a decoder about half the work of a whole-model probe), one
segment's weights are loaded at a time, and a quantized weight lives only while the segments
that read it run (it is recomputed, deterministically, for a table read again at the end). The
values kept between cuts (the reference's and each running probe's) go through one
:class:`~graphc.core.streaming.ActivationCache`, spilled to a temporary folder past its bound.
The error of each probe is the whole-model path's metric on the final outputs.

With workers (:func:`probe_on_workers`: ``--workers``/``--ray`` on one machine), the reference
runs once here and its values entering each segment are written to a temporary folder
(:func:`reference_cuts`); items whose probes start in one segment form work items (split so that
each worker gets several), each running the same lockstep from that segment on, starting from
the written values: the same
sessions over the same values, so the same numbers. Workers map the weights from their files
(the input's external data, or the run's temporary weights file) and read the Hessians from .npy
files, so nothing the size of the model crosses the wire.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.core import freed, streaming, tempdirs
from graphc.core.io import tensor_bytes
from graphc.core.errors import GraphcError
from graphc.passes import _blockquant as bq
from graphc.passes import _probes
from graphc.passes import _sensitivity as sens


def probe_results(model: ir.Model, items: Sequence[_probes.ProbeItem], feeds: Sequence[dict], metric: str, *,
                  symmetric: bool, scale_dtype: str, damp: float,
                  hessian: Callable[[int], np.ndarray | None] | None = None,
                  report: Callable[[int, int], None] | None = None,
                  cuts: CutValues | None = None, threads: int | None = None,
                  switchable: Sequence[str] | None = None) -> list[_probes.ProbeResult]:
    """The :class:`~graphc.passes._probes.ProbeResult` of every item (one layer's probes), as
    :func:`_probes.probe_layer` computes them, with the model run segment by segment.
    ``hessian(i)``: item ``i``'s Hessian when the items carry none (read once, when its layer
    is reached, and let go: a large model's Hessians do not fit in memory together).
    ``cuts``: the reference's values written by :func:`reference_cuts` (for the same model and
    a list of items this one is part of): the probes start from them and the reference is not
    run again (a worker's share of the probes); segments before the first probe are skipped.
    ``switchable``: the weights given to the sessions as inputs (default: these items'); with
    ``cuts``, those the reference ran with (every item's), so that the cuts fall where they fell. ``threads``: ONNX Runtime threads
    per session (None: its default)."""
    hessian_of = hessian or (lambda i: items[i].hessian)
    kw = {"symmetric": symmetric, "scale_dtype": scale_dtype}
    weight_errors: dict[int, dict] = {}

    held: dict[int, np.ndarray | None] = {}  # the last item's Hessian (its probes run one after another)

    def quantize_item(i: int, configs: Sequence[sens.QuantConfig]) -> dict:
        """Item ``i``'s weight(s) at each config ({name: dequantized, stored orientation and
        dtype}); its candidates' weight errors on first call."""
        item = items[i]
        view = _probes.item_view(item, runner.arrays)
        flat = _probes.Oriented(False)
        if i not in held:
            held.clear()  # one Hessian at a time
            held[i] = hessian_of(i)
        h = held[i]
        out = {}
        for c in configs:
            deq = sens.quantize_view(flat, view, c, method=bq.Method(item.method), hessian=h, damp=damp, **kw)[1]
            out[c] = {name: q.astype(runner.arrays[name].dtype, copy=False)
                      for name, q in _probes.item_stored(item, runner.arrays, deq).items()}
        if i not in weight_errors:
            weight_errors[i] = sens.candidate_errors(view, item.candidates, h, tokens=item.tokens, **kw)
        return out

    runner = _runner(model, items, threads, switchable)
    model_bytes = tensor_bytes(model)
    outputs = sens.measured_outputs(runner.outputs, metric)
    out_index = [runner.outputs.index(n) for n in outputs]
    inputs = set(runner.inputs)
    feeds = [{k: v for k, v in feed.items() if k in inputs} for feed in feeds]
    masks = [feed.get("attention_mask") for feed in feeds]
    segments = runner.segments
    if cuts is not None and cuts.bounds != tuple((seg.start, seg.stop) for seg in segments):
        raise GraphcError("internal: the probes' segments are not those the reference's cut values were taken on")
    reads_item = _item_starts(runner, items)
    # the probes: (item index, config); each starts at the first segment reading its weight
    probes = [(i, c) for i, item in enumerate(items) for c in item.probes]
    start = {p: (reads_item[p[0]] or [len(segments)])[0] for p in probes}
    lockstep = cuts is None  # the reference runs here, as one more stream, last in each segment
    streams = ["ref", *probes] if lockstep else probes
    index = {s: n for n, s in enumerate(streams)}
    cache = streaming.ActivationCache(len(streams) * len(feeds), streaming.policy().cache_bytes)
    slot = lambda s, i: index[s] * len(feeds) + i  # noqa: E731 - one row of the cache per (stream, feed)

    def ref_value(k: int, i: int, name: str) -> np.ndarray:
        """The reference's value ``name`` entering segment ``k`` (feed ``i``)."""
        return cache.get(slot("ref", i), name) if lockstep else cuts.get(k, i, name)

    def ref_names(k: int, i: int) -> list[str]:
        return list(cache.values[slot("ref", i)]) if lockstep else list(cuts.names[k][i])

    measured: dict[tuple, float] = {}
    total_runs = sum(len(segments) - start[p] for p in probes) + (len(segments) if lockstep else 0)
    done = 0
    out_names = [runner.outputs[j] for j in out_index]
    reference: list | None = None  # per feed: the reference's measured outputs (SoftmaxRef for kl)

    def reference_of(outs: list[np.ndarray], mask: np.ndarray | None) -> list:
        return [sens.SoftmaxRef(sens._rows(r, mask)) for r in outs] if metric == "kl" else outs

    if not lockstep:  # a worker's share: the reference's outputs were written with its cut values
        reference = [reference_of([cuts.output(i, n) for n in out_names], masks[i]) for i in range(len(feeds))]

    def keep_only(row: int, names: set[str]) -> None:
        for name in list(cache.values[row]):
            if name not in names:
                cache.drop(row, name)

    def finish(stream: tuple) -> None:
        """A probe whose outputs are all made: its error now, and its values let go (kept until
        every probe had finished, 72 probes' logits of a 2.3 GB Llama held ~1 GB)."""
        errs = []
        for i in range(len(feeds)):
            row = slot(stream, i)
            got = [np.asarray(cache.get(row, n)) for n in out_names]
            errs += sens.feed_errors(metric, got, reference[i], masks[i])
            keep_only(row, set())
        measured[stream] = float(np.concatenate(errs).mean()) if errs else 0.0

    try:
        for k, seg in enumerate(segments):
            running = [p for p in probes if start[p] <= k and p not in measured]
            if not lockstep and not running:
                continue
            later = runner.needed_after(k, outputs=False) | set(outputs)  # a KV cache's presents are not measured
            fetch = [n for n in seg.keeps if n in later]
            if not fetch:
                continue
            part = runner.segment_session(k, fetch, lambda name: ref_value(k, 0, name))
            # the reference first; its values entering this segment are let go only after every
            # probe starting here has read them
            for stream in [*(["ref"] if lockstep else []), *running]:
                starts_here = stream != "ref" and start[stream] == k
                replaced = None  # one quantized weight at a time, made when its stream runs a segment reading it
                if stream != "ref" and k in reads_item[stream[0]]:
                    replaced = quantize_item(stream[0], [stream[1]])[stream[1]]
                for i, feed in enumerate(feeds):
                    if starts_here:
                        value = lambda name, i=i: ref_value(k, i, name)  # noqa: E731
                    else:
                        value = lambda name, s=stream, i=i: cache.get(slot(s, i), name)  # noqa: E731
                    got = runner.step(part, feed, value, replaced)
                    row = slot(stream, i)
                    if starts_here:  # a probe starting here: what passes this segment by is the reference's
                        for name in [n for n in ref_names(k, i) if n in later and n not in fetch]:
                            cache.put(row, name, ref_value(k, i, name))
                    for name, value in zip(fetch, got):
                        cache.put(row, name, value)
                    if stream != "ref":
                        keep_only(row, later)
                done += 1
                if report is not None:
                    report(done, total_runs)
                if stream == "ref" and reference is None and all(n in cache.values[slot("ref", 0)] for n in out_names):
                    reference = [reference_of([np.asarray(cache.get(slot("ref", i), n)) for n in out_names], masks[i])
                                 for i in range(len(feeds))]
                if stream != "ref" and all(n in cache.values[slot(stream, 0)] for n in out_names):
                    finish(stream)
            if lockstep:
                for i in range(len(feeds)):
                    keep_only(slot("ref", i), later)
            del part, replaced
            held.clear()
            runner.release(k)
            freed.release(model_bytes)  # a segment's quantized weights and values, back to the system
        for p in probes:
            if start[p] == len(segments):  # a weight no node reads: quantizing it changes nothing
                measured[p] = 0.0
            elif p not in measured:
                raise GraphcError(f"internal: probe of item {p[0]} did not reach the model's outputs")
        if report is not None and done < total_runs:  # probes whose measured outputs were made early
            report(total_runs, total_runs)
    finally:
        cache.close()
    for i in range(len(items)):
        if i not in weight_errors:  # a weight no segment reads
            quantize_item(i, [])
    return [_probes.ProbeResult({c: measured[(i, c)] for c in item.probes}, weight_errors[i])
            for i, item in enumerate(items)]


def _runner(model: ir.Model, items: Sequence[_probes.ProbeItem], threads: int | None = None,
            switchable: Sequence[str] | None = None) -> streaming.StreamedModel:
    """The model cut as every probe run of these items cuts it (the probed weights switchable,
    or ``switchable``: which weights are session inputs decides which values are constants, and
    so where the cuts fall and what crosses them)."""
    names = list(switchable) if switchable is not None else [name for item in items for name in item.names]
    return streaming.StreamedModel(model, switchable=names, what="model during sensitivity measurement",
                                   threads=threads)


def _item_starts(runner: streaming.StreamedModel, items: Sequence[_probes.ProbeItem]) -> list[list[int]]:
    """The segments reading each item's weights (a probe starts at the first)."""
    reads_weight = {name: [k for k, seg in enumerate(runner.segments) if name in seg.weights]
                    for item in items for name in item.names}
    return [sorted({k for name in item.names for k in reads_weight[name]}) for item in items]


@dataclass(frozen=True)
class CutValues:
    """The float reference's values where each segment starts, and its outputs, as .npy files in
    ``folder`` (a folder every worker reads: a probe run elsewhere starts from them)."""

    folder: str
    names: dict[int, tuple[tuple[str, ...], ...]]  # segment -> per feed, the values entering it
    outputs: tuple[str, ...]  # the measured outputs
    bounds: tuple[tuple[int, int], ...] = ()  # each segment's node range, checked by whoever reads them

    def get(self, k: int, i: int, name: str) -> np.ndarray:
        """Value ``name`` entering segment ``k``, feed ``i`` (files are numbered as ``names`` lists them)."""
        return np.load(os.path.join(self.folder, str(k), str(i), f"{self.names[k][i].index(name)}.npy"))

    def output(self, i: int, name: str) -> np.ndarray:
        return np.load(os.path.join(self.folder, "out", str(i), f"{self.outputs.index(name)}.npy"))


def reference_cuts(model: ir.Model, items: Sequence[_probes.ProbeItem], feeds: Sequence[dict], metric: str,
                   folder: str, *, report: Callable[[int, int], None] | None = None) -> tuple[CutValues, list[int]]:
    """The float reference run once, segment by segment, its values at every cut from the
    first a probe of ``items`` starts at kept in ``folder`` (:class:`CutValues`); and each item's
    start segment. What :func:`probe_results` computes as its ``ref`` stream, written down so that
    probes can start from it in other processes."""
    runner = _runner(model, items)
    reads_item = _item_starts(runner, items)
    segments = runner.segments
    first = min([r[0] for r in reads_item if r] or [len(segments)])
    outputs = sens.measured_outputs(runner.outputs, metric)
    names: dict[int, tuple[tuple[str, ...], ...]] = {}

    def dump(where: str, i: int, listed: Sequence[str], value: Callable[[str], np.ndarray]) -> None:
        os.makedirs(os.path.join(folder, where, str(i)), exist_ok=True)
        with tempdirs.writing("the reference's values at the probes' cuts", folder):
            for n, name in enumerate(listed):
                np.save(os.path.join(folder, where, str(i), f"{n}.npy"), np.asarray(value(name)))

    def entering(k: int, cache: streaming.ActivationCache) -> None:
        if k >= first:
            names[k] = tuple(tuple(cache.values[i]) for i in range(len(feeds)))
            for i in range(len(feeds)):
                dump(str(k), i, names[k][i], lambda name, i=i: cache.get(i, name))

    got = runner.run(feeds, outputs=outputs, at_segment=entering, progress=report)
    for i, values in enumerate(got):
        dump("out", i, outputs, dict(zip(outputs, values)).__getitem__)
    starts = [(r or [len(segments)])[0] for r in reads_item]
    return CutValues(folder, names, tuple(outputs), tuple((seg.start, seg.stop) for seg in segments)), starts


# ---------------------------------------------------------------------------- on workers
@dataclass(frozen=True)
class ModelParts:
    """A model that workers rebuild without its weights crossing the wire: the protobuf with
    placeholder weights, the file, offset and length of each weight kept as external data (the
    input's own, or a run's temporary weights file: on a filesystem the workers share), and the
    arrays of the few large weights that live in memory."""

    proto: bytes
    files: dict[str, tuple[str, int, int]]
    arrays: dict[str, np.ndarray]


def model_parts(model: ir.Model) -> ModelParts:
    from graphc.core.ort_large import weightless_proto

    proto, arrays = weightless_proto(model)
    files, kept = {}, {}
    for name, array in arrays.items():
        tensor = model.graph.initializers[name].const_value
        if isinstance(tensor, ir.ExternalTensor):
            files[name] = (os.path.abspath(os.path.join(str(tensor.base_dir), str(tensor.location))),  # any cwd
                           int(tensor.offset or 0),
                           int(tensor.length if tensor.length is not None else tensor.nbytes))
        else:
            kept[name] = np.asarray(array)
    return ModelParts(proto.SerializeToString(), files, kept)


def rebuild(parts: ModelParts) -> ir.Model:
    """The model of :func:`model_parts`, its external weights mapped from their files."""
    import onnx

    from graphc.core.errors import DistributedError

    model = ir.serde.deserialize_model(onnx.load_from_string(parts.proto))
    for name, value in model.graph.initializers.items():
        old = value.const_value
        if name in parts.files:
            path, offset, length = parts.files[name]
            if not os.path.isfile(path):
                raise DistributedError(f"a worker cannot read the weights file {path}: probes of a streamed model "
                                       "on workers need a filesystem shared with this machine")
            value.const_value = ir.ExternalTensor(os.path.basename(path), offset, length, old.dtype, shape=old.shape,
                                                  name=name, base_dir=os.path.dirname(path))
        elif name in parts.arrays:
            value.const_value = ir.tensor(parts.arrays[name], dtype=old.dtype, name=name)
    return model


@dataclass(frozen=True)
class StreamedShared:
    """What every worker's share of the probes reads (sent once per worker)."""

    key: str
    parts: ModelParts
    feeds: tuple[dict, ...]
    metric: str
    cuts: CutValues
    switchable: tuple[str, ...]  # every item's weights, as the reference was run with
    policy: streaming.Policy  # the driver's segment and cache bounds (a worker has its own defaults)
    symmetric: bool
    scale_dtype: str
    damp: float
    threads: int | None = None


@dataclass(frozen=True)
class Chunk:
    """The items whose probes start in one segment, and their Hessians' files (None: no Hessian)."""

    items: tuple[_probes.ProbeItem, ...]
    hessians: tuple[str | None, ...]


def _chunks(items: Sequence[_probes.ProbeItem], starts: Sequence[int], segments: int, workers: int) -> list[list[int]]:
    """Item indices in work items: those starting in one segment together (they share the
    segments' sessions), a start's items split where their runs (probes x segments to the end)
    pass a quarter of a worker's share, so that every worker gets several; the longest first."""
    cost = [len(item.probes) * max(segments - s, 1) for item, s in zip(items, starts)]
    target = max(sum(cost) / max(4 * workers, 1), 1)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        groups.setdefault(s, []).append(i)
    chunks: list[list[int]] = []
    for s in sorted(groups):
        current: list[int] = []
        for i in groups[s]:
            if current and sum(cost[j] for j in current) + cost[i] > target:
                chunks.append(current)
                current = []
            current.append(i)
        chunks.append(current)
    return sorted(chunks, key=lambda c: -sum(cost[j] for j in c))  # stable: ties keep segment order


_MODELS: dict[str, ir.Model] = {}  # worker-side: payload key -> rebuilt model (one at a time)


def probe_chunk(shared: StreamedShared, chunk: Chunk) -> list[_probes.ProbeResult]:
    """One chunk's results, as :func:`probe_results` gives them in one process (a work item)."""
    model = _MODELS.get(shared.key)
    if model is None:
        _MODELS.clear()
        model = _MODELS[shared.key] = rebuild(shared.parts)
        sens.KL_THREADS = shared.threads  # the worker's share of the cores, as its ONNX Runtime's
    p = shared.policy
    with streaming.streaming(p.mode, segment_bytes=p.segment_bytes, cache_bytes=p.cache_bytes):
        return probe_results(model, chunk.items, list(shared.feeds), shared.metric, symmetric=shared.symmetric,
                             scale_dtype=shared.scale_dtype, damp=shared.damp, cuts=shared.cuts,
                             threads=shared.threads, switchable=shared.switchable,
                             hessian=lambda i: None if chunk.hessians[i] is None else np.load(chunk.hessians[i]))


def probe_on_workers(model: ir.Model, items: Sequence[_probes.ProbeItem], feeds: Sequence[dict], metric: str,
                     executor: Any, *, symmetric: bool, scale_dtype: str, damp: float,
                     hessian: Callable[[int], np.ndarray | None], hessian_key: Callable[[int], Any],
                     labels: Sequence[str] | None = None,
                     report: Callable[[int], None] | None = None) -> list[_probes.ProbeResult]:
    """:func:`probe_results` with the probes spread over ``executor``'s workers: the reference
    runs once here and its values at each cut go to a temporary folder; items whose probes start
    in one segment form work items (:func:`_chunks`), each run from that cut to the end with one
    segment loaded at a time. The weights reach workers as files (:class:`ModelParts`), each Hessian as a
    .npy file written once per input (``hessian_key``). Every number is the one-process path's:
    a probe runs the same sessions from the same values. ``report(probes done)`` as chunks
    return."""
    import uuid

    with tempdirs.folder("graphc-probes-") as folder:
        cuts, starts = reference_cuts(model, items, feeds, metric, os.path.join(folder, "reference"))
        os.makedirs(os.path.join(folder, "hessians"))
        files: dict[Any, str | None] = {}
        paths: list[str | None] = []
        for i in range(len(items)):
            key = hessian_key(i)
            if key not in files:
                h = hessian(i)
                if h is None:
                    files[key] = None
                else:
                    files[key] = os.path.join(folder, "hessians", f"{len(files)}.npy")
                    with tempdirs.writing("the probes' Hessians", folder):
                        np.save(files[key], h)
                del h
            paths.append(files[key])
        groups = _chunks(items, starts, len(cuts.bounds), executor.workers)
        chunks = [Chunk(tuple(items[i] for i in group), tuple(paths[i] for i in group)) for group in groups]
        shared = StreamedShared(uuid.uuid4().hex, model_parts(model), tuple(feeds), metric, cuts,
                                tuple(name for item in items for name in item.names), streaming.policy(), symmetric,
                                scale_dtype, damp, executor.threads_per_item)
        done = 0

        def arrived(n: int, result: list) -> None:
            nonlocal done
            done += sum(len(item.probes) for item in chunks[n].items)
            if report is not None:
                report(done)

        names = [", ".join(labels[i] for i in group[:2]) + (" ..." if len(group) > 2 else "")
                 for group in groups] if labels is not None else None
        results = executor.map(probe_chunk, chunks, shared=shared, labels=names, on_result=arrived)
    out: list[_probes.ProbeResult | None] = [None] * len(items)
    for group, got in zip(groups, results):
        for i, r in zip(group, got):
            out[i] = r
    return out  # type: ignore[return-value]

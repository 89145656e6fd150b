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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from graphc.core import streaming
from graphc.passes import _blockquant as bq
from graphc.passes import _probes
from graphc.passes import _sensitivity as sens


def probe_results(model: ir.Model, items: Sequence[_probes.ProbeItem], feeds: Sequence[dict], metric: str, *,
                  symmetric: bool, scale_dtype: str, damp: float,
                  hessian: Callable[[int], np.ndarray | None] | None = None,
                  report: Callable[[int, int], None] | None = None) -> list[_probes.ProbeResult]:
    """The :class:`~graphc.passes._probes.ProbeResult` of every item (one layer's probes), as
    :func:`_probes.probe_layer` computes them, with the model run segment by segment.
    ``hessian(i)``: item ``i``'s Hessian when the items carry none (read once, when its layer
    is reached, and let go: a large model's Hessians do not fit in memory together)."""
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
            weight_errors[i] = {c: sens.relative_error(view, sens.quantize_view(flat, view, c, method=bq.Method.RTN,
                                                                                 **kw)[1], h)
                                for c in item.candidates}
        return out

    names = [name for item in items for name in item.names]
    runner = streaming.StreamedModel(model, switchable=names, what="model during sensitivity measurement")
    outputs = sens.measured_outputs(runner.outputs, metric)
    out_index = [runner.outputs.index(n) for n in outputs]
    inputs = set(runner.inputs)
    feeds = [{k: v for k, v in feed.items() if k in inputs} for feed in feeds]
    masks = [feed.get("attention_mask") for feed in feeds]
    segments = runner.segments
    reads_weight = {name: [k for k, seg in enumerate(segments) if name in seg.weights] for name in names}
    reads_item = [sorted({k for name in item.names for k in reads_weight[name]}) for item in items]
    # the probes: (item index, config); each starts at the first segment reading its weight
    probes = [(i, c) for i, item in enumerate(items) for c in item.probes]
    start = {p: (reads_item[p[0]] or [len(segments)])[0] for p in probes}
    streams = ["ref", *probes]
    index = {s: n for n, s in enumerate(streams)}
    cache = streaming.ActivationCache(len(streams) * len(feeds), streaming.policy().cache_bytes)
    slot = lambda s, i: index[s] * len(feeds) + i  # noqa: E731 - one row of the cache per (stream, feed)
    measured: dict[tuple, float] = {}
    total_runs = sum(len(segments) - start[p] for p in probes) + len(segments)
    done = 0
    try:
        for k, seg in enumerate(segments):
            later = runner.needed_after(k, outputs=False) | set(outputs)  # a KV cache's presents are not measured
            fetch = [n for n in seg.keeps if n in later]
            if not fetch:
                continue
            part = runner.segment_session(k, fetch, lambda name: cache.get(slot("ref", 0), name))
            running = [p for p in probes if start[p] <= k]
            for stream in [*running, "ref"]:  # the reference last: probes starting here read its values at this cut
                source = "ref" if stream != "ref" and start[stream] == k else stream
                replaced = None  # one quantized weight at a time, made when its stream runs a segment reading it
                if stream != "ref" and k in reads_item[stream[0]]:
                    replaced = quantize_item(stream[0], [stream[1]])[stream[1]]
                for i, feed in enumerate(feeds):
                    got = runner.step(part, feed, lambda name, s=source, i=i: cache.get(slot(s, i), name), replaced)
                    row = slot(stream, i)
                    if source != stream:  # a probe starting here: what passes this segment by is the reference's
                        for name in [n for n in cache.values[slot(source, i)] if n in later and n not in fetch]:
                            cache.put(row, name, cache.get(slot(source, i), name))
                    for name, value in zip(fetch, got):
                        cache.put(row, name, value)
                    for name in list(cache.values[row]):
                        if name not in later:
                            cache.drop(row, name)
                done += 1
                if report is not None:
                    report(done, total_runs)
            del part, replaced
            held.clear()
            runner.release(k)
        ref_out = [[np.asarray(cache.get(slot("ref", i), runner.outputs[j])) for j in out_index] for i in range(len(feeds))]
        if metric == "kl":
            reference = [[sens.SoftmaxRef(sens._rows(r, mask)) for r in refs] for refs, mask in zip(ref_out, masks)]
        else:
            reference = ref_out
        for p in probes:
            if start[p] == len(segments):  # a weight no node reads: quantizing it changes nothing
                measured[p] = 0.0
                continue
            errs = []
            for i in range(len(feeds)):
                got = [np.asarray(cache.get(slot(p, i), runner.outputs[j])) for j in out_index]
                errs += sens.feed_errors(metric, got, reference[i], masks[i])
            measured[p] = float(np.concatenate(errs).mean()) if errs else 0.0
    finally:
        cache.close()
    for i in range(len(items)):
        if i not in weight_errors:  # a weight no segment reads
            quantize_item(i, [])
    return [_probes.ProbeResult({c: measured[(i, c)] for c in item.probes}, weight_errors[i])
            for i, item in enumerate(items)]


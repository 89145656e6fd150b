"""Sensitivity probes that start at the probed layer, on a model that fits in memory.

A probe is the model's output with one weight replaced (``_sensitivity.Evaluator``: one ONNX
Runtime session over the whole model, every probe a whole forward pass). Everything before the
first node that reads the replaced weight is the float model's, exactly, so it need not be run
again. Here the model is cut as :mod:`graphc.core.streaming` cuts a large one (between nodes,
where the fewest values cross: the residual stream between blocks), into about
:data:`SEGMENTS` segments; the float model runs once segment by segment and its values at
each cut are kept; then one session is built from each cut where a planned weight is first
read to the outputs, and a probe runs that session from the reference's values at its cut.

One session per start, not one per segment: chaining 16 segment sessions per probe cost more
than the work it skipped on SmolLM2-135M (Python hops, and 16 thread pools spinning against
each other), while a session per cut took 0.736x the whole-model time over all 211 of its
probes on the fused graph, alternating probe by probe (``bench/bench_streamed_probes.py
--fused``: the LM head and the KL over 49,152 tokens run in every probe, so about half the
whole pass cannot be skipped). The sessions share one memory arena (the process's, see
``graphc.core.session.use_shared_arena``), without spinning threads: all are kept, and with an
arena each they held 2.6 GB more between probes on SmolLM2.

The errors are the whole-model path's up to float rounding (ONNX Runtime may pick other kernels
for a part of a graph than for the whole: equal on SmolLM2's fused graph, ~1e-6 relative on
its plain export). They are the same numbers
wherever a probe runs: a worker rebuilds the sessions from :meth:`CutEvaluator.payload` and runs
the same arithmetic from the same cut values (the tests compare written bytes).

The interface is ``Evaluator``'s (``weights``, ``error``, ``payload``, ``from_payload``);
:func:`evaluator` picks this form when the graph cuts into at least :data:`MIN_SEGMENTS`
segments, else the whole-model one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.passes import _sensitivity as sens

SEGMENTS = 16  # the model's weights are cut into about this many segments
MIN_SEGMENTS = 3  # fewer: the whole-model evaluator (little to skip, a session per cut to build)
KIND = "cut"  # payload["kind"]
WHAT = "model during sensitivity measurement"


def evaluator(model: ir.Model, layers: Sequence[sens.Layer], feeds: Sequence[dict], metric: str = "cosine",
              *, cut: bool = True) -> Any:
    """A :class:`CutEvaluator` where the model cuts into :data:`MIN_SEGMENTS` or more segments
    (and ``cut``), else a whole-model :class:`~graphc.passes._sensitivity.Evaluator`."""
    if cut:
        from graphc.core import streaming
        from graphc.core.errors import ValidationError

        try:
            return CutEvaluator(model, layers, feeds, metric)
        except (_TooFewSegments, streaming.NotStreamable, ValidationError):  # not cut, or a part ORT would
            pass  # not load or run: the whole-model evaluator measures it, or says what is wrong
    return sens.Evaluator(model, layers, feeds, metric=metric)


class _TooFewSegments(Exception):
    pass


class CutEvaluator:
    """Output error of the model with some weights replaced, each run from the first segment
    reading them (see the module doc). ``metric`` as :class:`~graphc.passes._sensitivity.Evaluator`."""

    def __init__(self, model: ir.Model, layers: Sequence[sens.Layer], feeds: Sequence[dict], metric: str = "cosine"):
        if metric not in sens.METRICS:
            raise ValueError(f"metric={metric!r}; supported: {', '.join(sens.METRICS)}")
        from graphc.core import streaming

        names = [layer.value.name for layer in layers]
        total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        runner = streaming.StreamedModel(model, switchable=names, segment_bytes=max(total // SEGMENTS, 1),
                                         what=WHAT)
        if len(runner.segments) < MIN_SEGMENTS:
            raise _TooFewSegments
        self.metric = metric
        self.outputs = sens.measured_outputs(runner.outputs, metric)
        self.inputs = set(runner.inputs)
        self.weights = {layer.value.name: layer.value.const_value.numpy() for layer in layers}
        self.feeds = [{k: v for k, v in feed.items() if k in self.inputs} for feed in feeds]
        self.masks = [feed.get("attention_mask") for feed in self.feeds]
        # the float model segment by segment: the live values at each cut, and where each weight is first read
        values: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        cuts: list[list[dict[str, np.ndarray]]] = []
        self.first: dict[str, int] = {}
        for k in range(len(runner.segments)):
            cuts.append([dict(v) for v in values])
            later = runner.needed_after(k, outputs=False) | set(self.outputs)
            fetch = [n for n in runner.segments[k].keeps if n in later]
            if not fetch:
                continue
            part = runner.segment_session(k, fetch, lambda name: values[0][name])
            for name in part.switched:
                self.first.setdefault(name, k)
            for i, feed in enumerate(self.feeds):
                values[i].update(zip(fetch, runner.step(part, feed, values[i].__getitem__)))
                for name in [n for n in values[i] if n not in later]:
                    del values[i][name]
            del part
        # one session from each cut where a probe starts to the outputs
        self.starts = sorted({0, *self.first.values()})
        self.cuts = {k: cuts[k] for k in self.starts}
        self.parts: dict[int, dict] = {}
        for k in self.starts:
            proto, arrays, reads, switched = runner.segment_model(runner.suffix(k), self.outputs,
                                                                  lambda name, k=k: cuts[k][0][name])
            self.parts[k] = {"model": np.frombuffer(proto.SerializeToString(), np.uint8), "arrays": arrays,
                             "reads": reads, "switched": switched, "fetch": list(self.outputs)}
        self._sessions = _sessions(self.parts, None)
        self.reference = [self._outputs(0, i, {}) for i in range(len(self.feeds))]
        if self.metric == "kl":  # the reference's distributions, once
            self.reference = [[sens.SoftmaxRef(sens._rows(r, mask)) for r in refs]
                              for refs, mask in zip(self.reference, self.masks)]

    @property
    def start_count(self) -> int:
        """Cuts a probe can start at (the first, and each one before a planned weight's first reader)."""
        return len(self.starts)

    def _outputs(self, k: int, i: int, replaced: dict) -> list[np.ndarray]:
        from graphc.core import streaming

        got = streaming.step(self._sessions[k], self.feeds[i], self.cuts[k][i].__getitem__, self.weights, self.inputs,
                             replaced, what=WHAT)
        return [np.asarray(g) for g in got]

    def start(self, replaced: dict[str, np.ndarray]) -> int | None:
        """The cut a probe replacing these weights starts at (None: no node reads them)."""
        found = [self.first[n] for n in replaced if n in self.first]
        return min(found) if found else None

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """Mean over every output row of every feed of the metric vs the unquantized model."""
        k0 = self.start(replaced)
        if k0 is None:
            return 0.0
        errs = []
        for i, (mask, ref) in enumerate(zip(self.masks, self.reference)):
            errs += sens.feed_errors(self.metric, self._outputs(k0, i, replaced), ref, mask)
        return float(np.concatenate(errs).mean()) if errs else 0.0

    def payload(self) -> dict:
        """Picklable parts for :meth:`from_payload` (numpy arrays travel zero-copy through Ray)."""
        return {"kind": KIND, "metric": self.metric, "outputs": self.outputs, "inputs": sorted(self.inputs),
                "weights": {k: np.asarray(v) for k, v in self.weights.items()}, "feeds": self.feeds,
                "masks": self.masks, "reference": self.reference, "cuts": self.cuts, "parts": self.parts,
                "first": self.first}

    @classmethod
    def from_payload(cls, payload: dict, threads: int | None = None) -> CutEvaluator:
        """The evaluator in another process; ``threads``: ONNX Runtime's intra-op threads."""
        self = cls.__new__(cls)
        self.metric, self.outputs, self.inputs = payload["metric"], payload["outputs"], set(payload["inputs"])
        self.weights, self.feeds, self.masks = payload["weights"], payload["feeds"], payload["masks"]
        self.reference, self.cuts, self.parts = payload["reference"], payload["cuts"], payload["parts"]
        self.first, self.starts = payload["first"], sorted(payload["parts"])
        self._sessions = _sessions(self.parts, threads)
        return self


def _sessions(parts: dict[int, dict], threads: int | None) -> dict:
    """Each start's ORT session: all of them on the process's one shared arena
    (``graphc.core.session.use_shared_arena``; where ORT refuses it, each without an arena: with
    one each they held 2.6 GB more between probes on SmolLM2), without spinning threads."""
    import onnx

    from graphc.core import streaming
    from graphc.core.session import session_options, use_shared_arena

    out = {}
    for k, part in parts.items():
        options = session_options(threads)
        options.enable_cpu_mem_arena = False
        use_shared_arena(options)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = onnx.ModelProto.FromString(part["model"].tobytes())
        session = streaming.load(model, part["arrays"], what=WHAT, where=f"from cut {k}", options=options)
        out[k] = streaming.SegmentSession(session, part["reads"], part["switched"], part["fetch"])
    return out

"""Sensitivity probes that start at the probed layer, on a model that fits in memory.

A probe is the model's output with one weight replaced (``_sensitivity.Evaluator``: one ONNX
Runtime session over the whole model, every probe a whole forward pass). Everything before the
first node that reads the replaced weight is the float model's, exactly, so it need not be run
again: here the model is cut as :mod:`graphc.core.streaming` cuts a large one (between nodes,
where the fewest values cross: the residual stream between blocks), into about
:data:`SEGMENTS` segments, each its own session, all kept. The float reference runs once through
them and its values at every cut are kept; a probe runs from the first segment that reads one
of its replaced weights, starting from the reference's values at that cut. On a decoder that
is about half the work of a whole pass per probe (the LM head runs every time): SmolLM2-135M's
211 probes took 0.69x the whole-model time (``bench/bench_streamed_probes.py``).

The errors are the whole-model path's up to float rounding (ONNX Runtime may pick other kernels
for a segment than for the whole graph; 6e-5 relative on SmolLM2). They are the same numbers
wherever a probe runs: a worker rebuilds the segments' sessions from :meth:`CutEvaluator.payload`
and runs the same arithmetic from the same cut values (the tests compare written bytes).

The interface is ``Evaluator``'s (``weights``, ``error``, ``payload``, ``from_payload``);
:func:`evaluator` picks this form when the graph can be cut into at least
:data:`MIN_SEGMENTS` segments, else the whole-model one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.passes import _sensitivity as sens

SEGMENTS = 16  # the model's weights are cut into about this many segments
MIN_SEGMENTS = 3  # fewer: the whole-model evaluator (little to skip, a session per segment to build)
KIND = "cut"  # payload["kind"]


def evaluator(model: ir.Model, layers: Sequence[sens.Layer], feeds: Sequence[dict], metric: str = "cosine",
              *, cut: bool = True) -> Any:
    """A :class:`CutEvaluator` where the model cuts into :data:`MIN_SEGMENTS` or more segments
    (and ``cut``), else a whole-model :class:`~graphc.passes._sensitivity.Evaluator`."""
    if cut:
        from graphc.core import streaming

        try:
            return CutEvaluator(model, layers, feeds, metric)
        except (_TooFewSegments, streaming.NotStreamable):
            pass
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
                                         what="model during sensitivity measurement")
        if len(runner.segments) < MIN_SEGMENTS:
            raise _TooFewSegments
        self.metric = metric
        self.outputs = sens.measured_outputs(runner.outputs, metric)
        self.inputs = set(runner.inputs)
        self.weights = {layer.value.name: layer.value.const_value.numpy() for layer in layers}
        self.feeds = [{k: v for k, v in feed.items() if k in self.inputs} for feed in feeds]
        self.masks = [feed.get("attention_mask") for feed in self.feeds]
        # the float reference through every segment; the live values at each cut kept
        values: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        self.cuts: list[list[dict[str, np.ndarray]]] = []
        self.parts: list[dict | None] = []
        self._sessions: list[Any] = []
        for k in range(len(runner.segments)):
            self.cuts.append([dict(v) for v in values])
            later = runner.needed_after(k, outputs=False) | set(self.outputs)
            fetch = [n for n in runner.segments[k].keeps if n in later]
            if not fetch:
                self.parts.append(None)
                self._sessions.append(None)
                continue
            proto, arrays, reads, switched = runner.segment_model(k, fetch, lambda name: values[0][name])
            part = {"model": np.frombuffer(proto.SerializeToString(), np.uint8), "arrays": arrays,
                    "reads": reads, "switched": switched, "fetch": fetch}
            self.parts.append(part)
            self._sessions.append(_session(part, None, runner.what, k, len(runner.segments)))
            for i, feed in enumerate(self.feeds):
                values[i].update(zip(fetch, self._step(k, feed, values[i], {})))
                for name in [n for n in values[i] if n not in later]:
                    del values[i][name]
        self.reference = [[np.asarray(feed[o]) if o in self.inputs and o not in v else v[o] for o in self.outputs]
                          for feed, v in zip(self.feeds, values)]
        self.first = _first_reads(self.parts)
        if self.metric == "kl":  # the reference's distributions, once
            self.reference = [[sens.SoftmaxRef(sens._rows(r, mask)) for r in refs]
                              for refs, mask in zip(self.reference, self.masks)]

    @property
    def segments(self) -> int:
        return len(self.parts)

    def _step(self, k: int, feed: dict, values: dict, replaced: dict) -> list[np.ndarray]:
        from graphc.core.interrupt import run_session

        part = self.parts[k]
        given = {n: (feed[n] if n in self.inputs and n not in values else values[n]) for n in part["reads"]}
        for n in part["switched"]:
            given[n] = replaced.get(n, self.weights[n])
        try:
            return run_session(self._sessions[k], given, part["fetch"])
        except Exception as e:  # noqa: BLE001 - ORT's own exception types
            from graphc.core.errors import GraphcError, ValidationError

            if isinstance(e, GraphcError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValidationError(f"ONNX Runtime failed to run the model during sensitivity measurement: "
                                  f"{first}") from None

    def start(self, replaced: dict[str, np.ndarray]) -> int | None:
        """The first segment a probe replacing these weights runs (None: no segment reads them)."""
        found = [self.first[n] for n in replaced if n in self.first]
        return min(found) if found else None

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """Mean over every output row of every feed of the metric vs the unquantized model."""
        k0 = self.start(replaced)
        if k0 is None:
            return 0.0
        errs = []
        for i, (feed, mask, ref) in enumerate(zip(self.feeds, self.masks, self.reference)):
            values = dict(self.cuts[k0][i])
            for k in range(k0, len(self.parts)):
                if self.parts[k] is not None:
                    values.update(zip(self.parts[k]["fetch"], self._step(k, feed, values, replaced)))
            got = [np.asarray(feed[o]) if o in self.inputs and o not in values else values[o] for o in self.outputs]
            errs += sens.feed_errors(self.metric, got, ref, mask)
        return float(np.concatenate(errs).mean()) if errs else 0.0

    def payload(self) -> dict:
        """Picklable parts for :meth:`from_payload` (numpy arrays travel zero-copy through Ray)."""
        return {"kind": KIND, "metric": self.metric, "outputs": self.outputs, "inputs": sorted(self.inputs),
                "weights": {k: np.asarray(v) for k, v in self.weights.items()}, "feeds": self.feeds,
                "masks": self.masks, "reference": self.reference, "cuts": self.cuts, "parts": self.parts}

    @classmethod
    def from_payload(cls, payload: dict, threads: int | None = None) -> CutEvaluator:
        """The evaluator in another process; ``threads``: ONNX Runtime's intra-op threads."""
        self = cls.__new__(cls)
        self.metric, self.outputs, self.inputs = payload["metric"], payload["outputs"], set(payload["inputs"])
        self.weights, self.feeds, self.masks = payload["weights"], payload["feeds"], payload["masks"]
        self.reference, self.cuts, self.parts = payload["reference"], payload["cuts"], payload["parts"]
        n = len(self.parts)
        self._sessions = [None if part is None else _session(part, threads, "model during sensitivity measurement", k, n)
                          for k, part in enumerate(self.parts)]
        self.first = _first_reads(self.parts)
        return self


def _first_reads(parts: list[dict | None]) -> dict[str, int]:
    """The first segment whose session takes each planned weight as an input."""
    first: dict[str, int] = {}
    for k, part in enumerate(parts):
        for name in part["switched"] if part else ():
            first.setdefault(name, k)
    return first


def _session(part: dict, threads: int | None, what: str, k: int, n: int) -> Any:
    import onnx

    from graphc.core.errors import ValidationError
    from graphc.core.ort_large import session_from_proto

    try:
        return session_from_proto(onnx.ModelProto.FromString(part["model"].tobytes()), part["arrays"], threads=threads)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime cannot load the {what} (segment {k + 1} of {n}): {first}") from None

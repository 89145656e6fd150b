"""Sensitivity probes of ``mixed-precision`` (and the planner's action measurements) as
independent work items (``graphc.core.executor``).

One item is one layer: quantize its weight at each probe configuration, run the model with
only that weight replaced (``_sensitivity.Evaluator``), and compute the round-to-nearest
weight error of every candidate (what the untested candidates are predicted from). A layer may
be several weights that read one input (``mixed-precision``'s ``siblings``: Q, K and V; gate
and up): they are quantized as one matrix, their rows stacked (rows are quantized independently,
GPTQ's too, with the input's one Hessian), and replaced together. Items
share the read-only :class:`ProbeShared` (the ORT model with the planned weights as inputs,
the weights, the calibration feeds and reference outputs), which an executor sends to each
worker once; an item is a few hundred bytes plus, for GPTQ probes, its layer's Hessian.

A worker process builds its ONNX Runtime session from the shared payload once and keeps it
(``_EVALUATORS``, keyed by the payload's ``key``) for the items that follow; in this process
the pass registers the evaluator it already has under that key, so nothing is built twice.
The arithmetic is the single-process one, item by item, so the results are identical
wherever an item runs (the tests compare the written model's bytes). The planner's items
(:func:`output_error`) are the replaced weights of one action, computed in the driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphc.passes import _blockquant as bq
from graphc.passes import _cut_evaluator
from graphc.passes import _sensitivity as sens

# worker-side cache: payload key -> Evaluator (one entry: a new run's payload replaces it)
_EVALUATORS: dict[str, sens.Evaluator] = {}


@dataclass(frozen=True)
class Oriented:
    """How a layer's weight is stored relative to the quantizer's [rows, cols] view."""

    transposed: bool

    def stored(self, view: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(view.T if self.transposed else view, dtype=np.float32)

    def view(self, stored: np.ndarray) -> np.ndarray:
        """The quantizer's float32 [rows, cols] view of a stored weight (the inverse of :meth:`stored`)."""
        a = np.asarray(stored, dtype=np.float32)
        return np.ascontiguousarray(a.T if self.transposed else a)


@dataclass
class ProbeShared:
    """Read-only inputs every probe needs: sent to each worker once."""

    key: str
    evaluator: dict[str, Any]  # sens.Evaluator.payload()
    symmetric: bool = False
    scale_dtype: str = "float16"
    damp: float = 0.01
    threads: int | None = None  # ONNX Runtime threads in a worker (None: ORT's default)


@dataclass(frozen=True, eq=False)
class ProbeItem:
    """One layer's probes, sent per task: a few hundred bytes, plus the layer's input Hessian
    for GPTQ probes (only the worker that quantizes the layer receives it)."""

    weight: str  # the initializer's name (key of the shared weights)
    transposed: bool
    method: str  # bq.Method value of the measured probes
    probes: tuple[sens.QuantConfig, ...]
    candidates: tuple[sens.QuantConfig, ...]  # whose weight errors are wanted (probes included)
    hessian: np.ndarray | None = None  # [cols, cols] float64, GPTQ probes only
    # several weights reading one input, planned as one (name, transposed), ``weight`` first;
    # () for a single weight
    members: tuple[tuple[str, bool], ...] = ()
    tokens: int = 0  # the calibration rows the Hessian averages (0: unknown; few: a thin factor serves)

    @property
    def names(self) -> tuple[str, ...]:
        """The weights this item replaces."""
        return tuple(m[0] for m in self.members) if self.members else (self.weight,)


def item_view(item: ProbeItem, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The quantizer's float32 [rows, cols] view of the item's weight(s): members' rows stacked."""
    members = item.members or ((item.weight, item.transposed),)
    views = [Oriented(transposed).view(arrays[name]) for name, transposed in members]
    return views[0] if len(views) == 1 else np.ascontiguousarray(np.concatenate(views, axis=0))


def item_stored(item: ProbeItem, arrays: Mapping[str, np.ndarray], deq: np.ndarray) -> dict[str, np.ndarray]:
    """A dequantized view (as :func:`item_view`) back as each weight in its stored orientation."""
    members = item.members or ((item.weight, item.transposed),)
    out, row = {}, 0
    for name, transposed in members:
        stored = arrays[name]
        rows = stored.shape[1] if transposed else stored.shape[0]
        out[name] = Oriented(transposed).stored(deq[row:row + rows])
        row += rows
    return out


@dataclass(frozen=True)
class ProbeResult:
    measured: dict  # QuantConfig -> output error, in probe order
    weight_error: dict  # QuantConfig -> relative (Hessian-weighted for GPTQ) weight error


def register_local(key: str, evaluator: sens.Evaluator) -> None:
    """Use ``evaluator`` (this process's) for the items of payload ``key``."""
    _EVALUATORS.clear()
    _EVALUATORS[key] = evaluator


def forget(key: str) -> None:
    """The probes of payload ``key`` are over in this process: its evaluator and the KL's buffers go."""
    _EVALUATORS.pop(key, None)
    sens.release_kl_buffers()


def _evaluator(shared: ProbeShared) -> sens.Evaluator:
    ev = _EVALUATORS.get(shared.key)
    if ev is None:
        _EVALUATORS.clear()  # one model at a time per worker
        sens.KL_THREADS = shared.threads  # a worker's share of the cores, as its ONNX Runtime's
        if shared.evaluator.get("kind") == _cut_evaluator.KIND:
            ev = _cut_evaluator.CutEvaluator.from_payload(shared.evaluator, threads=shared.threads)
        else:
            ev = sens.Evaluator.from_payload(shared.evaluator, threads=shared.threads)
        _EVALUATORS[shared.key] = ev
    return ev


def probe_layer(shared: ProbeShared, item: ProbeItem) -> ProbeResult:
    """The measured output errors of one layer's probes and its candidates' weight errors."""
    evaluator = _evaluator(shared)
    view = item_view(item, evaluator.weights)
    h = item.hessian
    kw = {"symmetric": shared.symmetric, "scale_dtype": shared.scale_dtype}
    method = bq.Method(item.method)
    measured: dict[sens.QuantConfig, float] = {}
    for c in item.probes:
        _, deq = sens.quantize_view(Oriented(False), view, c, method=method, hessian=h, damp=shared.damp, **kw)
        measured[c] = evaluator.error(item_stored(item, evaluator.weights, deq))
    return ProbeResult(measured, sens.candidate_errors(view, item.candidates, h, tokens=item.tokens, **kw))


def output_error(shared: ProbeShared, replaced: dict[str, np.ndarray]) -> float:
    """The model's output error with the named constants replaced (one planner action alone)."""
    return _evaluator(shared).error(replaced)

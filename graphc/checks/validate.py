"""Validation with ONNX Runtime: original vs rewritten, output by output.

Inputs come from the model spec's real evaluation set when the model carries one
(``graphc.model_recipe`` metadata and the export extra installed), or are synthesized from
the input signature for a bare .onnx.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphc.core.errors import GraphcError, ValidationError
from graphc.core.session import make_session, session_options  # noqa: F401 - imported from here too
from graphc.checks.value_checks import NotComparable, as_comparable, match_nonfinite, sequence_shapes

# feeds, original outputs, rewritten outputs (per feed, by output name) -> task figures
TaskMetric = Callable[
    [Sequence[Mapping[str, np.ndarray]], Sequence[Mapping[str, np.ndarray]], Sequence[Mapping[str, np.ndarray]]],
    "dict[str, Any] | None",
]

from graphc.checks.synth import (  # noqa: F401 - the synthesizing half of validation, imported from here too
    PAST_PREFIX, SYNTH_BATCH, SYNTH_IMAGE, SYNTH_PAST, SYNTH_SEQ, complete_decoder_feeds, is_kv_decoder,
    synthesize_inputs,
)


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    mean_abs: float
    rel_max: float
    cosine: float
    min_row_cosine: float
    nonfinite: int = 0  # places where one model has NaN/inf and the other a number (or another inf)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class ValidationReport:
    outputs: list[OutputMetrics]
    samples: int
    input_source: str
    min_cosine_required: float | None = None
    max_abs_allowed: float | None = None
    # the largest difference over the output's largest |value| (each output's rel_max)
    max_rel_allowed: float | None = None
    min_output_cosine_required: float | None = None
    max_ppl_rise_allowed: float | None = None  # relative perplexity rise (task "perplexity")
    min_task_cosine_required: float | None = None  # mean embedding cosine (task "embedding_cosine")
    min_top1_required: float | None = None  # top-1 agreement (task "top1_agreement")
    task: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # e.g. the target CPU is not this machine
    first_nonfinite: str | None = None  # "tensor (op)" where the rewritten model first went NaN/inf

    @property
    def min_cosine(self) -> float:
        return min(o.min_row_cosine for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max(o.max_abs for o in self.outputs)

    @property
    def max_rel(self) -> float:
        return max(o.rel_max for o in self.outputs)

    @property
    def output_cosine(self) -> float:
        return min(o.cosine for o in self.outputs)

    @property
    def worst_output(self) -> str:
        """The output with the lowest cosine (the one a tolerance failure is about)."""
        return min(self.outputs, key=lambda o: o.cosine).name if self.outputs else ""

    @property
    def nonfinite_outputs(self) -> list[str]:
        """Outputs with NaN/inf where the original has a number (or the reverse): a failure."""
        return [o.name for o in self.outputs if o.nonfinite]

    @property
    def passed(self) -> bool:
        ok = not self.nonfinite_outputs
        if self.min_output_cosine_required is not None:
            ok &= self.output_cosine >= self.min_output_cosine_required
        if self.min_cosine_required is not None:
            ok &= self.min_cosine >= self.min_cosine_required
        if self.max_abs_allowed is not None:
            ok &= self.max_abs <= self.max_abs_allowed
        if self.max_rel_allowed is not None:
            ok &= self.max_rel <= self.max_rel_allowed
        if self.max_ppl_rise_allowed is not None and self.ppl_rise is not None:
            ok &= self.ppl_rise <= self.max_ppl_rise_allowed
        if self.min_task_cosine_required is not None and self.task_cosine is not None:
            ok &= self.task_cosine >= self.min_task_cosine_required
        if self.min_top1_required is not None and self.top1 is not None:
            ok &= self.top1 >= self.min_top1_required
        return ok

    @property
    def task_cosine(self) -> float | None:
        """Mean embedding cosine on the validation sentences or photos, when the task metric measured it."""
        mean = self.task.get("mean") if self.task.get("metric") == "embedding_cosine" else None
        return float(mean) if isinstance(mean, (int, float)) else None

    @property
    def top1(self) -> float | None:
        """Top-1 agreement of a classifier on the validation photos, when measured."""
        value = self.task.get("value") if self.task.get("metric") == "top1_agreement" else None
        return float(value) if isinstance(value, (int, float)) else None

    def task_gates(self) -> list[tuple[str, str, float, float]]:
        """The task checks that applied: (what, comparison, threshold, measured)."""
        out = []
        if self.max_ppl_rise_allowed is not None and self.ppl_rise is not None:
            out.append(("perplexity rise", "≤", self.max_ppl_rise_allowed, self.ppl_rise))
        if self.min_task_cosine_required is not None and self.task_cosine is not None:
            out.append(("mean embedding cosine", "≥", self.min_task_cosine_required, self.task_cosine))
        if self.min_top1_required is not None and self.top1 is not None:
            out.append(("top-1 agreement", "≥", self.min_top1_required, self.top1))
        return out

    @property
    def ppl_rise(self) -> float | None:
        """Relative perplexity rise on the validation texts, when the task metric measured it."""
        rise = self.task.get("relative_rise") if self.task.get("metric") == "perplexity" else None
        return float(rise) if isinstance(rise, (int, float)) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "input_source": self.input_source,
            "output_cosine": round(self.output_cosine, 7),
            "min_row_cosine": round(self.min_cosine, 7),
            "max_abs": round(self.max_abs, 7),
            "max_rel": float(f"{self.max_rel:.4g}"),
            **({"nonfinite_outputs": self.nonfinite_outputs} if self.nonfinite_outputs else {}),
            "tolerance": {
                "min_cosine": self.min_output_cosine_required,
                "min_row_cosine": self.min_cosine_required,
                "max_abs": self.max_abs_allowed,
                **({"max_rel": self.max_rel_allowed} if self.max_rel_allowed is not None else {}),
                **({"max_ppl_rise": self.max_ppl_rise_allowed} if self.max_ppl_rise_allowed is not None else {}),
                **({"min_task_cosine": self.min_task_cosine_required}
                   if self.min_task_cosine_required is not None and self.task_cosine is not None else {}),
                **({"min_top1": self.min_top1_required}
                   if self.min_top1_required is not None and self.top1 is not None else {}),
            },
            "outputs": [o.to_dict() for o in self.outputs],
            **({"nonfinite_outputs": self.nonfinite_outputs, "first_nonfinite": self.first_nonfinite}
               if self.nonfinite_outputs else {}),
            **({"task": self.task} if self.task else {}),
            **({"notices": list(self.notices)} if self.notices else {}),
        }


def _row_mask(feed: dict[str, np.ndarray], out: np.ndarray, name: str = "") -> np.ndarray | None:
    """Rows (tokens) that are real, not padding: from an ``attention_mask`` input whose shape
    is the output's leading [batch, sequence], or, for a KV cache's ``present*`` output [batch,
    heads, total, head], its [batch, total]. Padded positions carry values nobody reads (and
    GroupQueryAttention leaves a present's rows past each sequence's length unwritten)."""
    mask = feed.get("attention_mask")
    if mask is None or out.ndim < 3:
        return None
    mask = np.asarray(mask).astype(bool)
    if tuple(mask.shape) == tuple(out.shape[:2]):
        return mask
    if name.startswith("present") and out.ndim == 4 and mask.ndim == 2 and (out.shape[0], out.shape[2]) == mask.shape:
        return np.broadcast_to(mask[:, None, :], out.shape[:3])
    return None


def output_metrics(
    name: str,
    refs: Sequence[np.ndarray],
    gots: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None] | None = None,
) -> OutputMetrics:
    """An output's metrics over all feeds, summed feed by feed in float64 (no copy of the
    outputs joined: a decoder's logits are hundreds of MB a feed)."""
    max_abs = 0.0
    sum_abs = 0.0
    count = 0
    nonfinite = 0
    ref_max = 0.0
    row_cos: list[np.ndarray] = []
    dot = rr = gg = 0.0
    for i, (r, g) in enumerate(zip(refs, gots)):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            raise ValidationError(f"output {name!r} has shape {g.shape}, the original {r.shape}")
        mask = masks[i] if masks is not None else None
        if mask is not None and not np.all(mask):  # rows picked before the float64 copies
            r, g = r[mask], g[mask]
        elif mask is not None:  # every row kept: the shape indexing would give, without a copy
            r, g = r.reshape(-1, *r.shape[np.ndim(mask):]), g.reshape(-1, *g.shape[np.ndim(mask):])
        r, g = r.astype(np.float64, copy=False), g.astype(np.float64, copy=False)
        r, g, bad = match_nonfinite(r, g)
        nonfinite += bad
        diff = r - g
        d = np.abs(diff)
        max_abs = max(max_abs, float(d.max(initial=0.0)))
        sum_abs += float(d.sum())
        count += d.size
        del d
        ref_max = max(ref_max, float(np.abs(r).max(initial=0.0)))
        flat_r, flat_g = r.reshape(-1), g.reshape(-1)
        dot += float(np.dot(flat_r, flat_g))
        rr += float(np.dot(flat_r, flat_r))
        gg += float(np.dot(flat_g, flat_g))
        row_cos.append(_signal_row_cosines(_as_rows(r), _as_rows(g), _as_rows(diff)))
    cos = _cos_from_sums(dot, rr, gg)
    if nonfinite:
        return OutputMetrics(name, float("inf"), float("inf"), float("inf"), 0.0, 0.0, nonfinite)
    rows = np.concatenate(row_cos) if row_cos else np.zeros(0)
    return OutputMetrics(
        name,
        max_abs=max_abs,
        mean_abs=sum_abs / max(count, 1),
        rel_max=max_abs / ref_max if ref_max > 0 else max_abs,
        cosine=cos,
        min_row_cosine=float(rows.min()) if rows.size else cos,
    )


def _cos_from_sums(dot: float, rr: float, gg: float) -> float:
    """The cosine of a and b from the sums a.b, a.a, b.b: 1 when both are zero, 0 when one is."""
    if rr == 0.0 and gg == 0.0:
        return 1.0
    if rr == 0.0 or gg == 0.0:
        return 0.0
    return float(dot / (np.sqrt(rr) * np.sqrt(gg)))


def _as_rows(a: np.ndarray) -> np.ndarray:
    """The vectors whose cosines the row gate checks: along the last axis (a token's hidden
    state, a sample's logits) up to rank 3; for rank 4 and up ([N, C, H, W] maps) one row per
    sample and channel, the whole map: one line of pixels is not a unit anything reads, and on
    a probability map its few non-zero values make its cosine noise."""
    if a.ndim >= 4:
        return a.reshape(-1, a.shape[-2] * a.shape[-1])
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)


NEGLIGIBLE_ROW = 1e-4  # of the output's largest reference row norm (see _signal_rows)


def _signal_row_cosines(rows_r: np.ndarray, rows_g: np.ndarray, rows_d: np.ndarray) -> np.ndarray:
    """The cosines of the row pairs whose cosine means something (``rows_d`` = rows_r - rows_g).
    A row whose reference and error norms are both below NEGLIGIBLE_ROW of the largest reference
    row (a probability map's background, where a sigmoid underflows to exactly 0 on one side and
    to 1e-9 on the other) has a direction made of rounding: its cosine (0 or anything) says
    nothing of the result. Zero rows as :func:`_cos_from_sums`: both zero 1, one zero 0."""
    norm_r = np.sqrt(np.einsum("ij,ij->i", rows_r, rows_r))
    norm_g = np.sqrt(np.einsum("ij,ij->i", rows_g, rows_g))
    norm_d = np.sqrt(np.einsum("ij,ij->i", rows_d, rows_d))
    floor = NEGLIGIBLE_ROW * float(norm_r.max(initial=0.0))
    keep = ~((norm_r <= floor) & (norm_d <= floor))
    if not keep.any():
        keep[:] = True
    dots = np.einsum("ij,ij->i", rows_r[keep], rows_g[keep]) if not keep.all() else np.einsum("ij,ij->i", rows_r, rows_g)
    na, nb = norm_r[keep], norm_g[keep]
    both = (na == 0.0) & (nb == 0.0)
    either = (na == 0.0) | (nb == 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dots / (na * nb)
    return np.where(both, 1.0, np.where(either, 0.0, cos))


def run_feeds(session: ort.InferenceSession, feeds: Sequence[dict[str, np.ndarray]], what: str) -> list[list[np.ndarray]]:
    from graphc.core.interrupt import run_session

    names = {i.name for i in session.get_inputs()}
    out = []
    for feed in feeds:
        try:  # interruptible (Ctrl-C, SIGTERM) and bounded by graphc.core.interrupt.time_limit
            out.append(run_session(session, {k: v for k, v in feed.items() if k in names}))
        except GraphcError:
            raise
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValidationError(f"ONNX Runtime failed to run the {what}: {first}") from None
    return out


def _runnable(model: Any, what: str) -> Any:
    """A session for a path or a model, or, for a model that streams (graphc.core.streaming),
    the model run segment by segment."""
    from graphc.core import streaming

    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, ir.Model) and streaming.applies(model):
        try:
            return streaming.StreamedModel(model, what=what)
        except streaming.NotStreamable:
            pass  # the whole model in one session
    return make_session(model, what=what)


def _output_names(runnable: Any) -> list[str]:
    from graphc.core.streaming import StreamedModel

    if isinstance(runnable, StreamedModel):
        return list(runnable.outputs)
    return [o.name for o in runnable.get_outputs()]


def model_outputs(model: Any, feeds: Sequence[dict[str, np.ndarray]], what: str) -> tuple[list[str], list[list[np.ndarray]]]:
    """The output names of ``model`` (a session, a path, an IR model, or a streamed model) and
    its outputs on each feed; an IR model that is large enough streams segment by segment."""
    from graphc.core.streaming import NotStreamable, StreamedModel

    runnable = _runnable(model, what) if not isinstance(model, StreamedModel) else model
    if isinstance(runnable, StreamedModel):
        try:
            return list(runnable.outputs), runnable.run(feeds)
        except NotStreamable:  # a sequence crosses a cut: the whole model in one session
            runnable = make_session(model, what=what)
    return _output_names(runnable), run_feeds(runnable, feeds, what)


def compare(
    original: ir.Model | str | os.PathLike | ort.InferenceSession,
    rewritten: ir.Model | str | os.PathLike | ort.InferenceSession,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    input_source: str = "synthesized",
    reference_outputs: list[list[np.ndarray]] | None = None,
    min_cosine: float | None = None,
    max_abs: float | None = None,
    task: TaskMetric | None = None,
) -> ValidationReport:
    """Per-output metrics of ``rewritten`` against ``original`` on the same feeds.

    ``task`` (a model spec's ``task_metric``) turns both models' outputs, per feed by
    output name, into the report's ``task`` figures (perplexity, embedding cosine, ...)."""
    rew = _runnable(rewritten, "rewritten model")
    if reference_outputs is None:
        out_names, reference_outputs = model_outputs(_runnable(original, "original model"), feeds, "original model")
    else:
        out_names = _output_names(rew)
    rew_names, got = model_outputs(rew, feeds, "rewritten model")
    metrics = []
    skipped = []
    for i, name in enumerate(out_names):
        if name not in rew_names:
            raise ValidationError(f"the rewritten model lost output {name!r}")
        j = rew_names.index(name)
        for r, g in zip(reference_outputs, got):
            if sequence_shapes(r[i]) != sequence_shapes(g[j]):
                raise ValidationError(f"output {name!r} is a sequence of shapes {sequence_shapes(g[j])}, "
                                      f"the original {sequence_shapes(r[i])}")
        try:  # sequences of tensors are compared element by element, as one flat vector
            refs = [as_comparable(r[i], name, "original") for r in reference_outputs]
            gots = [as_comparable(g[j], name, "rewritten") for g in got]
        except NotComparable as e:
            skipped.append(str(e))
            continue
        masks = [_row_mask(feed, ref, name) for feed, ref in zip(feeds, refs)]
        metrics.append(output_metrics(name, refs, gots, masks))
    if not metrics:
        raise ValidationError("no output could be compared (" + "; ".join(skipped) + ")")
    report = ValidationReport(metrics, len(feeds), input_source, min_cosine, max_abs)
    report.notices += [f"{why}: not compared" for why in skipped]
    if task is not None:
        ref_named = [dict(zip(out_names, r)) for r in reference_outputs]
        got_named = [dict(zip(rew_names, g)) for g in got]
        report.task = task(feeds, ref_named, got_named) or {}
    return report


def first_nonfinite_text(rewritten: ir.Model, feeds: Sequence[dict], original: ir.Model) -> str | None:
    """The first tensor of the rewritten model that goes non-finite on the first feeds, quoted."""
    from graphc.checks.nonfinite import first_nonfinite

    for feed in feeds[:2]:
        found = first_nonfinite(rewritten, feed, original)
        if found is not None:
            return f"{found[0]!r} ({found[1]})"
    return None


def nonfinite_text(report: ValidationReport) -> str:
    names = ", ".join(repr(n) for n in report.nonfinite_outputs)
    where = f"; first non-finite tensor {report.first_nonfinite}" if report.first_nonfinite else ""
    return f"the result computes NaN or inf where the original is finite (output {names}{where})"


def tolerance_text(report: ValidationReport, tol: Any) -> str:
    """What missed the tolerance ``tol`` (a recipe's), one clause per check."""
    parts = [f"output {name!r} has NaN or inf where the original has a number" for name in report.nonfinite_outputs]
    if tol.min_cosine is not None:
        parts.append(f"output {report.worst_output!r} cosine {report.output_cosine:.5f} vs required {tol.min_cosine}")
    if tol.min_row_cosine is not None:
        parts.append(f"worst row cosine {report.min_cosine:.5f} vs required {tol.min_row_cosine}")
    if tol.max_abs is not None:
        parts.append(f"max abs {report.max_abs:.4g} vs allowed {tol.max_abs}")
    if getattr(tol, "max_rel", None) is not None:
        parts.append(f"max relative difference {report.max_rel:.3g} vs allowed {tol.max_rel:g}")
    if tol.max_ppl_rise is not None and report.ppl_rise is not None:
        parts.append(f"perplexity rise {report.ppl_rise:+.2%} vs allowed {tol.max_ppl_rise:+.2%}")
    if getattr(tol, "min_task_cosine", None) is not None and report.task_cosine is not None:
        parts.append(f"mean embedding cosine {report.task_cosine:.5f} vs required {tol.min_task_cosine}")
    if getattr(tol, "min_top1", None) is not None and report.top1 is not None:
        parts.append(f"top-1 agreement {report.top1:.3f} vs required {tol.min_top1}")
    return ", ".join(parts)

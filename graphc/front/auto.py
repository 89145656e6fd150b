"""``--recipe auto``: the fastest recipe that meets its tolerance on the target CPU.

Each candidate recipe is compiled for the target and validated like any ``compress``; the
ones that pass are timed on this machine at the shape the user names (``shape_hint``, batch ×
sequence; padded rows as real batches have them; for a KV-cache decoder one decode step after a
past of that length), interleaved with the original and each other, and the fastest is
written. The table of candidates (bytes, validation, latency, why a candidate lost) goes into
the result and the provenance.

Fused fp32 (``fuse``) is always a candidate, so the winner is never slower than it. The int8
candidates take the target's MatMul form (:mod:`graphc.target`: on a CPU whose u8×s8 kernel
saturates, pair-bounded weights that keep the fast kernel exact).

Where the target is not this machine (``arm64`` compiled on x86, say), nothing can be timed:
the candidates are still compiled and validated, and the choice falls back to the first one
of a fixed preference order that passed (int8, then fuse), with a notice saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from graphc.core.errors import GraphcError, RecipeError
from graphc.core.recipes import Recipe, get_recipe

DEFAULT_CANDIDATES = ("fuse", "int8", "fast")
DEFAULT_SHAPE = (8, 128)
PREFERENCE = ("int8", "fast", "fuse")  # when nothing can be timed


@dataclass
class Candidate:
    name: str
    recipe: Recipe
    status: str = "pending"  # passed | missed tolerance | failed | not applicable
    reason: str = ""
    bytes: int | None = None
    output_cosine: float | None = None
    latency_ms: float | None = None
    result: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.name,
            "status": self.status,
            **({"reason": self.reason} if self.reason else {}),
            "bytes": self.bytes,
            "output_cosine": None if self.output_cosine is None else round(self.output_cosine, 6),
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
        }


def parse_shape(text: str | Sequence[int] | None) -> tuple[int, int]:
    """``"8x128"`` → (8, 128); one-line error otherwise."""
    if text is None:
        return DEFAULT_SHAPE
    if not isinstance(text, str):
        b, s = text
        return int(b), int(s)
    parts = text.lower().replace("×", "x").split("x")
    try:
        b, s = (int(p) for p in parts)
    except ValueError:
        raise RecipeError(f"shape hint {text!r}: expected BATCHxSEQUENCE, e.g. 8x128") from None
    if b < 1 or s < 1 or b * s > 1 << 20:
        raise RecipeError(f"shape hint {text!r}: batch and sequence must be >= 1 (and their product <= 1048576)")
    return b, s


def candidates(names: Sequence[str]) -> list[Candidate]:
    return [Candidate(name, get_recipe(name)) for name in names]


def timed_at(model: ir.Model, batch: int, seq: int) -> str:
    """What :func:`timing_feed` times, in words."""
    from graphc.checks.synth import is_kv_decoder

    if is_kv_decoder(model):
        return f"one decode step: batch {batch}, a past of {seq} positions"
    return f"batch {batch} x {seq} positions"


def timing_feed(model: ir.Model, batch: int, seq: int) -> dict:
    """One feed at batch × seq: the model spec's real texts padded to ``seq`` when it has
    them (padding as real batches have it), else inputs synthesized at that shape. A KV-cache
    decoder is timed on what it spends its time on when it generates: one decode step, a new
    token per row after a past of ``seq`` positions."""
    from graphc.core import ops
    from graphc.checks.measure import pad_feed
    from graphc.checks.synth import is_kv_decoder
    from graphc.checks.validate import synthesize_inputs

    if is_kv_decoder(model):
        return synthesize_inputs(model, count=1, seed=3, batch=batch, seq=seq, decode_past=seq)[0]
    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    if name:
        try:
            from graphc.models import get_model_spec

            recipe = get_model_spec(name)
            texts = recipe.eval_texts(batch)
            feeds = recipe.feeds(texts, batch=batch, max_length=seq)
            if feeds and next(iter(feeds[0].values())).shape[0] == batch:
                return pad_feed(feeds[0], seq)
        except (ImportError, GraphcError, ValueError):
            pass
    return synthesize_inputs(model, count=1, seed=3, batch=batch, seq=seq)[0]


def choose(rows: list[Candidate], timed: bool) -> Candidate | None:
    passed = [c for c in rows if c.status == "passed"]
    if not passed:
        return None
    if timed:
        return min(passed, key=lambda c: c.latency_ms if c.latency_ms is not None else float("inf"))
    order = {n: i for i, n in enumerate(PREFERENCE)}
    return min(passed, key=lambda c: order.get(c.name, len(order)))


def time_candidates(original: ir.Model, rows: list[Candidate], feed: dict, *, reps: int, threads: int) -> float:
    """Set each passing candidate's median latency (ms); return the original's."""
    from graphc.core import io
    from graphc.checks.measure import interleaved_latency, session

    sessions = {"original": session(_bytes(original, io), threads=threads)}
    for c in rows:
        if c.status == "passed":
            sessions[c.name] = session(_bytes(c.result.model, io), threads=threads)
    lat = interleaved_latency(sessions, feed, reps=reps, warmup=2)
    for c in rows:
        if c.name in lat:
            c.latency_ms = lat[c.name].median_ms
    return lat["original"].median_ms


def _bytes(model: ir.Model, io) -> bytes:
    with io.inline_external_data(model):
        return ir.serde.serialize_model(model).SerializeToString()


def run_auto(
    model: Any,
    output: Any,
    *,
    target: Any,
    shape_hint: str | Sequence[int] | None = None,
    names: Sequence[str] = DEFAULT_CANDIDATES,
    feeds: Sequence[dict] | None = None,
    reps: int = 20,
    threads: int = 2,
    force: bool = False,
    progress=None,
    report: Any = None,
    calibration_data: Any = None,
    tokenizer: Any = None,
    preprocess: Any = None,
    genai: bool = False,
):
    """Compile every candidate for ``target``, validate, time the passing ones, write the
    fastest (see the module docstring). Returns the winner's CompressResult with ``auto``
    holding the candidate table. ``calibration_data`` (with ``tokenizer``, ``preprocess``): every
    candidate calibrates on its calibration part and is validated on its held-out part, with the
    task metric, as ``graphc.compress`` does with it. ``genai``: ``output`` is an onnxruntime-genai
    folder (a KV-cache decoder's); the candidates are timed as plain graphs, and the winner then
    takes genai's form as ``compress --genai`` writes it."""
    import json

    from graphc.front import api
    from graphc.core import io
    from graphc.core.errors import ToleranceError
    from graphc.core.target import resolve, runs_here

    info = resolve(target)
    batch, seq = parse_shape(shape_hint)
    ir_model, src = api.to_ir(model)
    from graphc.core.outputs import plan_compress
    from graphc.checks.validate import tolerance_text
    from graphc.front.reports import write_compress_report

    plan = plan_compress(src, None if genai else output, report=report, input_bytes=io.tensor_bytes(ir_model))
    report, forbid = plan.report, plan.forbid
    if genai:  # checked as a folder, before any work (as compress --genai does)
        api.check_genai_output(ir_model, src, output)
    else:
        output = plan.output
    rows = candidates(names)
    source = None
    data = {}
    if calibration_data is not None:
        data = {"calibration_data": calibration_data, "tokenizer": tokenizer, "preprocess": preprocess}
    elif feeds is None:
        feeds, source = api.validation_feeds(ir_model)
    for i, c in enumerate(rows):
        if progress is not None:
            progress(f"auto: compiling {c.name}", i, len(rows))
        try:
            res = api.compress(model, None, recipe=c.recipe, target=info, feeds=feeds, force=True, attribution=False,
                               **data)
        except GraphcError as e:
            c.status, c.reason = "failed", str(e)
            continue
        c.result = res
        c.bytes = res.bytes_after
        c.output_cosine = res.validation.output_cosine
        c.status = "passed" if res.validation.passed else "missed tolerance"
        if not res.validation.passed:
            c.reason = tolerance_text(res.validation, c.recipe.tolerance)
    timed = runs_here(info)
    notices = []
    original_ms = None
    if timed and any(c.status == "passed" for c in rows):
        if progress is not None:
            progress("auto: timing", len(rows), len(rows))
        original_ms = time_candidates(ir_model, rows, timing_feed(ir_model, batch, seq), reps=reps, threads=threads)
    elif not timed:
        notices.append(f"auto: target {info.name} is not this machine: candidates were not timed; chose by the "
                       f"fixed order {', '.join(PREFERENCE)} among those that passed")
    winner = choose(rows, timed)
    table = [c.to_dict() for c in rows]
    if winner is None:
        best = max((c for c in rows if c.result is not None), key=lambda c: c.output_cosine or 0, default=None)
        if best is None or not force:
            raise ToleranceError("auto: no candidate met its tolerance (" + "; ".join(
                f"{c.name}: {c.reason or c.status}" for c in rows) + "); nothing written", path=output)
        winner = best
        notices.append(f"auto: no candidate met its tolerance; --force wrote the closest, {best.name}")
    for c in rows:
        if c is not winner and c.status == "passed" and c.latency_ms is not None and winner.latency_ms is not None:
            c.reason = f"{c.latency_ms / winner.latency_ms:.2f}x the winner's latency"
    table = [c.to_dict() for c in rows]
    result = winner.result
    if source is not None and result.validation is not None:
        result.validation.input_source = source
    result.auto = {"target": info.name, "shape": [batch, seq], "timed_at": timed_at(ir_model, batch, seq),
                   "timed": timed, "winner": winner.name,
                   "original_ms": None if original_ms is None else round(original_ms, 3), "candidates": table}
    result.notices = [*notices, *result.notices]
    result.model.metadata_props["graphc.auto"] = json.dumps(
        {k: v for k, v in result.auto.items() if k != "candidates"} | {"candidates": [
            {k: r[k] for k in ("candidate", "status", "bytes", "latency_ms")} for r in table]}, sort_keys=True)
    if report is not None:
        result.report_path = write_compress_report(result, ir_model, src, output, feeds, report)
    if output is not None and genai:
        result.notices.append("auto: the candidates were timed as plain graphs; the winner is written in genai's form")
        api.write_genai_output(result, result.model, ir_model, src, output)
    elif output is not None:
        result.written = io.save_model(result.model, output, forbid=forbid)
        result.bytes_after = sum(p.stat().st_size for p in result.written)
    if output is not None and src is not None:
        result.bytes_before = io.file_bytes(src)
    return result

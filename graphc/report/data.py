"""Assemble what the HTML report shows: sizes per layer, per-layer error, latency, the pass
timeline, validation and provenance, from an original and a rewritten model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.checks import inspection
from graphc.checks.provenance import read_provenance

LATENCY_BATCHES = (1, 8)
LATENCY_REPS = 10


def measure_latency(original: ir.Model, rewritten: ir.Model, feeds: Sequence[dict], *, threads: int = 2) -> dict[str, Any]:
    """Interleaved median latency of both models at batch 1 and 8 on the validation feeds."""
    from graphc.checks import measure
    from graphc.core.io import inline_external_data

    def session(model: ir.Model):
        with inline_external_data(model):
            return measure.session(ir.serde.serialize_model(model).SerializeToString(), threads=threads)

    sessions = {"original": session(original), "rewritten": session(rewritten)}
    rows = []
    base = feeds[0]
    available = min(np.asarray(v).shape[0] for v in base.values() if np.asarray(v).ndim >= 1)
    seq = max((np.asarray(v).shape[1] for v in base.values() if np.asarray(v).ndim >= 2), default=0)
    for batch in LATENCY_BATCHES:
        if batch > available:
            continue
        feed = {k: np.asarray(v)[:batch] for k, v in base.items()}
        stats = measure.interleaved_latency(sessions, feed, reps=LATENCY_REPS, warmup=2)
        rows.append({"batch": batch, "original_ms": stats["original"].median_ms, "rewritten_ms": stats["rewritten"].median_ms})
    return {"threads": threads, "seq": seq, "reps": LATENCY_REPS, "rows": rows}


def planner_rows(passes: Sequence[dict[str, Any]] | None) -> tuple[list[dict] | None, list[dict] | None]:
    """The report's ``sensitivities`` and ``planner`` rows from a mixed-precision pass's stats
    (its ``sensitivities`` at measured configurations and its per-layer ``choices``)."""
    sens: list[dict] = []
    plan: list[dict] = []
    for p in passes or ():
        stats = p.get("stats") or {}
        for r in stats.get("sensitivities", ()):
            if r.get("measured"):
                sens.append({"layer": r["layer"], "metric": f"1 - cos at {r['config']}", "value": r["error"]})
        for c in stats.get("choices", ()):
            plan.append({"layer": c["layer"], "choice": f"int{c['bits']}/b{c['block_size']}",
                         "predicted": c.get("predicted_error"), "measured": c.get("measured_error")})
    return sens or None, plan or None


def report_data(
    original: ir.Model,
    rewritten: ir.Model,
    *,
    model_path: str | os.PathLike | None,
    output_path: str | os.PathLike | None,
    feeds: Sequence[dict],
    passes: list[dict[str, Any]] | None = None,
    validation: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    attribution: dict[str, Any] | None = None,
    latency: bool = True,
) -> dict[str, Any]:
    """The dict graphc.report.html renders (see that module for the keys)."""
    from graphc import __version__

    before = inspection.inspect_model(original)
    after = inspection.inspect_model(rewritten)
    diff = inspection.diff(before, after)
    provenance = read_provenance(rewritten)
    if passes is None:  # a model written earlier: its provenance names the passes (no timings)
        passes = [{"name": p["name"], "modified": p.get("modified", False), "wall_s": 0.0, "stats": {}}
                  for p in provenance.get("graphc.passes", [])]
    if recipe is None and isinstance(provenance.get("graphc.recipe_json"), dict):
        recipe = provenance["graphc.recipe_json"]
    return {
        "title": f"graphc report: {Path(model_path).name if model_path else 'model'}",
        "model": str(model_path) if model_path else None,
        "output": str(output_path) if output_path else None,
        "graphc_version": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "recipe": recipe,
        "summary": {
            "bytes_before": diff["bytes_before"],
            "bytes_after": diff["bytes_after"],
            "params_before": diff["params_before"],
            "params_after": diff["params_after"],
        },
        "layers": diff["layers"],
        "ops_changed": diff["ops_changed"],
        "passes": passes,
        "validation": validation,
        "attribution": attribution,
        "latency": measure_latency(original, rewritten, feeds) if latency and feeds else None,
        "sensitivities": planner_rows(passes)[0],
        "planner": planner_rows(passes)[1],
        "provenance": {k: (v if isinstance(v, str) else str(v)) for k, v in rewritten.metadata_props.items() if k.startswith("graphc.")},
    }

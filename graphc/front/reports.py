"""HTML reports: the one ``compress --report`` writes for its run, and ``graphc report`` on two
models already on disk (graphc.report builds the page)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphc.checks.feeds import task_metric_for, validation_feeds
from graphc.checks.validate import compare
from graphc.core import io
from graphc.core.interrupt import default_time_limit, time_limit
from graphc.core.outputs import plan_outputs


def write_compress_report(result: Any, original: ir.Model, src, output, feeds, path) -> Path:
    """The report of a compress run (``result``: its CompressResult)."""
    from graphc.report.html import write_report
    from graphc.report.data import report_data

    data = report_data(
        original,
        result.model,
        model_path=src,
        output_path=output,
        feeds=feeds or [],
        passes=[r.to_dict() for r in result.passes],
        validation=result.validation.to_dict() if result.validation else None,
        recipe=result.recipe.to_dict(),
        attribution=result.attribution.to_dict() if result.attribution else None,
    )
    return Path(write_report(data, path))


def report(
    original: Any,
    rewritten: Any,
    output: str | os.PathLike,
    *,
    feeds: Sequence[dict] | None = None,
    latency: bool = True,
) -> Path:
    """An HTML report comparing two models already on disk (the pass timeline comes from the
    rewritten model's provenance, without timings)."""
    from graphc.checks.attribution import attribute
    from graphc.report.html import write_report
    from graphc.report.data import report_data

    from graphc.front.api import to_ir

    orig, orig_path = to_ir(original)
    rew, rew_path = to_ir(rewritten)
    inputs = [f for p in (orig_path, rew_path) if p is not None for f in io.model_files(p)]
    output = plan_outputs(inputs, None, report=output).report  # never one of the models, checked before work
    source = "given"
    if feeds is None:
        feeds, source = validation_feeds(orig, model_path=orig_path)
    with time_limit(2 * default_time_limit(max(io.tensor_bytes(orig), io.tensor_bytes(rew))), "validation"):
        validation = compare(orig, rew, feeds, input_source=source, task=task_metric_for(orig, source))
    data = report_data(
        orig,
        rew,
        model_path=orig_path,
        output_path=rew_path,
        feeds=feeds,
        validation=validation.to_dict(),
        attribution=attribute(orig, rew, feeds).to_dict(),
        latency=latency,
    )
    return Path(write_report(data, output))

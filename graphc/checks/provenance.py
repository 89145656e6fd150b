"""Provenance written into every model graphc produces (model metadata_props, ``graphc.*``).

No timestamps: the same input and recipe give byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphc.core import io

KEYS = ("graphc.version", "graphc.recipe", "graphc.recipe_json", "graphc.passes", "graphc.input_sha256", "graphc.target",
        "graphc.validation", "graphc.calibration", "graphc.auto")


def input_digest(model: ir.Model, path: Path | None) -> str:
    """SHA-256 of the input: its file(s) when it came from disk, else its serialized proto."""
    h = hashlib.sha256()
    if path is not None:
        for f in io.model_files(path):
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        with io.inline_external_data(model):
            h.update(ir.serde.serialize_model(model).SerializeToString(deterministic=True))
    return h.hexdigest()


def provenance(recipe, records, report, original: ir.Model, path: Path | None, target=None) -> dict[str, str]:
    from graphc import __version__
    from graphc.core.target import resolve

    passes = [
        {"name": r.name, "modified": r.modified, **({"disabled": True} if r.skipped else {})}
        for r in records
    ]
    out: dict[str, Any] = {
        "graphc.version": __version__,
        "graphc.recipe": recipe.name,
        "graphc.recipe_json": json.dumps(recipe.to_dict(), sort_keys=True),
        "graphc.passes": json.dumps(passes),
        "graphc.input_sha256": input_digest(original, path),
    }
    info = resolve(target)
    # the forms of the passes that wrote int8 weights (a pass that found nothing to quantize
    # still resolved its form)
    forms = sorted({r.stats["int8_form"] for r in records
                    if r.modified and isinstance(r.stats, dict) and "int8_form" in r.stats})
    out["graphc.target"] = json.dumps(
        {"target": info.name, "int8_forms": forms}, sort_keys=True
    )
    if report is not None:
        out["graphc.validation"] = json.dumps(
            {
                "passed": report.passed,
                "input_source": report.input_source,
                "output_cosine": round(report.output_cosine, 6),
                "min_row_cosine": round(report.min_cosine, 6),
                "max_abs": round(report.max_abs, 6),
            },
            sort_keys=True,
        )
    return out


def read_provenance(model: ir.Model) -> dict[str, Any]:
    """The provenance keys of a model, JSON values decoded."""
    out: dict[str, Any] = {}
    for key in KEYS:
        if key in model.metadata_props:
            raw = model.metadata_props[key]
            try:
                out[key] = json.loads(raw) if raw[:1] in "[{" else raw
            except json.JSONDecodeError:
                out[key] = raw
    return out

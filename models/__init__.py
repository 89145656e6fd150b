"""Supported real models (model specs): how to load, export, feed and judge each one offline.

Importing this package is cheap; torch, transformers and the model packages are imported
only when a spec loads its model. The specs build on ``graphc.exporters`` (never the other
way round): a caller with a spec's name resolves it here (:func:`resolve_source`).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import ExportError, RecipeError
from graphc.models.base import ArchFacts, ModelSpec

_SPEC_CLASSES = {
    "minilm": ("graphc.models.minilm", "MiniLMSpec"),
    "smollm2": ("graphc.models.smollm2", "SmolLM2Spec"),
}
MODEL_SPECS: tuple[str, ...] = tuple(_SPEC_CLASSES)


@functools.cache
def get_model_spec(name: str) -> ModelSpec:
    """The model spec called ``name`` (one shared instance per name)."""
    if name not in _SPEC_CLASSES:
        raise RecipeError(f"unknown model spec {name!r}; known: {', '.join(MODEL_SPECS)}")
    module, cls = _SPEC_CLASSES[name]
    return getattr(importlib.import_module(module), cls)()


def spec_for_model(model: ir.Model | Mapping[str, str]) -> ModelSpec | None:
    """The spec named by a model's ``graphc.model_recipe`` metadata, None when it names none."""
    props = model.metadata_props if isinstance(model, ir.Model) else model
    name = props.get(ops.META_MODEL_SPEC)
    return get_model_spec(name) if name else None


def resolve_source(source: Any) -> Any:
    """What to export: a spec's name (``minilm``) as its spec; a Hugging Face folder or a torch
    module as it is. A string that is neither is refused, naming both."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if os.fspath(source) in MODEL_SPECS:
        return get_model_spec(os.fspath(source))
    if not (Path(source) / "config.json").is_file():
        raise ExportError(f"not a known model ({', '.join(MODEL_SPECS)}) nor a Hugging Face folder with config.json",
                          path=os.fspath(source))
    return source


def hf_folder_of(model: ir.Model) -> Path | None:
    """The Hugging Face folder (tokenizer files) of the spec a model came from, or None."""
    from graphc.exporters.genai import spec_folder

    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    return spec_folder(get_model_spec(name)) if name in MODEL_SPECS else None


__all__ = ["MODEL_SPECS", "ArchFacts", "ModelSpec", "get_model_spec", "hf_folder_of", "resolve_source", "spec_for_model"]

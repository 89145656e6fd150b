"""Supported real models (recipes): how to load, export, feed and judge each one offline.

Importing this package is cheap; torch, transformers and the model packages are imported
only when a recipe loads its model.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping

import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import RecipeError
from graphc.models.base import ArchFacts, ModelRecipe

_RECIPE_CLASSES = {
    "minilm": ("graphc.models.minilm", "MiniLMRecipe"),
    "smollm2": ("graphc.models.smollm2", "SmolLM2Recipe"),
}
MODEL_RECIPES: tuple[str, ...] = tuple(_RECIPE_CLASSES)


@functools.cache
def get_model_recipe(name: str) -> ModelRecipe:
    """The recipe called ``name`` (one shared instance per name)."""
    if name not in _RECIPE_CLASSES:
        raise RecipeError(f"unknown model recipe {name!r}; known: {', '.join(MODEL_RECIPES)}")
    module, cls = _RECIPE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)()


def recipe_for_model(model: ir.Model | Mapping[str, str]) -> ModelRecipe | None:
    """The recipe named by a model's ``graphc.model_recipe`` metadata, None when it names none."""
    props = model.metadata_props if isinstance(model, ir.Model) else model
    name = props.get(ops.META_MODEL_RECIPE)
    return get_model_recipe(name) if name else None


__all__ = ["MODEL_RECIPES", "ArchFacts", "ModelRecipe", "get_model_recipe", "recipe_for_model"]

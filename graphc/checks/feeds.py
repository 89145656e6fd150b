"""Where validation and calibration feeds come from: the user's inputs (``--inputs``), a model
recipe's real texts, crops of real photos for vision models, or inputs synthesized from the
signature (``--input-shape`` fixes dims); and the task metric that goes with real texts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import GraphcError
from graphc.core.pass_base import PassContext
from graphc.checks.validate import complete_decoder_feeds, synthesize_inputs

VALIDATION_SAMPLES = 64  # real sentences used to validate when the model has a recipe


def validation_feeds(model: ir.Model, count: int = VALIDATION_SAMPLES, *, seed: int = 0,
                     shapes: dict | None = None, model_path=None) -> tuple[list[dict], str]:
    """Feeds for validation: the model spec's real evaluation texts when the model came
    from a recipe and its packages are installed; for another text model with its tokenizer
    at hand (beside ``model_path`` or in the folder it was exported from), Wikipedia text
    through that tokenizer (graphc.checks.default_text); crops of photos for vision models;
    else inputs synthesized from the signature."""
    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    if name:
        try:
            from graphc.models import get_model_spec

            recipe = get_model_spec(name)
            texts = recipe.eval_texts(min(count, recipe.validation_texts))
            feeds = complete_decoder_feeds(model, recipe.feeds(texts, batch=recipe.validation_batch)
                                           [: recipe.validation_max_feeds])
            if _fits(model, feeds):  # the metadata may name a spec the graph no longer is
                return feeds, f"{name}: {len(texts)} real texts"
        except (ImportError, GraphcError):
            pass
    if not shapes:
        from graphc.checks.default_text import text_feeds

        text = text_feeds(model, model_path, "validation", 0)
        if text is not None:
            return text
    image_feeds, why_not = _image_feeds(model, "validation") if not shapes else (None, "")
    if image_feeds is not None:
        return image_feeds
    return synthesize_inputs(model, count=4, seed=seed, shapes=shapes), _synth_source(shapes) + why_not


def _fits(model: ir.Model, feeds: list[dict]) -> bool:
    """Whether the feeds give every input the graph needs (a model spec's texts feed the model
    the spec exported, not a graph that merely carries its name in metadata)."""
    needed = {v.name for v in model.graph.inputs if v.name not in model.graph.initializers}
    return bool(feeds) and all(needed <= set(feed) for feed in feeds)


def _synth_source(shapes: dict | None) -> str:
    fixed = "; ".join(f"{k}={','.join(map(str, v))}" for k, v in (shapes or {}).items())
    return "synthesized from the input signature" + (f" ({fixed})" if fixed else "")


def user_inputs(model: ir.Model, inputs=None, feeds=None, input_shapes=None) -> tuple[list[dict] | None, str | None, dict]:
    """The user's feeds (``feeds``, or read from the ``inputs`` file or folder) with the words
    validation reports for them, and the checked ``input_shapes`` (``{"x": (1, 3, 48, 320)}``
    or ``["x=1,3,48,320"]``) for synthesized ones."""
    from graphc.core.inputs import check_input_shapes, describe, parse_input_shapes, read_feeds

    shapes = parse_input_shapes(input_shapes) if isinstance(input_shapes, (list, tuple)) else dict(input_shapes or {})
    check_input_shapes(model, shapes)
    if inputs is not None:
        if feeds is not None:
            raise GraphcError("give feeds or inputs, not both")
        feeds = read_feeds(inputs, model)
        return feeds, describe(inputs, feeds), shapes
    if feeds is not None:
        return list(feeds), f"the user's inputs ({len(feeds)} feed{'s' if len(feeds) != 1 else ''})", shapes
    return None, None, shapes


def _image_feeds(model: ir.Model, split: str) -> tuple[tuple[list[dict], str] | None, str]:
    """Vision models: crops of real photos (graphc.checks.images), or None and why not."""
    from graphc.checks import images

    if images.pixel_input(model) is None:
        return None, ""
    reason = images.unavailable()
    if reason:
        return None, f" (no sample images: {reason})"
    try:
        return images.feeds(model, split=split), ""
    except ValueError as e:
        return None, f" (no sample images: {e})"


def task_metric_for(model: ir.Model, input_source: str) -> Callable[..., Any] | None:
    """The model spec's task metric (perplexity, embedding cosine, ...) when the validation
    feeds are that recipe's real texts (see :func:`validation_feeds`), else None."""
    from graphc.checks import images

    from graphc.checks import default_text

    if input_source.startswith(images.SOURCE_PREFIX):
        return images.task_metric
    if default_text.task_for(model, input_source) is not None:
        return default_text.task_for(model, input_source)
    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    if not name or not input_source.startswith(f"{name}: "):
        return None
    from graphc.models import get_model_spec

    return get_model_spec(name).task_metric


def calibration_context(model: ir.Model, count: int = 32, shapes: dict | None = None, model_path=None) -> PassContext:
    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    if name:
        try:
            from graphc.models import get_model_spec

            recipe = get_model_spec(name)
            texts = recipe.eval_texts(min(count, recipe.calibration_max_texts), split="calibration")
            feeds = complete_decoder_feeds(model, recipe.feeds(
                texts, batch=recipe.calibration_batch or recipe.validation_batch,
                max_length=recipe.calibration_length)[: recipe.calibration_max_feeds])
            if _fits(model, feeds):
                return PassContext(calibration=feeds, calibration_source=f"{name}: {len(texts)} calibration texts")
        except (ImportError, GraphcError):
            pass
    if not shapes:
        from graphc.checks.default_text import text_feeds

        text = text_feeds(model, model_path, "calibration", count)
        if text is not None:
            return PassContext(calibration=text[0], calibration_source=text[1])
    image_feeds, _ = _image_feeds(model, "calibration") if not shapes else (None, "")
    if image_feeds is not None:
        return PassContext(calibration=image_feeds[0], calibration_source=image_feeds[1])
    return PassContext(calibration=synthesize_inputs(model, count=4, seed=1, shapes=shapes),
                       calibration_source="synthesized")

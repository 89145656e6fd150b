"""Real images for vision models: validation and calibration feeds cut from scikit-learn's two
sample photos, and the task figure compared on them (top-1 agreement for a classifier, the
embedding's cosine otherwise).

A model is a vision model when its metadata says so (``graphc.arch.modality = vision``, written
by ``graphc export``) and it takes ``pixel_values`` [batch, channels, H, W] with static
channels, H and W. Pixels are normalized with the mean and std the exporter found in the
folder's ``preprocessor_config.json`` (``graphc.image.mean`` / ``.std``), else 0.5 / 0.5
(ViT's processor default). Decoding the JPEGs needs Pillow; without it (or scikit-learn) the
caller falls back to synthesized inputs and says why.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.core import ops

SOURCE_PREFIX = "images: "
MEAN_KEY = "graphc.image.mean"
STD_KEY = "graphc.image.std"
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
_SIDES = (1.0, 0.75, 0.56)  # crop side as a fraction of the photo's height
_POSITIONS = (0.0, 0.35, 0.7, 1.0)  # where the crop sits along the width


def pixel_input(model: ir.Model) -> ir.Value | None:
    """The ``pixel_values`` input of a vision model with static [C, H, W], else None."""
    if model.metadata_props.get(f"{ops.META_ARCH_PREFIX}modality") != "vision":
        return None
    for value in model.graph.inputs:
        shape = value.shape
        if value.name == "pixel_values" and shape is not None and len(shape) == 4 and all(
                isinstance(d, int) for d in shape[1:]):
            return value
    return None


def unavailable() -> str | None:
    """Why the sample images cannot be read here, or None when they can."""
    try:
        import PIL  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def feeds(model: ir.Model, *, split: str = "validation", batch: int = 8) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds of normalized crops of the sample photos at the model's input size, ``batch``
    images a feed. ``split`` "calibration" uses the mirrored photos at other crop positions,
    so that calibration and validation see different pixels."""
    value = pixel_input(model)
    if value is None:
        raise ValueError("not a vision model with a static pixel_values input")
    channels, height, width = (int(d) for d in value.shape[1:])
    crops = _crops(height, width, split == "calibration")
    if channels != 3:
        raise ValueError(f"pixel_values has {channels} channels; the sample photos have 3")
    mean = _floats(model.metadata_props.get(MEAN_KEY), DEFAULT_MEAN)
    std = _floats(model.metadata_props.get(STD_KEY), DEFAULT_STD)
    pixels = ((crops - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(0, 3, 1, 2)
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    out = [{value.name: pixels[i:i + batch]} for i in range(0, len(pixels), batch)]
    mirrored = " (mirrored)" if split == "calibration" else ""
    return out, f"{SOURCE_PREFIX}{len(pixels)} crops of scikit-learn's 2 sample photos{mirrored}"


def task_metric(feeds_: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]],
                outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any] | None:
    """Top-1 agreement on ``logits``; else the cosine of the image embedding (``image_embeds``,
    ``pooler_output``, or the first token of ``last_hidden_state``), rewritten vs original,
    image by image."""
    from graphc.checks import measure

    if not reference or not outputs:
        return None
    first = reference[0]
    if "logits" in first:
        ref = np.concatenate([r["logits"].reshape(len(r["logits"]), -1) for r in reference])
        got = np.concatenate([o["logits"].reshape(len(o["logits"]), -1) for o in outputs])
        agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        return {"metric": "top1_agreement", "value": round(agree, 6), "images": int(len(ref))}
    name = next((n for n in ("image_embeds", "pooler_output", "last_hidden_state") if n in first), None)
    if name is None:
        return None

    def embed(out: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(out[name], dtype=np.float32)
        return x[:, 0] if x.ndim == 3 else x.reshape(len(x), -1)

    stats = measure.cosine_stats(np.concatenate([embed(o) for o in outputs]),
                                 np.concatenate([embed(r) for r in reference]))
    return {"metric": "embedding_cosine", "of": name if name != "last_hidden_state" else "last_hidden_state[:, 0]",
            "mean": round(stats.mean, 6), "min": round(stats.min, 6), "images": stats.count}


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(img) for img in load_sample_images().images)


def _crops(height: int, width: int, mirrored: bool) -> np.ndarray:
    """[N, height, width, 3] floats in [0, 1]: square crops at several sizes and positions."""
    from PIL import Image

    positions = tuple(1.0 - p for p in _POSITIONS) if mirrored else _POSITIONS
    out = []
    for photo in _photos():
        photo = photo[:, ::-1] if mirrored else photo
        h, w = photo.shape[:2]
        for frac in _SIDES:
            side = int(round(min(h, w) * frac))
            top = (h - side) // 2
            for pos in positions:
                left = int(round((w - side) * (0.15 + 0.7 * pos) if mirrored else (w - side) * pos))
                crop = Image.fromarray(np.ascontiguousarray(photo[top:top + side, left:left + side]))
                out.append(np.asarray(crop.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0)
    return np.stack(out)


def _floats(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    if not text:
        return default
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        return default
    return values if len(values) == 3 else default

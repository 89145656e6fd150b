"""The user's images as feeds (``--calibration-data FOLDER`` of images, ``--preprocess SPEC``).

An image model is one with a float input [N, C, H, W] (or [N, H, W, C]) with C of 1 or 3:
``pixel_values`` of a vision model exported by graphc, or the one such input of any model.
Each image is decoded with Pillow, converted to RGB (or L for one channel), its shorter side
resized to ``resize`` (default: the crop's longer side, so the crop keeps the whole shorter side),
center-cropped to H×W, scaled to [0, 1], normalized with ``mean`` and ``std``, and laid out
as the model's input wants.

``--preprocess`` is ``key=value`` pairs separated by commas; a value of several numbers keeps
its commas (``mean=0.485,0.456,0.406``). Keys: ``size`` (H×W, or one side for a square; needed
only when the model leaves H and W free, and must agree where it fixes them), ``resize``,
``mean`` and ``std`` (1 or C numbers, on the [0, 1] scale; defaults: the model's
``graphc.image.mean``/``.std`` metadata, else 0.5 as ViT's processor), ``layout`` (NCHW or
NHWC; default read from the input's shape), ``color`` (rgb, bgr or gray).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphc.core.errors import CalibrationDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_KEYS = ("size", "resize", "mean", "std", "layout", "color")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes pixels; every field None means "from the model" (see the module)."""

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    color: str | None = None


def parse_preprocess(spec: str | None) -> Preprocess:
    """``"size=224,mean=0.485,0.456,0.406,layout=NCHW"`` → :class:`Preprocess`; a spec that
    does not parse is a one-line error quoting it."""
    if not spec:
        return Preprocess()
    values: dict[str, list[str]] = {}
    key = None
    for part in (p.strip() for p in spec.split(",")):
        name, sep, value = part.partition("=")
        if sep:
            key = name.strip().lower()
            if key not in _KEYS:
                raise _bad(spec, f"unknown key {name.strip()!r} (keys: {', '.join(_KEYS)})")
            if key in values:
                raise _bad(spec, f"{key} given twice")
            values[key] = [value.strip()]
        elif key is None or not part:
            raise _bad(spec, f"{part!r} is not key=value")
        else:
            values[key].append(part)
    fields: dict = {}
    for key, items in values.items():
        if key in ("mean", "std"):
            fields[key] = _numbers(spec, key, items)
        elif len(items) != 1:
            raise _bad(spec, f"{key} takes one value, not {len(items)}")
        elif key == "size":
            dims = re.fullmatch(r"(\d+)(?:[x×](\d+))?", items[0].lower())
            if not dims or int(dims[1]) == 0 or (dims[2] is not None and int(dims[2]) == 0):
                raise _bad(spec, f"size {items[0]!r} is not H, or HxW, in positive pixels")
            fields[key] = (int(dims[1]), int(dims[2] or dims[1]))
        elif key == "resize":
            if not items[0].isdigit() or int(items[0]) == 0:
                raise _bad(spec, f"resize {items[0]!r} is not a positive number of pixels")
            fields[key] = int(items[0])
        elif key == "layout":
            if items[0].upper() not in ("NCHW", "NHWC"):
                raise _bad(spec, f"layout {items[0]!r}: NCHW or NHWC")
            fields[key] = items[0].upper()
        else:
            if items[0].lower() not in ("rgb", "bgr", "gray"):
                raise _bad(spec, f"color {items[0]!r}: rgb, bgr or gray")
            fields[key] = items[0].lower()
    return Preprocess(**fields)


def _bad(spec: str, problem: str) -> CalibrationDataError:
    return CalibrationDataError(f"--preprocess {spec!r}: {problem}")


def _numbers(spec: str, key: str, items: list[str]) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in items)
    except ValueError:
        raise _bad(spec, f"{key} {','.join(items)!r} is not a list of numbers") from None
    if len(values) not in (1, 3) or (key == "std" and any(v <= 0 for v in values)):
        raise _bad(spec, f"{key} takes 1 or 3 numbers" + (", all positive" if key == "std" else ""))
    return values


def image_input(model: ir.Model) -> tuple[ir.Value, str] | None:
    """The model's image input and its layout (NCHW/NHWC), or None when it has none."""
    from graphc.checks import images

    pixel = images.pixel_input(model)
    if pixel is not None:
        return pixel, "NCHW"
    found = []
    for value in model.graph.inputs:
        shape = value.shape
        if value.name in model.graph.initializers or value.dtype not in _FLOATS or shape is None or len(shape) != 4:
            continue
        if shape[1] in (1, 3):
            found.append((value, "NCHW"))
        elif shape[3] in (1, 3):
            found.append((value, "NHWC"))
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Plan:
    """The resolved preprocessing for one model: what every image becomes."""

    name: str
    layout: str
    channels: int
    height: int
    width: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color: str
    dtype: type
    defaults: tuple[str, ...]  # the fields that took a default (said in the source text)

    def describe(self) -> str:
        said = lambda vals: ",".join(f"{v:g}" for v in vals)  # noqa: E731
        default = f"; {', '.join(self.defaults)}" if self.defaults else ""
        return (f"{self.height}x{self.width}, resize {self.resize}, mean {said(self.mean)}, std {said(self.std)}, "
                f"{self.color}, {self.layout}{default}")


def plan(model: ir.Model, spec: Preprocess, where: Path) -> Plan:
    """The preprocessing of ``spec`` completed from the model's input and metadata."""
    from graphc.checks import images

    found = image_input(model)
    if found is None:
        raise CalibrationDataError("images need a model with one image input [N, 3, H, W] or [N, H, W, 3]; this "
                                   f"one takes {_inputs_text(model)}", path=where)
    value, layout = found
    layout = spec.layout or layout
    dims = list(value.shape)
    c_axis, h_axis = (1, 2) if layout == "NCHW" else (3, 1)
    channels = dims[c_axis] if isinstance(dims[c_axis], int) else 3
    if channels not in (1, 3):
        raise CalibrationDataError(f"input {value.name!r} has {channels} channels in layout {layout}; images give 1 or 3",
                                   path=where)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims[h_axis:h_axis + 2]]
    if spec.size is not None and any(f is not None and f != s for f, s in zip(fixed, spec.size)):
        raise CalibrationDataError(f"--preprocess size={spec.size[0]}x{spec.size[1]}, but input {value.name!r} is fixed "
                                   f"at {'x'.join(str(f or '?') for f in fixed)}", path=where)
    size = spec.size or (tuple(fixed) if None not in fixed else None)
    if size is None:
        raise CalibrationDataError(f"input {value.name!r} leaves H and W free: give --preprocess size=HxW", path=where)
    defaults = []  # said in the source text: a guessed normalization is worth knowing about
    mean, std = spec.mean, spec.std
    for key, given, meta, default in (("mean", mean, images.MEAN_KEY, images.DEFAULT_MEAN),
                                      ("std", std, images.STD_KEY, images.DEFAULT_STD)):
        if given is None:
            numbers = images._floats(model.metadata_props.get(meta), default)
            mean, std = (numbers, std) if key == "mean" else (mean, numbers)
            defaults.append(f"{key} from the model's metadata" if meta in model.metadata_props
                            else f"{key} not given: ViT's 0.5")
    color = spec.color or ("gray" if channels == 1 else "rgb")
    if (color == "gray") != (channels == 1):
        raise CalibrationDataError(f"--preprocess color={color}, but input {value.name!r} has {channels} channel(s)",
                                   path=where)
    mean, std = (tuple(v) * channels if len(v) == 1 else tuple(v) for v in (mean, std))
    if len(mean) != channels or len(std) != channels:
        raise CalibrationDataError(f"mean and std need {channels} value(s) for input {value.name!r}", path=where)
    np_dtype = {ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}.get(value.dtype, np.float32)
    return Plan(value.name, layout, channels, size[0], size[1], spec.resize or max(size), mean, std, color,
                np_dtype, tuple(defaults))


def _inputs_text(model: ir.Model) -> str:
    return ", ".join(f"{v.name} {list(v.shape) if v.shape is not None else '?'}" for v in model.graph.inputs
                     if v.name not in model.graph.initializers) or "no inputs"


def _pil():
    try:
        from PIL import Image
    except ImportError:
        from graphc.core.errors import MissingDependencyError

        raise MissingDependencyError("reading images needs Pillow (pip install pillow)") from None
    return Image


def check_header(path: Path) -> None:
    """A file Pillow cannot identify as an image is a one-line error (the pixels are read later)."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
        raise CalibrationDataError(f"cannot read as an image: {type(e).__name__}: {e}", path=path) from None


def decode(path: Path, p: Plan) -> np.ndarray:
    """One image file → [C, H, W] or [H, W, C] pixels, normalized; a file Pillow cannot
    decode is a one-line error naming it."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img = img.convert("L" if p.color == "gray" else "RGB")
            w, h = img.size
            scale = p.resize / min(w, h)
            rw, rh = max(p.width, round(w * scale)), max(p.height, round(h * scale))
            img = img.resize((rw, rh), Image.BILINEAR)
            left, top = (rw - p.width) // 2, (rh - p.height) // 2
            img = img.crop((left, top, left + p.width, top + p.height))
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
        raise CalibrationDataError(f"cannot read as an image: {type(e).__name__}: {e}", path=path) from None
    pixels = pixels.reshape(p.height, p.width, p.channels)
    if p.color == "bgr":
        pixels = pixels[..., ::-1]
    pixels = (pixels - np.array(p.mean, np.float32)) / np.array(p.std, np.float32)
    return pixels.transpose(2, 0, 1) if p.layout == "NCHW" else pixels


def feeds(files: Sequence[Path], p: Plan, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Feeds of ``batch`` images each, in the order given."""
    pixels = [decode(f, p) for f in files]
    return [{p.name: np.ascontiguousarray(np.stack(pixels[i:i + batch]), dtype=p.dtype)}
            for i in range(0, len(pixels), batch)]

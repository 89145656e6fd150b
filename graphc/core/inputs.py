"""The user's inputs: feed files (``--inputs``) and fixed dims for synthesized inputs
(``--input-shape``).

``--inputs`` takes:

- an ``.npz`` file: one feed whose arrays are named after the model's inputs, or several
  feeds under keys ``0/NAME``, ``1/NAME``, ... (``np.savez(f, **{"0/x": a, "1/x": b})``);
- an ``.npy`` file: the one input of a single-input model;
- a folder: ``NAME.npy`` files (one feed), or ``.npz`` files (one or more feeds each, read
  in name order).

Every problem is a one-line :class:`~graphc.core.errors.InputsError` naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphc.core.errors import InputsError

Feed = dict[str, np.ndarray]


def parse_input_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,48,320", ...]`` → ``{"x": (1, 3, 48, 320)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.rpartition("=")
        try:
            parsed = tuple(int(d) for d in re.split(r"[,x]", dims.strip()))
        except ValueError:
            parsed = ()
        if not sep or not name or not parsed or any(d <= 0 for d in parsed):
            raise InputsError(f"--input-shape {item!r}: expected NAME=D1,D2,... with positive dims (e.g. x=1,3,48,320)")
        shapes[name] = parsed
    return shapes


def check_input_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Each named input exists and has the rank the model declares; fixed dims agree."""
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputsError(f"--input-shape names {name!r}, which is not a model input "
                              f"(inputs: {', '.join(inputs) or 'none'})")
        declared = inputs[name].shape
        if declared is None:
            continue
        if len(declared) != len(dims):
            raise InputsError(f"--input-shape {name}: {len(dims)} dims given, the model's input has {len(declared)}")
        for i, (d, want) in enumerate(zip(declared, dims)):
            if isinstance(d, int) and d >= 0 and d != want:
                raise InputsError(f"--input-shape {name}: dim {i} is fixed at {d} in the model, {want} given")


def _read_npz(path: Path) -> list[Feed]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - zipfile, pickle refusals, truncation
        raise InputsError(f"cannot read as .npz: {type(e).__name__}: {e}", path=path) from None
    if not arrays:
        raise InputsError("holds no arrays", path=path)
    indexed = [k for k in arrays if "/" in k]
    if indexed:
        if len(indexed) != len(arrays):
            raise InputsError("mixes per-feed keys (N/NAME) and plain names", path=path)
        feeds: dict[int, Feed] = {}
        for key, value in arrays.items():
            index, _, name = key.partition("/")
            if not index.isdigit() or not name:
                raise InputsError(f"key {key!r}: per-feed keys are N/NAME with N a feed number", path=path)
            feeds.setdefault(int(index), {})[name] = value
        return [feeds[i] for i in sorted(feeds)]
    return [arrays]


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise InputsError(f"cannot read as .npy: {type(e).__name__}: {e}", path=path) from None


def read_feeds(path: str | os.PathLike, model: ir.Model) -> list[Feed]:
    """The feeds in ``path`` (see the module docstring), checked against the model's inputs."""
    path = Path(path)
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    if not path.exists():
        raise InputsError("no such file or folder", path=path)
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        npy = sorted(path.glob("*.npy"))
        if npz and npy:
            raise InputsError("holds both .npz and .npy files; give one kind", path=path)
        if npz:
            feeds = [feed for f in npz for feed in _read_npz(f)]
        elif npy:
            feeds = [{f.stem: _read_npy(f) for f in npy}]
        else:
            raise InputsError("holds no .npz or .npy files", path=path)
    elif path.suffix == ".npz":
        feeds = _read_npz(path)
    elif path.suffix == ".npy":
        if len(inputs) != 1:
            raise InputsError(f"one .npy array fits a model with one input; this one has {len(inputs)} "
                              f"({', '.join(v.name for v in inputs)}): use an .npz or a folder of NAME.npy", path=path)
        feeds = [{inputs[0].name: _read_npy(path)}]
    else:
        raise InputsError("expected an .npz file, an .npy file or a folder of them", path=path)
    for feed in feeds:
        check_feed(feed, inputs, path)
    return feeds


_DTYPES = {
    ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8, ir.DataType.BOOL: np.bool_,
}


def check_feed(feed: Feed, inputs: Sequence[ir.Value], path: Path) -> None:
    """Names, ranks, fixed dims and dtypes of one feed against the model's inputs. An array
    whose dtype differs only in width (float64 for float32, int32 for int64) is cast."""
    names = {v.name for v in inputs}
    extra = sorted(set(feed) - names)
    if extra:
        raise InputsError(f"array {extra[0]!r} is not a model input (inputs: {', '.join(sorted(names))})", path=path)
    missing = [v.name for v in inputs if v.name not in feed]
    if missing:
        raise InputsError(f"no array for input {missing[0]!r}", path=path)
    for value in inputs:
        array = feed[value.name]
        want = _DTYPES.get(value.dtype) if value.dtype is not None else None
        if want is not None and array.dtype != want:
            same_kind = (np.issubdtype(array.dtype, np.floating) and np.issubdtype(want, np.floating)) or (
                np.issubdtype(array.dtype, np.integer) and np.issubdtype(want, np.integer))
            if not same_kind:
                raise InputsError(f"input {value.name!r} is {array.dtype}, the model takes {np.dtype(want)}", path=path)
            feed[value.name] = array = array.astype(want)
        shape = value.shape
        if shape is None:
            continue
        if array.ndim != len(shape):
            raise InputsError(f"input {value.name!r} has {array.ndim} dims {list(array.shape)}, the model takes "
                              f"{len(shape)}", path=path)
        for i, d in enumerate(shape):
            if isinstance(d, int) and d >= 0 and array.shape[i] != d:
                raise InputsError(f"input {value.name!r} dim {i} is {array.shape[i]}, the model fixes it at {d}",
                                  path=path)


def describe(path: str | os.PathLike, feeds: Sequence[Feed]) -> str:
    """The input source as validation reports it."""
    return f"the user's inputs ({Path(path).name}: {len(feeds)} feed{'s' if len(feeds) != 1 else ''})"

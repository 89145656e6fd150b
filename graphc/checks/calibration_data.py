"""The user's calibration data (``--calibration-data PATH``): texts or images, split into a
calibration part and a held-out validation part, fed to the model's own inputs, and judged
with the task metric that fits the model.

PATH is one of:

- a ``.txt`` file: every non-empty line is one text (surrounding whitespace stripped; UTF-8);
- a ``.jsonl`` file (JSON Lines, as ``datasets``' ``to_json`` writes them): every non-empty line
  is one text, a JSON string or an object whose ``"text"`` field (else its only string field) is
  the text; a text may hold line breaks (a paragraph, a document);
- a folder of ``.txt`` / ``.jsonl`` files: their texts, the files in name order;
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``), in name order.

Lines, not paragraphs: a line is the unit every tool writes and every user can count, and a
causal LM sees the texts joined again anyway (graphc.checks.text_data). Items that repeat are kept
once; then every 4th item (the 4th, 8th, ...) is held out for validation and the rest
calibrates, so the two parts never share an item and the same PATH always splits the same
way (``graphc validate`` with the same PATH compares on the same held-out items). At least
:data:`MIN_ITEMS` distinct items are needed.

Texts are tokenized with the model's tokenizer (graphc.checks.text_data); images are preprocessed as
``--preprocess`` says (graphc.checks.image_data). Task metric on the held-out part: perplexity rise for
a causal LM, sentence-embedding cosine for a text encoder, top-1 agreement or image-embedding
cosine for an image model (graphc.checks.images.task_metric); a model spec's own metric where the
model has a recipe. Every problem is a one-line :class:`CalibrationDataError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import CalibrationDataError

HOLD_OUT_EVERY = 4  # every 4th item is validation
MIN_ITEMS = 8  # distinct items: 6 calibrate, 2 validate
VALIDATION_ITEMS = 64  # at most, as many as validation takes of a model spec's texts
MAX_LENGTH = 128  # tokens: the longest text (encoders) or window (causal LMs) fed
TEXT, IMAGES = "texts", "images"
TEXT_SUFFIXES = (".txt", ".jsonl")
JSONL_FIELD = "text"  # the field of a JSON Lines object that holds its text


@dataclass
class CalibrationData:
    """Feeds and the words every output says about them."""

    kind: str  # TEXT or IMAGES
    calibration: list[dict[str, np.ndarray]]
    validation: list[dict[str, np.ndarray]]
    calibration_source: str
    validation_source: str
    task: Callable[..., Any] | None
    calibration_items: list[str]  # what calibrated / was held out (texts, or image file names)
    validation_items: list[str]


def check_options(calibration_data: Any, *, inputs: Any = None, feeds: Any = None, tokenizer: Any = None,
                  preprocess: Any = None) -> None:
    """Flags that do not go together, refused before any work. ``--inputs`` with
    ``--calibration-data`` is refused: the held-out split is what keeps validation honest, and
    graphc cannot tell whether the user's tensors came from the same texts."""
    if calibration_data is None:
        given = ["--tokenizer"] * (tokenizer is not None) + ["--preprocess"] * (preprocess is not None)
        if given:
            raise CalibrationDataError(f"{given[0]} goes with --calibration-data, which was not given")
        return
    if inputs is not None or feeds is not None:
        raise CalibrationDataError("give --calibration-data or --inputs, not both (--calibration-data holds out its "
                                   "own validation part)", path=os.fspath(calibration_data))


def load(model: ir.Model, path: str | os.PathLike, *, model_path: Path | None = None, tokenizer: Any = None,
         preprocess: str | None = None, calibration_count: int = 32,
         validation_count: int = VALIDATION_ITEMS) -> CalibrationData:
    """Read, split and feed ``path`` for ``model`` (see the module docstring).
    ``calibration_count``: items the passes want (0: validation only, e.g. graphc validate)."""
    from graphc.checks import image_data

    path = Path(path)
    kind, files = _files(path)
    spec = image_data.parse_preprocess(preprocess) if preprocess is not None else None
    if kind == TEXT and spec is not None:
        raise CalibrationDataError("--preprocess applies to images; this is text", path=path)
    if kind == IMAGES and tokenizer is not None:
        raise CalibrationDataError("--tokenizer applies to texts; this is a folder of images", path=path)
    name = path.name or os.fspath(path)
    if kind == TEXT:
        from graphc.checks import text_data

        text_data.check_text_model(model, path)
        items, dropped = _texts(files)
    else:
        plan = image_data.plan(model, spec or image_data.Preprocess(), path)
        items, dropped = _images(files)
    if len(items) < MIN_ITEMS:
        raise CalibrationDataError(f"{len(items)} distinct {kind}; at least {MIN_ITEMS} are needed "
                                   f"(every {HOLD_OUT_EVERY}th is held out for validation)", path=path)
    cal_items = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1][:calibration_count]
    val_items = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1][:validation_count]
    dupes = f"; {dropped} repeated {kind} left out" if dropped else ""
    split = f"every {HOLD_OUT_EVERY}th {kind[:-1]} of {name}, held out from calibration{dupes}"
    if kind == TEXT:
        (cal, cal_rows), (val, val_rows), where, task = _text_feeds(model, model_path, tokenizer, cal_items, val_items, path)
        cal_source = f"{len(cal_items)} texts of {name} ({_extent(model, cal, cal_rows)}tokenizer: {where}){dupes}"
        split = f"{_extent(model, val, val_rows)}{split}"
    else:
        from graphc.checks import images

        cal = image_data.feeds(cal_items, plan) if cal_items else []
        val = image_data.feeds(val_items, plan)
        task = images.task_metric
        cal_source = f"{len(cal_items)} images of {name} ({plan.describe()}){dupes}"
    return CalibrationData(kind, cal, val, cal_source, f"{len(val_items)} held-out {kind} ({split})", task,
                           [_label(x) for x in cal_items], [_label(x) for x in val_items])


def _label(item: str | Path) -> str:
    return item.name if isinstance(item, Path) else item


def _files(path: Path) -> tuple[str, list[Path]]:
    from graphc.checks.image_data import IMAGE_SUFFIXES

    if not path.exists():
        raise CalibrationDataError("no such file or folder", path=path)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise CalibrationDataError("expected a .txt or .jsonl file, a folder of them or a folder of images", path=path)
        return TEXT, [path]
    if not path.is_dir():
        raise CalibrationDataError("not a file or a folder", path=path)
    entries = sorted(p for p in path.iterdir() if p.is_file())
    texts = [p for p in entries if p.suffix.lower() in TEXT_SUFFIXES]
    pictures = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    if texts and pictures:
        raise CalibrationDataError(f"holds both text files and images ({texts[0].name}, {pictures[0].name}): give one kind",
                                   path=path)
    if not texts and not pictures:
        raise CalibrationDataError(f"holds no .txt/.jsonl files or images ({', '.join(IMAGE_SUFFIXES)})", path=path)
    return (TEXT, texts) if texts else (IMAGES, pictures)


def _texts(files: Sequence[Path]) -> tuple[list[str], int]:
    """The distinct non-empty lines in order, and how many repeats were left out; a file that is
    not UTF-8 text is an error."""
    seen: dict[str, None] = {}
    total = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise CalibrationDataError(f"cannot read: {e.strerror or e}", path=f) from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise CalibrationDataError(f"not UTF-8 text (line {line}, byte {e.start}): save it as UTF-8", path=f) from None
        if "\x00" in text:
            raise CalibrationDataError("not text (holds NUL bytes)", path=f)
        items = _json_lines(text, f) if f.suffix.lower() == ".jsonl" else text.splitlines()
        for item in items:
            if item.strip():
                seen.setdefault(item.strip(), None)
                total += 1
    if not seen:
        raise CalibrationDataError("holds no text (every line is empty)", path=files[0] if len(files) == 1 else None)
    return list(seen), total - len(seen)


def _json_lines(text: str, f: Path) -> list[str]:
    """The texts of a JSON Lines file: each non-empty line a JSON string, or an object whose
    "text" field (else its only string field) is the text."""
    import json

    out = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise CalibrationDataError(f"line {number} is not JSON ({e.msg}): one JSON value a line", path=f) from None
        if isinstance(item, dict):
            strings = [k for k, v in item.items() if isinstance(v, str)]
            key = JSONL_FIELD if JSONL_FIELD in item else strings[0] if len(strings) == 1 else None
            if key is None or not isinstance(item[key], str):
                fields = ", ".join(repr(k) for k in list(item)[:8]) or "none"
                raise CalibrationDataError(f"line {number}: an object without a string {JSONL_FIELD!r} field "
                                           f"(fields: {fields})", path=f)
            item = item[key]
        if not isinstance(item, str):
            raise CalibrationDataError(f"line {number}: a JSON {type(item).__name__}, not a text or an object "
                                       f"with a {JSONL_FIELD!r} field", path=f)
        out.append(item)
    return out


def _images(files: Sequence[Path]) -> tuple[list[Path], int]:
    """The image files whose bytes differ, in order, and how many repeats were left out. Every
    file's header is checked here, so that a file that is not an image is refused whether or
    not it is used."""
    from graphc.checks.image_data import check_header

    seen: dict[str, Path] = {}
    for f in files:
        try:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
        except OSError as e:
            raise CalibrationDataError(f"cannot read: {e.strerror or e}", path=f) from None
        check_header(f)
        seen.setdefault(digest, f)
    return list(seen.values()), len(files) - len(seen)


def _text_feeds(model: ir.Model, model_path: Path | None, tokenizer: Any, cal_texts: list[str], val_texts: list[str],
                path: Path):
    """((calibration feeds, rows before a cap), (validation feeds, rows), where the tokenizer came
    from, task metric): the model spec's batching, feed caps and task metric when the model has
    one, else graphc.checks.text_data's."""
    from graphc.checks import text_data

    model_name = os.fspath(model_path) if model_path is not None else (model.graph.name or "the model")
    tok, where = text_data.find_tokenizer(model, model_path, tokenizer, model_name)
    recipe = _recipe(model)
    task = recipe.task_metric if recipe is not None else text_data.text_task(model)
    causal = text_data.is_causal_lm(model)
    cal_batch = (recipe.calibration_batch or recipe.validation_batch) if recipe else (4 if causal else 16)
    cal_length = recipe.calibration_length if recipe else MAX_LENGTH
    val_batch = recipe.validation_batch if recipe else (4 if causal else 16)
    cal = text_data.text_feeds(model, tok, cal_texts, batch=cal_batch, max_length=cal_length, where=path) \
        if cal_texts else []
    val = text_data.text_feeds(model, tok, val_texts, batch=val_batch, max_length=MAX_LENGTH, where=path)
    rows = [sum(len(f["input_ids"]) for f in feeds) for feeds in (cal, val)]
    if recipe is not None:
        cal, val = cal[:recipe.calibration_max_feeds], val[:max(recipe.validation_max_feeds, 1)]
    return (cal, rows[0]), (val, rows[1]), where, task


def _extent(model: ir.Model, feeds: list[dict[str, np.ndarray]], made: int) -> str:
    """What of the texts the feeds hold: a causal LM's windows, and the part a model spec's
    feed cap kept of the ``made`` rows (texts or windows)."""
    from graphc.checks.text_data import is_causal_lm

    rows = sum(len(f["input_ids"]) for f in feeds)
    longest = max((f["input_ids"].shape[1] for f in feeds), default=0)
    kept = f"the first {rows} of {made}" if rows < made else str(rows)
    if is_causal_lm(model):
        return f"{kept} window{'s' if made != 1 else ''} of up to {longest} tokens; "
    return f"{kept} texts fed; " if rows < made else ""


def _recipe(model: ir.Model):
    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    if not name:
        return None
    try:
        from graphc.models import get_model_spec

        return get_model_spec(name)
    except Exception:  # noqa: BLE001 - an unknown recipe name: the generic batching
        return None

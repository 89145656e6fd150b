"""Pass-manager instruments: hooks that run around every pass (MLIR/TVM style)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphc.core import io
from graphc.core.errors import SaveError
from graphc.core.manager import PassRecord
from graphc.checks.validate import compare


class NumericCheck:
    """After each pass that changed the model, compare it with the original's outputs."""

    def __init__(self, feeds: Sequence[dict], reference: list[list[np.ndarray]]) -> None:
        self.feeds = feeds
        self.reference = reference

    def after_pass(self, pass_, model: ir.Model, record: PassRecord) -> None:
        if not record.modified:
            return
        report = compare(None, model, self.feeds, reference_outputs=self.reference)
        record.check = {"min_cosine": round(report.min_cosine, 7), "max_abs": round(report.max_abs, 7)}


class DumpIR:
    """Write the model after each pass that changed it: ``DIR/NN-pass-name.onnx``.

    Each file is a complete, valid ONNX model (external data beside it when large), so it
    opens in Netron and in ONNX Runtime. ``NN`` is the step's position in the pipeline.

    Dump files are only ever created, never replacing a file (graphc.core.outputs checks the
    names before the run; the save itself refuses a name that appeared since), and never
    one of ``forbid`` (the input's files).
    """

    def __init__(self, directory: str | Path, forbid: tuple[Path, ...] = ()) -> None:
        self.directory = Path(directory)
        self.forbid = tuple(forbid)
        self.step = 0
        self.written: list[Path] = []
        if self.directory.exists() and not self.directory.is_dir():
            raise SaveError("--dump-dir exists and is not a directory", path=self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def before_pass(self, pass_, model: ir.Model) -> None:
        self.step += 1

    def after_pass(self, pass_, model: ir.Model, record: PassRecord) -> None:
        if not record.modified:
            return
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", pass_.name)
        path = self.directory / f"{self.step:02d}-{safe}.onnx"
        with io.inline_external_data(model):
            self.written.extend(io.save_model(model, path, forbid=self.forbid, must_be_new=True))

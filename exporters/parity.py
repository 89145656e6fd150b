"""Parity of an exported graph with the PyTorch module it came from, checked at export.

The exported model runs in ONNX Runtime on feeds of another shape than the traced example
(so that the dynamic axes are exercised, with one padded row for text), and every output is
compared with PyTorch's: the largest absolute difference relative to the output's scale, and
the cosine over the flattened output. A miss refuses the export.

Token outputs ([B, S, ...] under an ``attention_mask`` of [B, S]) are compared at the real
tokens only: a padded position's output means nothing, and where a local attention window sees
padding alone (ModernBERT's last padded tokens) its softmax row is fully masked, which PyTorch
and ONNX Runtime fill differently.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphc.core.errors import ExportError

if TYPE_CHECKING:
    import onnx_ir as ir

# fp32 export vs eager fp32: only the order of float sums differs (fused kernels, SDPA)
MAX_REL_ABS = 1e-3  # max |onnx - torch| / max(1, max |torch|), per output
MIN_COSINE = 0.99999

TorchRun = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Parity:
    """The worst figures over outputs and feeds (``output``: where the largest error was)."""

    max_abs: float
    rel_abs: float
    cosine: float
    output: str
    feeds: str

    @property
    def ok(self) -> bool:
        return self.rel_abs <= MAX_REL_ABS and self.cosine >= MIN_COSINE

    def to_dict(self) -> dict[str, float | str | bool]:
        return {"max_abs": self.max_abs, "rel_abs": self.rel_abs, "cosine": self.cosine, "output": self.output,
                "feeds": self.feeds, "ok": self.ok}

    def describe(self) -> str:
        return (f"max abs {self.max_abs:.3g} (relative {self.rel_abs:.3g}, bound {MAX_REL_ABS:g}), "
                f"cosine {self.cosine:.7f} (bound {MIN_COSINE}) on {self.output!r}, {self.feeds}")


def check_parity(model: ir.Model, torch_run: TorchRun, feeds: Sequence[Mapping[str, np.ndarray]], *,
                 what: str) -> Parity:
    """Run ``model`` in ORT and ``torch_run`` on each feed; the worst figures over outputs.
    ``what`` says what the feeds are (it lands in the report)."""
    names = [v.name for v in model.graph.outputs]
    worst = (0.0, 0.0, 1.0, names[0] if names else "")
    with _session(model) as session:
        for feed in feeds:
            got = session.run(None, {k: np.ascontiguousarray(v) for k, v in feed.items()})
            ref = list(torch_run(feed))
            if len(ref) != len(got):
                raise ExportError(f"parity: PyTorch gave {len(ref)} outputs, the ONNX graph {len(got)}")
            mask = feed.get("attention_mask")
            for name, r, g in zip(names, ref, got):
                if r.shape != g.shape:
                    raise ExportError(f"parity: output {name!r} has shape {list(g.shape)} in ONNX, "
                                      f"{list(r.shape)} in PyTorch ({what})")
                if mask is not None and r.ndim == 3 and r.shape[:2] == np.shape(mask):
                    real = np.asarray(mask) != 0
                    r, g = r[real], g[real]
                r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
                max_abs = float(np.max(np.abs(r64 - g64))) if r64.size else 0.0
                rel = max_abs / max(1.0, float(np.max(np.abs(r64))) if r64.size else 1.0)
                cos = _cosine(r64, g64)
                if rel > worst[1] or cos < worst[2]:
                    worst = (max(max_abs, worst[0]), max(rel, worst[1]), min(cos, worst[2]), name)
    return Parity(*worst, feeds=what)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if not np.all(np.isfinite(b)):
        return float("nan") if np.all(np.isfinite(a)) else 1.0
    return float(np.dot(a, b) / (na * nb)) if na and nb else 0.0


class _session:
    """An ORT session on the in-memory model, or on a temporary copy when its weights are too
    large to hand over as one protobuf."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self):  # noqa: ANN204
        from graphc.core.io import INLINE_LIMIT, tensor_bytes
        from graphc.core.session import make_session

        if tensor_bytes(self.model) <= INLINE_LIMIT:
            return make_session(self.model, what="exported model")
        import onnx_ir as ir

        from graphc.core.io import ort_ir_version

        self.tmp = tempfile.TemporaryDirectory(prefix=".graphc-parity-")
        path = Path(self.tmp.name) / "model.onnx"
        with ort_ir_version(self.model):
            ir.save(self.model, path, external_data="model.onnx.data")
        return make_session(path, what="exported model")

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()

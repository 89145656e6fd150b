"""Value checks for validation: the budget for synthesized inputs, NaN/inf matching, and
sequence outputs (graphc.checks.validate uses them; kept apart to keep that module short)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphc.core.errors import ValidationError

# Bytes all synthesized inputs of one feed may take (4 feeds are made): declared dims like
# [60000, 60000] or eight symbolic dims would otherwise ask for gigabytes.
SYNTH_BYTES_LIMIT = 256 * 2**20


def check_synth_size(name: str, dims: list[int], dtype, budget: int) -> None:
    """ValidationError (one line, naming the input and its shape) when a synthesized input
    would not fit what is left of :data:`SYNTH_BYTES_LIMIT`."""
    nbytes = math.prod(int(d) for d in dims) * np.dtype(dtype).itemsize  # Python ints: no overflow
    if nbytes > budget:
        raise ValidationError(
            f"cannot synthesize validation input {name!r} of shape {dims} ({np.dtype(dtype).name}, "
            f"{nbytes / 2**20:,.0f} MiB): synthesized inputs of one feed are limited to "
            f"{SYNTH_BYTES_LIMIT // 2**20} MiB; pass feeds through the Python API, or use --no-validate"
        )


def match_nonfinite(r: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """NaN in both at the same place, or the same inf, is no difference: those places are
    zeroed in both (they add nothing to any metric). A NaN or inf facing a number (or a
    different inf) is counted: the caller fails the output."""
    finite_r, finite_g = np.isfinite(r), np.isfinite(g)
    if finite_r.all() and finite_g.all():
        return r, g, 0
    with np.errstate(invalid="ignore"):
        same = ~finite_r & ~finite_g & ((np.isnan(r) & np.isnan(g)) | (r == g))
    bad = int(np.count_nonzero((~finite_r | ~finite_g) & ~same))
    drop = ~(finite_r & finite_g)
    return np.where(drop, 0.0, r), np.where(drop, 0.0, g), bad


def sequence_shapes(value: Any) -> list[tuple[int, ...]] | None:
    """Element shapes of a sequence output; None for anything else."""
    if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
        return [v.shape for v in value]
    return None


class NotComparable(Exception):
    """An output that is neither a tensor nor a sequence of tensors (a map, a sequence of maps)."""


def as_comparable(value: Any, name: str, which: str) -> np.ndarray:
    """A tensor as it is; a sequence of tensors (SequenceConstruct, SplitToSequence) as the
    concatenation of its flattened elements (see :func:`sequence_shapes` for their shapes);
    anything else raises NotComparable."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
        return np.concatenate([np.asarray(v, np.float64).ravel() for v in value]) if value else np.zeros(0)
    kind = "a sequence of maps" if isinstance(value, list) else f"a {type(value).__name__}"
    raise NotComparable(f"output {name!r} is {kind} in the {which} model")

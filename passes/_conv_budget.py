"""Which int8 Conv weights to keep in float so that the model's output error stays within a
budget, measured on calibration data.

Most Conv weights lose nothing visible at int8; a few (a detector's last layers before its
sigmoid map, a first layer reading raw pixels) cost most of the error. The search:

1. all candidate weights quantized at once: within the budget → every one is quantized;
2. otherwise each weight alone (its error on the calibration feeds, everything else as is),
   then the costliest ones go back to float, one at a time, until the *measured* joint error
   of the rest is within the budget (the singles only order the search: joint errors of
   convolutions in one path do not add exactly).

One ONNX Runtime session serves every measurement (the weights are graph inputs:
``_sensitivity.Evaluator``); the error is 1 - cosine of each whole output (the quantity the
validation gate's output cosine bounds), averaged over outputs and feeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from graphc.passes._sensitivity import Evaluator

# an error this small is rounding of identical outputs: quantizing the weight changed nothing
UNCHANGED = 1e-12
MAX_FEEDS = 4  # calibration feeds measured per candidate: the cost is (weights + 2) x this many runs


@dataclass
class Fallback:
    joint_error: float  # measured, every weight not in ``kept`` quantized
    all_error: float  # measured, every candidate quantized
    alone: dict[str, float]  # each weight's error alone (empty when the first check passed)
    kept: list[str]  # initializer names left in float, costliest first


def float_fallback(model: ir.Model, weights: Mapping[str, ir.Value], dequantized: Mapping[str, np.ndarray],
                   feeds: Sequence[dict], max_error: float,
                   report: Callable[[int, int], None] | None = None, always_alone: Sequence[str] = ()) -> Fallback:
    """``weights``: weight name → its value (``.name``, ``.const_value``: an initializer or a
    Constant node's output, in the main graph or a subgraph); ``dequantized``: name → the weight
    as int8 would store it, back in float. ``always_alone``: weights measured alone even when
    the whole set fits (those in If/Loop bodies: an error of exactly 0 says no feed ran them)."""
    layers = [SimpleNamespace(value=v) for v in weights.values()]
    evaluator = Evaluator(model, layers, list(feeds)[:MAX_FEEDS], metric="tensor")
    all_error = evaluator.error(dict(dequantized))
    if all_error <= max_error:
        alone = {n: evaluator.error({n: dequantized[n]}) for n in always_alone if n in dequantized}
        return Fallback(all_error, all_error, alone, [])
    alone = {}
    for i, name in enumerate(dequantized):
        alone[name] = evaluator.error({name: dequantized[name]})
        if report is not None:
            report(i + 1, len(dequantized))
    kept: list[str] = []
    joint = all_error
    for name in sorted(alone, key=lambda n: (-alone[n], n)):
        if joint <= max_error:
            break
        kept.append(name)
        joint = evaluator.error({n: d for n, d in dequantized.items() if n not in kept})
    return Fallback(joint, all_error, alone, kept)


def unreached_note(count: int, what: str, source: str) -> str:
    """The note for weights whose quantization changed no output on the calibration feeds."""
    return (f"{count} {what} in If/Loop bodies quantized unmeasured: no feed of {source} runs their branch "
            "(validation on them neither); give inputs that take every branch")

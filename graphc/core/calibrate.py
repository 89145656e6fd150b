"""Calibration statistics: run the model as it stands in the pipeline on the calibration
feeds and reduce chosen intermediate values, without keeping them all in memory."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphc.core.errors import PassError
from graphc.core.interrupt import run_session  # interruptible, bounded by time_limit
from graphc.core.session import make_session

MIN_CALIBRATION_FEEDS = 1


def exposing_session(model: ir.Model, names: Sequence[str]) -> tuple[object, set[str]]:
    """An ORT session over the model as it stands, with the named intermediate values added
    as outputs; and the names of its inputs (feeds may carry more)."""
    from graphc.core.io import inline_external_data

    with inline_external_data(model):
        proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    session = make_session(proto, what="model during calibration")
    return session, {i.name for i in session.get_inputs()}


def token_rows(out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[tokens, channels] rows of a value; for a [batch, seq, K] value the rows at padded
    positions (``attention_mask`` 0) are left out."""
    if mask is not None and out.ndim == 3 and out.shape[:2] == np.shape(mask):
        return out[np.asarray(mask) != 0]
    return out.reshape(-1, out.shape[-1])


def channel_absmax(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]] | None, *, pass_name: str
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each value over all calibration feeds."""
    if not feeds or len(feeds) < MIN_CALIBRATION_FEEDS:
        raise PassError("needs calibration data, and none was given (pass feeds or use a model spec)", pass_name=pass_name)
    names = [v.name for v in values]
    session, inputs = exposing_session(model, names)
    result: dict[str, np.ndarray] = {}
    for feed in feeds:
        outs = run_session(session, {k: v for k, v in feed.items() if k in inputs}, names)
        for name, out in zip(names, outs):
            amax = np.abs(out.reshape(-1, out.shape[-1])).max(axis=0)
            result[name] = amax if name not in result else np.maximum(result[name], amax)
    return result


class InputMoments:
    """Second moments of one value's last axis over the calibration tokens (padding left out):
    ``gram`` = mean of x x^T [K, K] (float64), ``abs_mean`` = mean |x| per channel [K], and
    ``tokens``, how many rows went in."""

    __slots__ = ("gram", "abs_mean", "tokens")

    def __init__(self, gram: np.ndarray, abs_mean: np.ndarray, tokens: int) -> None:
        self.gram, self.abs_mean, self.tokens = gram, abs_mean, tokens


def input_moments(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]] | None, *, pass_name: str
) -> dict[str, InputMoments]:
    """:class:`InputMoments` of each named value over all calibration feeds; rows at padded
    positions (the feed's ``attention_mask`` is 0) are left out when the value is [batch, seq, K]."""
    if not feeds or len(feeds) < MIN_CALIBRATION_FEEDS:
        raise PassError("needs calibration data, and none was given (pass feeds or use a model spec)", pass_name=pass_name)
    names = sorted({v.name for v in values if v.name})
    session, inputs = exposing_session(model, names)
    grams: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in feeds:
        outs = run_session(session, {k: v for k, v in feed.items() if k in inputs}, names)
        mask = feed.get("attention_mask")
        for name, out in zip(names, outs):
            out = np.asarray(out)
            if out.ndim == 0:
                continue
            rows = token_rows(out, mask).astype(np.float64)
            grams[name] = grams.get(name, 0) + rows.T @ rows
            abs_sums[name] = abs_sums.get(name, 0) + np.abs(rows).sum(axis=0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
    return {
        name: InputMoments(grams[name] / max(counts[name], 1), abs_sums[name] / max(counts[name], 1), counts[name])
        for name in grams
    }

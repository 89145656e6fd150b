"""Calibration statistics: run the model as it stands in the pipeline on the calibration
feeds and reduce chosen intermediate values, without keeping them all in memory."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphc.errors import PassError
from graphc.validate import make_session

MIN_CALIBRATION_FEEDS = 1


def channel_absmax(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]] | None, *, pass_name: str
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each value over all calibration feeds."""
    if not feeds or len(feeds) < MIN_CALIBRATION_FEEDS:
        raise PassError("needs calibration data, and none was given (pass feeds or use a model recipe)", pass_name=pass_name)
    names = [v.name for v in values]
    from graphc.io import inline_external_data

    with inline_external_data(model):
        proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    session = make_session(proto, what="model during calibration")
    inputs = {i.name for i in session.get_inputs()}
    result: dict[str, np.ndarray] = {}
    for feed in feeds:
        outs = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, out in zip(names, outs):
            amax = np.abs(out.reshape(-1, out.shape[-1])).max(axis=0)
            result[name] = amax if name not in result else np.maximum(result[name], amax)
    return result

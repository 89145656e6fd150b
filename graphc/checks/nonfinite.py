"""Where a rewritten model first went non-finite (NaN or ±inf).

When an output of the rewritten model holds NaN or inf where the original's is finite, the
validation gate refuses it; this module names the first tensor, in topological order, that
went non-finite, so the message points at a node instead of at the end of the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def _float_outputs(model: ir.Model) -> list[tuple[str, str]]:
    """(tensor name, op type) of the top-level nodes' float outputs, in topological order."""
    found = []
    for node in model.graph:
        for out in node.outputs:
            if out.name and (out.dtype is None or out.dtype in _FLOAT):
                found.append((out.name, node.op_type))
    return found


def _run_all(model: ir.Model, names: Sequence[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from graphc.core.io import inline_external_data
    from graphc.core.session import make_session

    with inline_external_data(model):
        proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in present)
    session = make_session(proto, what="model")
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(None, {k: v for k, v in feed.items() if k in wanted})
    return dict(zip((o.name for o in session.get_outputs()), values))


def _bad(array: np.ndarray) -> bool:
    a = np.asarray(array)
    return np.issubdtype(a.dtype, np.floating) and not bool(np.all(np.isfinite(a)))


def first_nonfinite(
    rewritten: ir.Model, feed: dict[str, np.ndarray], original: ir.Model | None = None
) -> tuple[str, str] | None:
    """(tensor name, op type) of the first tensor of ``rewritten`` that holds NaN or inf on
    ``feed`` where the same-named tensor of ``original`` (when it has one) is finite; None if
    there is none or the model cannot be run with its intermediates exposed."""
    candidates = _float_outputs(rewritten)
    try:
        got = _run_all(rewritten, [n for n, _ in candidates], feed)
    except Exception:  # noqa: BLE001 - naming the culprit is best effort; the gate already refused
        return None
    ref: dict[str, np.ndarray] = {}
    if original is not None:
        names = {n for n, _ in _float_outputs(original)} & {n for n, _ in candidates}
        try:
            ref = _run_all(original, sorted(names), feed)
        except Exception:  # noqa: BLE001
            ref = {}
    for name, op in candidates:
        if name in got and _bad(got[name]) and not (name in ref and _bad(ref[name])):
            return name, op
    return None

"""ONNX Runtime sessions for in-memory models whose weights exceed protobuf's 2 GB limit.

An ``ir.Model`` is handed to ONNX Runtime as serialized bytes; a protobuf message cannot exceed
2 GB, so a larger model failed with "Failed to serialize proto". Here the large initializers
stay out of the bytes: each is written as an external-data reference (to a location that is
never read) and its array is supplied to the session through
``SessionOptions.add_external_initializers`` (memory-mapped external data stays on disk until
ORT reads it; ONNX Runtime 1.32 copies the arrays while it builds the session). Nothing is
written to disk. ``graphc.core.session`` takes this path for every in-memory model of 64 MiB of
weights or more: it builds much faster than one serialized message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

PROTO_LIMIT = 1_500_000_000  # bytes of initializers above which the bytes path is not tried
MIN_EXTERNAL = 1 << 20  # in-memory initializers smaller than this stay inside the bytes
# (every external-data initializer of the main graph is supplied: the bytes have no folder to
# resolve its location against; external data inside subgraphs is not handled here)

_PLACEHOLDER = "graphc-supplied-by-session-options"
SHAPE_BYTES = 1 << 16  # integer tensors below this stay in the bytes: ONNX Runtime reads shapes at load


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, shape kept (np.ascontiguousarray makes a scalar 1-D)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _integer(tensor: Any) -> bool:
    return np.issubdtype(tensor.dtype.numpy(), np.integer) if tensor.dtype != ir.DataType.STRING else False


def tensor_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def needs_external(model: ir.Model) -> bool:
    return tensor_bytes(model) > PROTO_LIMIT


def weightless_proto(model: ir.Model, *, min_bytes: int | None = None, always: Any = ()) -> tuple[Any, dict[str, np.ndarray]]:
    """The model's protobuf with each main-graph initializer of at least ``min_bytes`` (default
    :data:`MIN_EXTERNAL`), every external one and those named in ``always`` written as a
    placeholder reference, and those initializers' arrays by name (memory-mapped where the
    weights are external data: nothing is read here)."""
    min_bytes = MIN_EXTERNAL if min_bytes is None else min_bytes
    always = set(always)
    arrays: dict[str, np.ndarray] = {}
    swapped: list[tuple[ir.Value, Any]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or not value.name:
                continue
            if value.name not in always:
                if isinstance(tensor, ir.ExternalTensor):
                    if _integer(tensor) and tensor.nbytes < SHAPE_BYTES:  # shapes ORT reads at load: into the bytes
                        swapped.append((value, tensor))
                        value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
                        continue
                elif tensor.nbytes < min_bytes or (_integer(tensor) and tensor.nbytes < SHAPE_BYTES):
                    continue  # small and in memory: it goes inside the bytes
            arrays[value.name] = _contiguous(tensor.numpy())
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER, offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape,
                name=value.name, base_dir="",
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    from graphc.core.io import max_ir_version

    proto.ir_version = min(proto.ir_version, max_ir_version())
    return proto, arrays


def session_from_proto(proto: Any, arrays: dict[str, np.ndarray], *, threads: int | None = None,
                       providers: list[str] | None = None, options: Any = None) -> Any:
    """An InferenceSession for a protobuf whose placeholder initializers are given as
    ``arrays`` (shared, not copied: kept alive on the session as ``_graphc_arrays``)."""
    import onnxruntime as ort

    from graphc.core.session import session_options

    options = options or session_options(threads)
    names = list(arrays)
    values = [_contiguous(arrays[n]) for n in names]
    if names:
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in values])
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"])
    sess._graphc_arrays = values  # the OrtValues share this memory: keep it alive with the session
    return sess

"""What a recipe left in float, and why: the weights still stored as float32 after the passes
ran, grouped by the op that reads them, with the reason a pass gave (its skip records) or,
where no pass looked at that op, the reason no pass of the recipe handles it.

So a run that quantized less than it could says so, in the summary and in ``--json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

MIN_ELEMENTS = 1024  # smaller float tensors (biases, norms, scales) are not weights worth counting
# ops that only rearrange a weight on its way to the op that uses it (an exporter's LSTM gate
# reordering is Slice + Concat + Unsqueeze)
_THROUGH = ("Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Slice", "Concat")
# recurrent ops: inputs from index 3 on (bias, sequence lengths, initial states, peepholes,
# a quantized op's scales) are not the weights a quantizer takes
_RECURRENT = ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")

# Why an op's weights stay float when no pass recorded a reason of its own.
_GENERIC = {
    "Conv": "no pass of this recipe quantizes Conv",
    "ConvTranspose": "no pass of this recipe quantizes ConvTranspose",
    "GRU": "no pass of this recipe quantizes GRU (quantize-rnn-weights does, in int8: ONNX Runtime has no int8 GRU kernel, so the weights are dequantized at load)",
    "LSTM": "no pass of this recipe quantizes LSTM (quantize-lstm does: DynamicQuantizeLSTM, in int8)",
    "RNN": "no pass of this recipe quantizes RNN (quantize-rnn-weights does, in int8)",
    "Gather": "table not quantized by this recipe",
    "MatMul": "no pass of this recipe quantized it",
    "Gemm": "no pass of this recipe quantized it",
}


@dataclass
class Leftover:
    op: str
    tensors: int
    bytes: int
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "tensors": self.tensors, "bytes": self.bytes, "reasons": self.reasons}


def _float_weights(graph: ir.Graph):
    """(value, array size in bytes) of large float32 constants: initializers and Constant nodes."""
    for value in graph.initializers.values():
        t = value.const_value
        if t is not None and t.dtype == ir.DataType.FLOAT and int(np.prod(t.shape.numpy())) >= MIN_ELEMENTS:
            yield value, int(np.prod(t.shape.numpy())) * 4
    for node in graph:
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            attr = node.attributes["value"]
            if attr.type == ir.AttributeType.TENSOR:
                t = attr.as_tensor()
                if t.dtype == ir.DataType.FLOAT and int(np.prod(t.shape.numpy())) >= MIN_ELEMENTS:
                    yield node.outputs[0], int(np.prod(t.shape.numpy())) * 4


def _readers(value: ir.Value, depth: int = 0) -> list[ir.Node]:
    """The nodes that use ``value`` as a weight, looking through casts, reshapes and slices
    (not as a recurrent op's bias or state)."""
    found = []
    for user, index in value.uses():
        if user.op_type in _THROUGH and depth < 4 and user.outputs:
            found.extend(_readers(user.outputs[0], depth + 1))
        elif not (user.op_type in _RECURRENT and index >= 3):
            found.append(user)
    return found


def _graphs(model: ir.Model):
    yield model.graph
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def left_in_float(model: ir.Model, records: Sequence[Any] = ()) -> list[Leftover]:
    """Float32 weights of ``model`` by reading op, largest first, with the reasons the passes
    (``records``: PassRecords) gave for the nodes that read them."""
    skips: dict[str, set[str]] = {}
    for record in records:
        for skip in (getattr(record, "stats", None) or {}).get("skipped", []) or []:
            if isinstance(skip, dict) and "node" in skip:
                skips.setdefault(skip["node"], set()).add(f"{record.name}: {skip['reason']}")
    groups: dict[str, Leftover] = {}
    seen: set[int] = set()
    for graph in _graphs(model):
        for value, size in _float_weights(graph):
            if id(value) in seen:
                continue
            seen.add(id(value))
            readers = _readers(value)
            if not readers:
                continue
            node = readers[0]
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            entry = groups.setdefault(op, Leftover(op, 0, 0, []))
            entry.tensors += 1
            entry.bytes += size
            reasons = skips.get(node.name or node.op_type) or {_GENERIC.get(node.op_type, "no pass of this recipe handles this op")}
            for r in sorted(reasons):
                if r not in entry.reasons:
                    entry.reasons.append(r)
    return sorted(groups.values(), key=lambda e: -e.bytes)


def summary_lines(leftovers: Sequence[Leftover], fmt_bytes) -> list[str]:
    """One line per op type, at most three reasons each."""
    lines = []
    for e in leftovers:
        more = f" (+{len(e.reasons) - 3} more)" if len(e.reasons) > 3 else ""
        lines.append(f"  {e.op:16s} {e.tensors:4d} weights {fmt_bytes(e.bytes):>10s}: {'; '.join(e.reasons[:3])}{more}")
    return lines


# ops whose weights an input model already holds quantized: a recipe plans and fits float weights
# only, so these stay as the model has them
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul", "QLinearMatMul", "QAttention", "QLinearConv", "ConvInteger",
                 "DynamicQuantizeLSTM")


def already_quantized(model: ir.Model) -> str:
    """The input's quantized weight ops as 'MatMulNBits x 211, GatherBlockQuantized x 1' (''
    when none): such weights are kept as they are, which the run says."""
    counts: dict[str, int] = {}
    for graph in _graphs(model):
        for node in graph:
            if node.op_type in QUANTIZED_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return ", ".join(f"{op} x {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))

"""Store the block scales of low-bit weights as 8-bit codes on a log grid (double quantization).

A 4-bit weight in blocks of 64 stores one float16 scale per block: 16 of its ~280 bits, about
6% of the model. The scales of one tensor span a small range (SmolLM2's body: a factor of 6-30
from the smallest to the largest), so each is stored here as one byte ``c`` with
``scale = exp(lo + step * c)``, ``lo`` and ``step`` per tensor (its log range over 255 steps):
half the scale bytes, at a relative scale error of at most ``step / 2`` (SmolLM2's widest body
tensor: 0.7%). Where one tensor's range is too wide for that (SmolLM2's LM-head tiers: a factor
of ~1000 across the vocabulary), ``lo`` is per row (output channel or table row, float16: 2
bytes a row) and ``step`` covers the widest row. The codes and zero points are kept as they
were fitted; a scale off by ε moves a dequantized weight by (q - z)·s·ε, well under its own
rounding error at ε ≤ 1%.

The scales feeding ``MatMulNBits`` and ``GatherBlockQuantized`` (directly, or through the Cast /
Reshape / Transpose the quantization passes put before them) are decoded by ``Cast`` → ``Mul``
→ ``Add`` → ``Exp`` (→ ``Cast`` back to float16) on constants, which ONNX Runtime folds at
session creation (as it folds fp16-constants' Casts): its kernels see constant scales and
prepack as before, and the file holds one byte per block. Tensors of one shape and encoding
share one decoder (stacked codes, then a ``Split``), so a model with hundreds of quantized
MatMuls gains ~10 nodes, not ~1000. A tensor still too wide for ``max_rel_error``, or holding a
zero, negative or non-finite scale, is left as it is, with the reason in the stats. Run it
after the quantization passes (and before ``fp16-constants``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.passes._quant import constant
from graphc.core.registry import register

# (op, input index of the scales) whose scales are compacted
_SCALE_INPUTS = {"MatMulNBits": 2, "GatherBlockQuantized": 2}
# value-preserving ops the quantization passes may put between the stored scales and the op
_PASS_THROUGH = {ops.CAST, "Reshape", "Transpose"}
_LEVELS = 255  # codes 0..255


@dataclass(frozen=True)
class CompactScalesOptions:
    max_rel_error: float = 0.01  # the largest relative change of a scale (half a log step) allowed
    min_elements: int = 64  # smaller scale tensors are not worth the nodes


@dataclass
class _Item:
    value: ir.Value  # the float scales initializer
    array: np.ndarray
    rows: int  # rows the per-row offset runs over (output channels / table rows)
    codes: np.ndarray | None = None  # uint8 [rows, cols]
    lo: np.ndarray | None = None  # [rows, 1] (per row) or [1, 1]
    step: float = 0.0


@register
class CompactScales(GraphcPass):
    name = "compact-scales"
    summary = "store MatMulNBits / GatherBlockQuantized block scales as uint8 codes on a log grid (folded by ORT at load)"
    Options = CompactScalesOptions

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        o = self.options
        if not 0 < o.max_rel_error < 1 or o.min_elements < 1:
            raise UnsupportedError(f"max_rel_error={o.max_rel_error!r} must lie in (0, 1) and min_elements="
                                   f"{o.min_elements!r} be at least 1", pass_name=self.name)
        graph = model.graph
        anchor = next(iter(graph), None)
        sources = _scale_sources(graph)
        if anchor is None or not sources:
            stats.notes.append("no MatMulNBits / GatherBlockQuantized scales stored as float initializers")
            return False
        groups: dict[tuple, list[_Item]] = {}
        worst = 0.0
        for value, rows in sources:
            item = _Item(value, value.const_value.numpy(), rows)
            reason = self._encode(item)
            if reason:
                stats.skip(value.name or "?", reason)
                continue
            worst = max(worst, math.expm1(item.step / 2))
            key = (item.array.shape, str(item.array.dtype), item.codes.shape, item.lo.shape)
            groups.setdefault(key, []).append(item)
            lo_bytes = 2 * item.lo.size if item.lo.size > 1 else 4
            stats.add("tensors_compacted")
            stats.add("tensors_with_row_offsets", int(item.lo.size > 1))
            stats.add("bytes_saved", int(item.array.nbytes - item.codes.nbytes - lo_bytes - 4))
        for items in groups.values():
            self._decode_group(graph, anchor, items)
            stats.add("decoders")
        if groups:
            stats.notes.append(f"largest relative scale change allowed by a tensor's step: {worst:.2%}")
        return bool(groups)

    def _encode(self, item: _Item) -> str | None:
        """Codes on one log grid per tensor or, if that is too coarse, a grid offset per row;
        else the reason it is left alone."""
        array = item.array
        if array.size < self.options.min_elements:
            return f"{array.size} scales (< min_elements={self.options.min_elements})"
        if not np.all(np.isfinite(array)) or float(array.min()) <= 0:
            return "zero, negative or non-finite scales (a log grid needs positive ones)"
        logs = np.log(array.astype(np.float64)).reshape(item.rows, -1)
        span = float(logs.max() - logs.min())
        if math.expm1(span / _LEVELS / 2) <= self.options.max_rel_error:
            lo = np.full((1, 1), logs.min())
        elif logs.shape[1] * (array.itemsize - 1) <= 2:  # a float16 offset a row would cost what it saves
            return (f"scales span a factor of {math.exp(span):.3g}: one grid of 8-bit log codes would move them by up to "
                    f"{math.expm1(span / _LEVELS / 2):.2%} (> max_rel_error={self.options.max_rel_error:g}), "
                    f"and a row offset costs more than its {logs.shape[1]} scale(s) save")
        else:
            low = logs.min(axis=1, keepdims=True)
            lo16 = low.astype(np.float16)  # stored as float16: rounded down, so no code goes below 0
            above = lo16.astype(np.float64) > low
            lo16[above] = np.nextafter(lo16[above], np.float16(-np.inf))
            lo = lo16.astype(np.float64)
            span = float((logs - lo).max())
            bound = math.expm1(span / _LEVELS / 2)
            if bound > self.options.max_rel_error:
                return (f"scales span a factor of {math.exp(span):.3g} within a row: 8-bit log codes would move them "
                        f"by up to {bound:.2%} (> max_rel_error={self.options.max_rel_error:g})")
        item.codes, item.step = _codes(logs, lo, span)
        item.lo = lo
        return None

    @staticmethod
    def _decode_group(graph: ir.Graph, anchor: ir.Node, items: list[_Item]) -> None:
        """One decoder for tensors of one shape: codes [G, rows, cols] → scales → Split → each."""
        first = items[0]
        name = f"{first.value.name or 'scales'}_log8"
        codes = constant(graph, name, np.stack([it.codes for it in items]))
        per_row = first.lo.size > 1
        lo_array = np.stack([it.lo for it in items])
        lo = constant(graph, f"{name}_lo", lo_array.astype(np.float16 if per_row else np.float32))
        step = constant(graph, f"{name}_step", np.asarray([it.step for it in items], np.float32).reshape(-1, 1, 1))
        nodes = [ir.node(ops.CAST, [codes], attributes={"to": ir.DataType.FLOAT})]
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], step]))
        lo_in = lo
        if per_row:
            nodes.append(ir.node(ops.CAST, [lo], attributes={"to": ir.DataType.FLOAT}))
            lo_in = nodes[-1].outputs[0]
        nodes.append(ir.node("Add", [nodes[1].outputs[0], lo_in]))
        nodes.append(ir.node("Exp", [nodes[-1].outputs[0]]))
        half = first.array.dtype == np.float16
        if half:
            nodes.append(ir.node(ops.CAST, [nodes[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT16}))
        shape = first.array.shape
        flat = (len(items) * shape[0], *shape[1:]) if shape else (len(items),)
        nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], constant(graph, f"{name}_shape", np.asarray(flat, np.int64))]))
        if len(items) > 1:
            last, count = nodes[-1].outputs[0], len(items)
            if graph.opset_imports.get("", 17) >= 18:  # equal parts by num_outputs
                split = ir.node("Split", [last], attributes={"axis": 0, "num_outputs": count}, num_outputs=count)
            else:  # opset 13-17: the part sizes as an input
                sizes = constant(graph, f"{name}_split", np.full(count, shape[0], np.int64))
                split = ir.node("Split", [last, sizes], attributes={"axis": 0}, num_outputs=count)
            nodes.append(split)
        for node in nodes:
            graph.insert_before(anchor, node)
        dtype = ir.DataType.FLOAT16 if half else ir.DataType.FLOAT
        for item, out in zip(items, nodes[-1].outputs):
            out.shape, out.type = ir.Shape(shape), ir.TensorType(dtype)
            ir.convenience.replace_all_uses_with(item.value, out)
            del graph.initializers[item.value.name]
            out.name = item.value.name


def encode(scales: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint8 codes (the array's shape), lo and step of one per-tensor log grid:
    ``scale ≈ exp(lo + step * code)``."""
    logs = np.log(scales.astype(np.float64))
    lo = float(logs.min())
    codes, step = _codes(logs, lo, float(logs.max()) - lo)
    return codes, lo, step


def _codes(logs: np.ndarray, lo: np.ndarray | float, span: float) -> tuple[np.ndarray, float]:
    """The log scales above ``lo`` in 255 steps across ``span``: uint8 codes and the step."""
    step = span / _LEVELS if span > 0 else 1.0
    return np.clip(np.rint((logs - lo) / step), 0, _LEVELS).astype(np.uint8), step


def decode(codes: np.ndarray, lo: float, step: float) -> np.ndarray:
    """What the graph computes from the codes (float32)."""
    return np.exp(codes.astype(np.float32) * np.float32(step) + np.float32(lo)).astype(np.float32)


def _scale_sources(graph: ir.Graph) -> list[tuple[ir.Value, int]]:
    """The float initializers that reach a MatMulNBits / GatherBlockQuantized scales input, each
    once (a tied table's scales may feed both ops) with its row count (a MatMulNBits' N for
    [N * blocks] scales, else the first dimension), through value-preserving ops only."""
    found: dict[int, tuple[ir.Value, int]] = {}
    for node in graph:
        index = _SCALE_INPUTS.get(node.op_type) if node.domain == ops.MS_DOMAIN else None
        if index is None or len(node.inputs) <= index or node.inputs[index] is None:
            continue
        value = node.inputs[index]
        while value.const_value is None and value.producer() is not None \
                and value.producer().op_type in _PASS_THROUGH and value.producer().domain in ("", "ai.onnx"):
            value = value.producer().inputs[0]
        tensor = value.const_value
        if tensor is None or value.name not in graph.initializers or value in graph.outputs:
            continue
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or len(tensor.shape) == 0:
            continue
        dims = [int(d) for d in tensor.shape]
        rows = dims[0] if len(dims) > 1 else 1
        if len(dims) == 1 and node.op_type == "MatMulNBits":
            n = node.attributes.get_int("N", 0)
            rows = n if n and dims[0] % n == 0 else 1
        if id(value) not in found or found[id(value)][1] == 1:
            found[id(value)] = (value, rows)
    return list(found.values())

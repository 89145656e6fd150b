"""Store the block scales of low-bit weights as 8-bit codes on a log grid (double quantization).

A 4-bit weight in blocks of 64 stores one float16 scale per block: 16 of its ~4.4 bits a
weight over 64 weights, about 6% of the model. The scales of one tensor span a small range
(SmolLM2: a factor of 6-30 from the smallest to the largest), so each is stored here as one
byte ``c`` with ``scale = exp(lo + step * c)``, ``lo`` and ``step`` per tensor (the log range
over 255 steps): half the scale bytes, at a relative scale error of at most ``step / 2``
(SmolLM2's widest tensor: 0.7%). The codes and zero points are kept as they were fitted; a
scale off by ε moves a dequantized weight by (q - z)·s·ε, well under its own rounding error.

The scales feeding ``MatMulNBits`` and ``GatherBlockQuantized`` (directly, or through the Cast /
Reshape / Transpose the quantization passes put before them) become ``Cast`` → ``Mul`` →
``Add`` → ``Exp`` (→ ``Cast`` back to float16 when the tensor was float16) on the uint8 codes:
constants, which ONNX Runtime folds at session creation (as it folds fp16-constants' Casts), so
its kernels see constant scales and prepack as before; the file holds one byte per block.
A tensor whose log range would need a coarser step than ``max_rel_error`` allows, or that holds
a zero, negative or non-finite scale, is left as it is, with the reason in the stats. Run it
after the quantization passes (and before ``fp16-constants``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc import ops
from graphc.pass_base import GraphcPass, PassStats
from graphc.passes._quant import constant
from graphc.registry import register

# (op, input index of the scales) whose scales are compacted
_SCALE_INPUTS = {"MatMulNBits": 2, "GatherBlockQuantized": 2}
# value-preserving ops the quantization passes may put between the stored scales and the op
_PASS_THROUGH = {ops.CAST, "Reshape", "Transpose"}
_LEVELS = 255  # codes 0..255


@dataclass(frozen=True)
class CompactScalesOptions:
    max_rel_error: float = 0.01  # the largest relative change of a scale (half a log step) allowed
    min_elements: int = 64  # smaller scale tensors are not worth the nodes


@register
class CompactScales(GraphcPass):
    name = "compact-scales"
    summary = "store MatMulNBits / GatherBlockQuantized block scales as uint8 codes on a per-tensor log grid (folded by ORT at load)"
    Options = CompactScalesOptions

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        anchor = next(iter(graph), None)
        sources = _scale_sources(graph)
        if anchor is None or not sources:
            stats.notes.append("no MatMulNBits / GatherBlockQuantized scales stored as float initializers")
            return False
        modified = False
        worst = 0.0
        for value in sources:
            array = value.const_value.numpy()
            reason = self._unfit(array)
            if reason:
                stats.skip(value.name or "?", reason)
                continue
            codes, lo, step = encode(array)
            worst = max(worst, math.expm1(step / 2))
            out = self._decoder(graph, anchor, value.name or "scales", codes, lo, step, array.dtype)
            ir.convenience.replace_all_uses_with(value, out)
            del graph.initializers[value.name]
            out.name = value.name
            stats.add("tensors_compacted")
            stats.add("bytes_saved", int(array.nbytes - codes.nbytes - 8))
            modified = True
        if modified:
            stats.notes.append(f"largest relative scale change allowed by a tensor's step: {worst:.2%}")
        return modified

    def _unfit(self, array: np.ndarray) -> str | None:
        if array.size < self.options.min_elements:
            return f"{array.size} scales (< min_elements={self.options.min_elements})"
        if not np.all(np.isfinite(array)) or float(array.min()) <= 0:
            return "zero, negative or non-finite scales (a log grid needs positive ones)"
        ratio = float(array.max()) / float(array.min())
        bound = math.expm1(math.log(ratio) / _LEVELS / 2)
        if bound > self.options.max_rel_error:
            return (f"scales span a factor of {ratio:.3g}: 8-bit log codes would move them by up to {bound:.2%} "
                    f"(> max_rel_error={self.options.max_rel_error:g})")
        return None

    @staticmethod
    def _decoder(graph: ir.Graph, anchor: ir.Node, name: str, codes: np.ndarray, lo: float, step: float,
                 dtype: np.dtype) -> ir.Value:
        stored = constant(graph, f"{name}_log8", codes)
        lo_v = constant(graph, f"{name}_log8_lo", np.asarray(lo, np.float32))
        step_v = constant(graph, f"{name}_log8_step", np.asarray(step, np.float32))
        nodes = [ir.node(ops.CAST, [stored], attributes={"to": ir.DataType.FLOAT})]
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], step_v]))
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], lo_v]))
        nodes.append(ir.node("Exp", [nodes[-1].outputs[0]]))
        if dtype == np.float16:
            nodes.append(ir.node(ops.CAST, [nodes[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT16}))
        for node in nodes:
            graph.insert_before(anchor, node)
        out = nodes[-1].outputs[0]
        out.shape = ir.Shape(codes.shape)
        out.type = ir.TensorType(ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT)
        return out


def encode(scales: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint8 codes (the array's shape), lo and step: ``scale ≈ exp(lo + step * code)``."""
    logs = np.log(scales.astype(np.float64))
    lo, hi = float(logs.min()), float(logs.max())
    step = (hi - lo) / _LEVELS if hi > lo else 1.0
    codes = np.clip(np.rint((logs - lo) / step), 0, _LEVELS).astype(np.uint8)
    return codes, lo, step


def decode(codes: np.ndarray, lo: float, step: float) -> np.ndarray:
    """What the graph computes from the codes (float32)."""
    return np.exp(codes.astype(np.float32) * np.float32(step) + np.float32(lo)).astype(np.float32)


def _scale_sources(graph: ir.Graph) -> list[ir.Value]:
    """The float initializers that reach a MatMulNBits / GatherBlockQuantized scales input,
    each once (a tied table's scales may feed both ops), through value-preserving ops only."""
    found: dict[int, ir.Value] = {}
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
        if tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            found[id(value)] = value
    return list(found.values())

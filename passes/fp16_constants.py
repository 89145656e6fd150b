"""Store small float32 constant vectors (biases, LayerNorm gamma/beta, scales) as float16.

Each becomes a float16 initializer behind a ``Cast`` to float32. ONNX Runtime folds the Cast
at session creation (constant folding runs before its fusions), so kernels see the same
float32 constants they saw before, rounded to float16 precision (relative error ≤ 2^-11),
and the file holds half the bytes. Vectors whose values would overflow float16 or lose more
than ``max_rel_error`` (of the vector's largest magnitude; of each element, for vectors of
quantization scales) stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.core.registry import register
from graphc.passes._quant import constant

_FP16_MAX = float(np.finfo(np.float16).max)

# (op, input index) that read a vector of quantization scales: each element scales its own
# channel or block, so each must keep its own relative precision (a scale under float16's
# normal range next to large ones would be flushed toward zero, and its channel with it)
_SCALE_INPUTS = {
    ("DequantizeLinear", 1), ("QuantizeLinear", 1), ("MatMulIntegerToFloat", 2), ("MatMulIntegerToFloat", 3),
    ("DynamicQuantizeMatMul", 2), ("QAttention", 3), ("QAttention", 4), ("MatMulNBits", 2),
    ("GatherBlockQuantized", 2), ("QLinearMatMul", 1), ("QLinearMatMul", 4), ("QLinearMatMul", 6),
}


def _is_scale(value: ir.Value) -> bool:
    return any((node.op_type, index) in _SCALE_INPUTS for node, index in value.uses())


@dataclass(frozen=True)
class Fp16ConstantsOptions:
    min_elements: int = 16  # scalars and tiny vectors (epsilons, shapes) stay as they are
    max_ndim: int = 1  # vectors only: matrices are the quantization passes' business
    max_rel_error: float = 1e-3  # relative to the vector's largest magnitude


@register
class Fp16Constants(GraphcPass):
    name = "fp16-constants"
    summary = "store float32 constant vectors (biases, norms, scales) as float16 + Cast (folded by ORT at load)"
    Options = Fp16ConstantsOptions

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        anchor = next(iter(graph), None)
        if anchor is None:
            stats.notes.append("empty graph")
            return False
        modified = False
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or value in graph.outputs or value in graph.inputs:
                continue
            if not value.uses() or tensor.size < self.options.min_elements or len(tensor.shape) > self.options.max_ndim:
                continue
            array = tensor.numpy()
            peak = float(np.abs(array).max(initial=0.0))
            if peak > _FP16_MAX or not np.all(np.isfinite(array)):
                stats.skip(value.name or "?", "values outside float16 range")
                continue
            half = array.astype(np.float16)
            err = float(np.abs(half.astype(np.float32) - array).max(initial=0.0))
            if peak > 0 and err / peak > self.options.max_rel_error:
                stats.skip(value.name or "?", f"float16 relative error {err / peak:.1e} > {self.options.max_rel_error}")
                continue
            if _is_scale(value):
                nonzero = array != 0
                worst = float((np.abs(half.astype(np.float32) - array)[nonzero] / np.abs(array[nonzero])).max(initial=0.0))
                if worst > self.options.max_rel_error:
                    stats.skip(value.name or "?", f"quantization scales: float16 relative error {worst:.1e} on one "
                                                  f"element > {self.options.max_rel_error}")
                    continue
            stored = constant(graph, f"{value.name}_fp16", half)
            cast = ir.node(ops.CAST, [stored], attributes={"to": ir.DataType.FLOAT})
            graph.insert_before(anchor, cast)
            ir.convenience.replace_all_uses_with(value, cast.outputs[0])
            del graph.initializers[value.name]
            cast.outputs[0].name = value.name
            stats.add("constants_converted")
            stats.add("bytes_saved", int(array.nbytes - half.nbytes))
            modified = True
        if not modified:
            stats.notes.append("no float32 constant vector to store as float16")
        return modified

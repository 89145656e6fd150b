"""Fold an inference ``BatchNormalization`` into the ``Conv`` that feeds it (exact up to float
rounding).

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * k) + (b - mean) * k + beta,   k = gamma / sqrt(var + eps)   (per channel)

ONNX Runtime does this at session load for float Conv weights, but not once the weight is
behind a ``DequantizeLinear``: fold before quantizing so that the quantized weight is the
folded one and no BatchNormalization remains at run time. A BatchNormalization whose Conv
feeds other nodes too, or whose parameters are not constants, is left with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, constant, drop_unused_initializers


@register
class FoldBatchNorm(GraphcPass):
    name = "fold-batchnorm"
    summary = "fold inference BatchNormalization into the Conv before it (exact)"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        changed = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            label = bn.name or bn.op_type
            if len(bn.outputs) > 1 and any(o.uses() or o in graph.outputs for o in bn.outputs[1:]):
                stats.skip(label, "training-mode BatchNormalization (running statistics are read)")
                continue
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
                continue  # a BatchNormalization after something else: nothing to fold into
            if len(bn.inputs[0].uses()) != 1 or bn.inputs[0] in graph.outputs:
                stats.skip(label, "the Conv output is read by other nodes too")
                continue
            params = [const_array(v) for v in bn.inputs[1:5]]
            w = const_array(conv.inputs[1])
            b = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
            if w is None or any(p is None for p in params) or (len(conv.inputs) > 2 and conv.inputs[2] is not None and b is None):
                stats.skip(label, "Conv weight or BatchNormalization parameters are not constants")
                continue
            if w.dtype != np.float32:
                stats.skip(label, f"Conv weight is {w.dtype}, not float32")
                continue
            gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
            eps = bn.attributes.get_float("epsilon", 1e-5)
            k = gamma / np.sqrt(var + eps)
            if not np.all(np.isfinite(k)) or k.shape[0] != w.shape[0]:
                stats.skip(label, "BatchNormalization scale is not finite or does not match the Conv's channels")
                continue
            bias = b.astype(np.float64).reshape(-1) if b is not None else np.zeros(w.shape[0])
            w_new = (w.astype(np.float64) * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
            b_new = ((bias - mean) * k + beta).astype(np.float32)
            base = conv.inputs[1].name or "conv_w"
            inputs = [conv.inputs[0], constant(graph, f"{base}_bn", w_new), constant(graph, f"{base}_bn_bias", b_new)]
            folded = ir.node("Conv", inputs, attributes=dict(conv.attributes), name=conv.name)
            copy_scope(conv, folded)
            ir.convenience.replace_nodes_and_values(graph, conv, [conv, bn], [folded], [bn.outputs[0]], [folded.outputs[0]])
            stats.add("batchnorms_folded")
            changed = True
        if changed:
            drop_unused_initializers(graph)
        elif not stats.skipped:
            stats.notes.append("no BatchNormalization after a Conv found")
        return changed

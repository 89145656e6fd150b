"""``Gemm(A, B, C)`` with a constant weight → ``MatMul(A, B') [+ Add(C')]``, exact up to float rounding.

    Gemm(A [M, K], B, C; alpha, beta, transB)  →  MatMul(A, alpha · (B or Bᵀ) [K, N]) + beta · C

Exporters other than torch.onnx's current one (tf2onnx, Paddle, the older torch exporter for
``nn.Linear`` on 2-D inputs) write dense layers as ``Gemm``. The passes that measure or plan
per layer (``mixed-precision``, ``awq-scale``, the ``plan`` pass's pruning, low-rank and
precision units) read the ``MatMul`` [K, N] form; written as one, such layers take part in
the plan instead of staying float unexamined. ``quantize-int8`` and ``quantize-nbits`` take
``Gemm`` as it is and do not need this.

Left alone: ``transA = 1``, a weight that is not a constant, a bias that is not constant
while ``beta`` is not 1, and ``Gemm`` nodes of other domains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, constant, drop_unused_initializers, subgraphs


@dataclass(frozen=True)
class GemmToMatMulOptions:
    exclude: tuple[str, ...] = ()  # substrings of node names to leave as Gemm


@register
class GemmToMatMul(GraphcPass):
    name = "gemm-to-matmul"
    summary = "constant-weight Gemm as MatMul [+ Add] (so per-layer planning and measuring passes see them)"
    Options = GemmToMatMulOptions
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        changed = False
        for graph in [model.graph, *subgraphs(model.graph)]:
            touched = False
            for node in list(graph):
                if node.op_type != ops.GEMM or node.domain not in ("", "ai.onnx"):
                    continue
                parts = self._parts(node, stats)
                if parts is None:
                    continue
                self._replace(graph, node, *parts)
                stats.add("gemms_rewritten")
                touched = True
            if touched:
                drop_unused_initializers(graph)
                changed = True
        if not changed and not stats.skipped:
            stats.notes.append("no Gemm found")
        return changed

    def _parts(self, node: ir.Node, stats: PassStats) -> tuple[np.ndarray, ir.Value | np.ndarray | None] | None:
        """(weight [K, N] with alpha folded in, bias: a constant array with beta folded in, a
        value, or None); None, with the reason in ``stats``, for a Gemm left alone."""
        label = node.name or node.op_type
        attrs = node.attributes
        reason = None
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        beta = attrs.get_float("beta", 1.0)
        if any(s in label for s in self.options.exclude):
            reason = "excluded by option"
        elif attrs.get_int("transA", 0):
            reason = "Gemm with transA=1"
        elif w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            reason = "weight is not a constant 2-D float tensor"
        elif c is not None and const_array(c) is None and beta != 1.0:
            reason = "bias is not a constant and beta is not 1"
        if reason is not None:
            stats.skip(label, reason)
            return None
        if attrs.get_int("transB", 0):
            w = w.T
        alpha = attrs.get_float("alpha", 1.0)
        if alpha != 1.0:
            w = w * np.asarray(alpha, w.dtype)
        bias: ir.Value | np.ndarray | None = c
        if c is not None and (arr := const_array(c)) is not None:
            bias = arr * np.asarray(beta, arr.dtype) if beta != 1.0 else arr
        return np.ascontiguousarray(w), bias

    def _replace(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, bias) -> None:
        base = node.name or "gemm"
        weight = constant(graph, f"{base}_weight", w)
        matmul = ir.node(ops.MATMUL, [node.inputs[0], weight], name=f"{base}_matmul")
        new = [matmul]
        if bias is not None:
            b = constant(graph, f"{base}_bias", np.ascontiguousarray(bias)) if isinstance(bias, np.ndarray) else bias
            new.append(ir.node(ops.ADD, [matmul.outputs[0], b], name=f"{base}_bias_add"))
        for n in new:
            copy_scope(node, n)
        out = new[-1].outputs[0]
        out.name, out.shape, out.type = node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [out])

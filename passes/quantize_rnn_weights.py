"""int8 weights for ``GRU``, ``RNN`` and float ``LSTM``, dequantized at load: the file shrinks, the arithmetic stays float.

    W [D, G·H, K] float32  →  Mul(Cast(codes int8 [D, G·H, K]), scale [D, G·H, 1]) → GRU / RNN / LSTM

ONNX Runtime has no integer kernel for GRU or RNN (and an LSTM that ``quantize-lstm`` kept
float, its per-step activation quantization costing too much, has none it can afford): the
weights are stored as int8 codes with one scale per gate row, and a constant subgraph that ONNX
Runtime folds when the session loads turns them back into the float weight. The file holds a
quarter of those bytes; the kernels, the speed and the arithmetic are fp32's on every CPU (no
integer GEMM, so nothing saturates on AVX2); the error is the weights' rounding alone.

Weights an exporter computes from constants (gate reordering by Slice/Concat) are read through
those ops. ``max_error`` keeps the layers that cost the most in float, measured on copies of
the model (``_trial_budget``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import (check_max_error, constant, drop_unused_initializers, subgraphs, symmetric_int8,
                                  weight_problem)
from graphc.passes._trial_budget import kept_float, keyed_nodes
from graphc.passes._weights import drop_dead, rearranged_constant

_RECURRENT = ("GRU", "RNN", "LSTM")


@dataclass(frozen=True)
class RnnWeightsOptions:
    min_elements: int = 1024  # smaller W + R stay float
    exclude: tuple[str, ...] = ()  # substrings of node names to leave in float
    # > 0: keep the layers that cost the most in float until the output error (1 - cosine of
    # each output over the calibration feeds, the worst output) is at most this
    max_error: float = 0.0

    def __post_init__(self) -> None:
        check_max_error(self.max_error, "recurrent layer")


@register
class QuantizeRnnWeights(GraphcPass):
    name = "quantize-rnn-weights"
    summary = "int8 GRU/RNN/LSTM weights per gate row, dequantized at load (float arithmetic, exact on every CPU)"
    Options = RnnWeightsOptions

    @property
    def needs_calibration(self) -> bool:
        return self.options.max_error > 0

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        opset = model.opset_imports.get("", 1)
        cands = self._candidates(model, opset, stats)
        kept = self._kept_float(model, cands, stats) if cands and self.options.max_error > 0 else {}
        changed = False
        for key, (graph, node, weights, cone) in cands.items():
            if key in kept:
                stats.skip(node.name or node.op_type, kept[key])
                continue
            self._replace(graph, node, weights, stats)
            drop_dead(cone)
            changed = True
        if changed:
            for graph in [model.graph, *subgraphs(model.graph)]:  # a body's weights may be outer-scope
                drop_unused_initializers(graph)
        elif not stats.skipped:
            stats.notes.append("no GRU, RNN or float LSTM with constant weights found")
        return changed

    def _candidates(self, model: ir.Model, opset: int, stats: PassStats | None) -> dict[tuple[int, int], tuple]:
        """Key (``_trial_budget.keyed_nodes``) → (graph, node, {input index: float weight}, the
        nodes computing the weights) of each recurrent layer this pass can rewrite."""
        return {key: (graph, node, *got) for key, graph, node in keyed_nodes(model)
                if node.op_type in _RECURRENT and node.domain in ("", "ai.onnx") and len(node.inputs) >= 3
                and (got := self._weights(node, opset, stats)) is not None}

    def _weights(self, node: ir.Node, opset: int, stats: PassStats | None):
        label = node.name or node.op_type
        weights, cone, reason = {}, [], None
        if any(s in label for s in self.options.exclude):
            reason = "excluded by option"
        elif node.attributes.get_int("layout", 0) != 0 and self.options.max_error > 0:
            reason = ("layout=1 (batch first): ONNX Runtime runs no batch-first recurrent layer, so its error "
                      "cannot be measured for the budget")
        for index in (1, 2):
            if reason is not None:
                break
            found = rearranged_constant(node.inputs[index], opset)
            if found is None:
                reason = "W or R is not a constant (nor computed from constants by Slice/Concat/Reshape-like ops)"
            elif found[0].dtype != np.float32 or found[0].ndim != 3:
                reason = f"weight is a {found[0].ndim}-D {found[0].dtype}, not 3-D float32"
            else:
                reason = weight_problem(found[0], 0)
                weights[index] = found[0]
                cone += found[1]
        if reason is None and sum(w.size for w in weights.values()) < self.options.min_elements:
            reason = f"W and R have {sum(w.size for w in weights.values())} elements < min_elements={self.options.min_elements}"
        if reason is not None:
            if stats is not None:
                stats.skip(label, reason)
            return None
        return weights, cone

    def _kept_float(self, model: ir.Model, cands: dict, stats: PassStats) -> dict[tuple[int, int], str]:
        opset = model.opset_imports.get("", 1)

        def apply(trial: ir.Model, keys) -> None:
            found = self._candidates(trial, opset, None)
            for key in keys:
                graph, node, weights, _ = found[key]
                self._replace(graph, node, weights, PassStats())

        return kept_float(self, model, list(cands), apply,
                          {k: c[1].name or c[1].op_type for k, c in cands.items()}, "rnn", "recurrent layer(s)",
                          stats)

    def _replace(self, graph: ir.Graph, node: ir.Node, weights: dict[int, np.ndarray], stats: PassStats) -> None:
        base = node.name or node.op_type.lower()
        for index, w in weights.items():
            d, rows, k = w.shape
            q, scale = symmetric_int8(w.reshape(d * rows, k), 0)  # one scale per gate row
            tag = "W" if index == 1 else "R"
            codes = constant(graph, f"{base}_{tag}_int8", q.reshape(d, rows, k))
            scale = constant(graph, f"{base}_{tag}_scale", scale.reshape(d, rows, 1).astype(np.float32))
            cast = ir.node("Cast", [codes], attributes={"to": ir.DataType.FLOAT})
            mul = ir.node("Mul", [cast.outputs[0], scale])
            for n in (cast, mul):
                graph.insert_before(node, n)
                copy_scope(node, n)
            mul.outputs[0].name = f"{base}_{tag}_dequantized"
            node.replace_input_with(index, mul.outputs[0])
            stats.add("weight_bytes_before", int(w.nbytes))
            stats.add("weight_bytes_after", int(q.nbytes + d * rows * 4))
        stats.add(f"{node.op_type.lower()}s_quantized")

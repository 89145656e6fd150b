"""int8 weights for constant-weight ``Conv`` and ``ConvTranspose``: one scale per output channel, stored as int8
codes and dequantized by a constant subgraph that ONNX Runtime folds at session load.

    W [C_out, C_in/group, kH, kW] float32  →  Mul(Cast(codes) [- zero point], scale[C_out, 1, 1, 1]) → Conv

The file holds a quarter of the weight bytes; at load ONNX Runtime folds the subgraph back
into a float weight (and a following BatchNormalization into it) and runs its float Conv
kernels (depthwise and grouped convolutions included), so the arithmetic is the float one on
every CPU: nothing depends on an integer kernel that saturates (AVX2's u8×s8 pair sums).
The codes still follow the target's int8 formulation (``graphc.target``). Standard ops of
every opset: a model at opset 11 or 12 keeps its opset (per-axis ``DequantizeLinear`` would
need 13, and raising the opset changes other ops' meaning, Squeeze's for one).

Activations stay float: int8 activations on Conv (``ConvInteger``/``QLinearConv``) would need
per-layer calibrated ranges and, on saturating targets, the slower u8u8 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import (check_max_error, const_array, constant, drop_unused_initializers, int8_weight,
                                  subgraphs, target_form, weight_problem)
from graphc.core.target import Int8Form
from graphc.core.errors import PassError
from graphc.passes._conv_budget import UNCHANGED, float_fallback, unreached_note

_CONV_OPS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class ConvInt8Options:
    min_elements: int = 256  # smaller kernels (a few channels) stay float: scales would cost more than they save
    exclude: tuple[str, ...] = ()  # substrings of node names to leave in float
    form: str = "auto"  # u8s8 | u8u8 | u8s7 | auto (the target's form)
    # > 0: keep the Conv weights that cost the most in float until the output error (mean
    # 1 - cosine of whole outputs on the calibration feeds) is at most this (passes/_conv_budget)
    max_error: float = 0.0

    def __post_init__(self) -> None:
        check_max_error(self.max_error, "Conv")


@register
class QuantizeConv(GraphcPass):
    name = "quantize-conv"
    summary = "int8 Conv weights per output channel (dequantized at load; float arithmetic, exact on every CPU)"
    Options = ConvInt8Options

    @property
    def needs_calibration(self) -> bool:
        return self.options.max_error > 0

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        form = target_form(self.context, self.options.form, self.name, stats)
        kept = self._kept_float(model, form, stats) if self.options.max_error > 0 else {}
        changed = False
        for graph in [model.graph, *subgraphs(model.graph)]:
            done: dict[int, ir.Value] = {}
            for node in list(graph):
                w = self._weight(node, stats)
                if w is None:
                    continue
                if node.inputs[1].name in kept:
                    stats.skip(node.name or node.op_type, kept[node.inputs[1].name])
                    continue
                value = node.inputs[1]
                if id(value) not in done:
                    done[id(value)] = self._dequantized(graph, node, value, w, form, stats)
                node.replace_input_with(1, done[id(value)])
                stats.add("convs_quantized")
                changed = True
            if changed:
                drop_unused_initializers(graph)
        if not changed and not stats.skipped:
            stats.notes.append("no Conv/ConvTranspose with a constant weight found")
        return changed

    def _weight(self, node: ir.Node, stats: PassStats | None) -> np.ndarray | None:
        """The float32 weight to quantize, or None (with the reason in ``stats`` when given)."""
        if node.op_type not in _CONV_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            return None
        w = const_array(node.inputs[1])
        if any(s in (node.name or node.op_type) for s in self.options.exclude):
            reason = "excluded by option"
        elif w is None:
            reason = "weight is not a constant"
        elif w.dtype != np.float32:
            reason = f"weight dtype {w.dtype} is not float32"
        else:
            reason = weight_problem(w, self.options.min_elements)
        if reason is not None:
            if stats is not None:
                stats.skip(node.name or node.op_type, reason)
            return None
        return w

    def _kept_float(self, model: ir.Model, form: Int8Form, stats: PassStats) -> dict[str, str]:
        """Initializer name → why it stays float, for the main graph's Conv weights that the
        error budget (``max_error``) cannot afford at int8."""
        if not self.context.calibration:
            raise PassError(f"max_error={self.options.max_error:g} needs calibration data, and none was given "
                            "(pass --inputs or a model with real data)", pass_name=self.name)
        weights: dict[str, ir.Value] = {}
        deq: dict[str, np.ndarray] = {}
        in_bodies: list[str] = []
        for graph in [model.graph, *subgraphs(model.graph)]:
            for node in graph:
                value = node.inputs[1] if len(node.inputs) > 1 else None
                w = self._weight(node, None)
                if w is None or value is None or not value.name or value.name in deq:
                    continue
                q, scale, zp = int8_weight(w, _channel_axis(node), form.value)
                # initializers and Constant nodes, in the main graph or in If/Loop bodies: the
                # measuring copy feeds each as a main-graph input of its name (_sensitivity)
                weights[value.name] = SimpleNamespace(name=value.name, const_value=ir.tensor(w))
                deq[value.name] = ((q.astype(np.float32) - (float(zp) if zp is not None else 0.0)) * scale).astype(np.float32)
                if graph is not model.graph:
                    in_bodies.append(value.name)
        if not deq:
            return {}
        result = float_fallback(model, weights, deq, self.context.calibration, self.options.max_error,
                                report=lambda done, total: self.context.report("Conv weights, error alone", done, total),
                                always_alone=in_bodies)
        unreached = sorted(n for n in in_bodies if result.alone.get(n, 1.0) <= UNCHANGED)
        if unreached:
            stats.details["conv_unmeasured"] = unreached
            stats.details.setdefault("notices", []).append(unreached_note(len(unreached), "Conv weight(s)", self.context.calibration_source))
        stats.details["conv_error_all_int8"] = round(result.all_error, 6)
        stats.details["conv_error"] = round(result.joint_error, 6)
        stats.notes.append(f"Conv error budget {self.options.max_error:g} on {self.context.calibration_source}: "
                           f"all int8 {result.all_error:.5f}, with {len(result.kept)} kept float {result.joint_error:.5f}")
        if result.joint_error > self.options.max_error:
            stats.notes.append("the budget is not met even with every Conv weight in float: the rest of the error "
                               "comes from elsewhere")
        return {n: f"kept float for the error budget: alone it costs {result.alone[n]:.5f} (budget "
                   f"{self.options.max_error:g})" for n in result.kept}

    def _dequantized(self, graph: ir.Graph, node: ir.Node, value: ir.Value, w: np.ndarray, form: Int8Form,
                     stats: PassStats) -> ir.Value:
        q, scale, zp = int8_weight(w, _channel_axis(node), form.value)
        scale = scale.astype(np.float32)
        base = value.name or f"{node.name or 'conv'}_w"
        codes = constant(graph, f"{base}_{q.dtype.name}", q)
        nodes = [ir.node("Cast", [codes], attributes={"to": ir.DataType.FLOAT})]
        if zp is not None:
            centre = constant(graph, f"{base}_zero_point", np.array(float(zp), np.float32))
            nodes.append(ir.node("Sub", [nodes[-1].outputs[0], centre]))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], constant(graph, f"{base}_scale", scale)]))
        for n in nodes:
            graph.insert_before(node, n)
            copy_scope(node, n)
        nodes[-1].outputs[0].name = f"{base}_dequantized"
        stats.add("weight_bytes_before", int(w.nbytes))
        stats.add("weight_bytes_after", int(q.nbytes + scale.nbytes + (4 if zp is not None else 0)))
        return nodes[-1].outputs[0]


def _channel_axis(node: ir.Node) -> int:
    """Conv: [C_out, C_in/group, k...]; ConvTranspose: [C_in, C_out/group, k...] (per output
    channel where group is 1; the dequantization itself is exact on any axis)."""
    return 1 if node.op_type == "ConvTranspose" and node.attributes.get_int("group", 1) == 1 else 0

"""FFN neuron pruning with STAT-style correction (no retraining).

An FFN is found from its down projection: a float ``MatMul`` by a constant ``[I, H]`` weight
whose input is an element-wise function (Gelu, BiasGelu, SiLU·up, ...) of one or more up
projections (``MatMul`` by ``[H, I]`` constants sharing one input). Neuron ``j`` is column
``j`` of every up projection (and of their biases and any per-channel constant in the
element-wise part) and row ``j`` of the down projection.

Per layer, on the calibration feeds: the neurons contributing least to the down projection's
output (energy ‖h_j‖²‖W_j‖²) go first; the down projection is then refitted on the neurons that
remain by ridge least squares, ``W', b' = argmin ‖H_keep W' + b' - H W - b‖²`` (STAT's
correction; a bias is added when the layer had none). With ``sequential`` (default) the layers
are done in order, each refitted on activations of the model already pruned before it and
targets from the original, so later layers also absorb earlier layers' error.

How much: ``fraction`` or ``count`` of neurons per layer, or ``max_error``: the most neurons
whose corrected output keeps a relative error (lost share of the output's variance on the
calibration tokens) ≤ ``max_error``. With none of them (the default) the pass does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common

from graphc.core import ops
from graphc.core.errors import PreconditionError
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.passes import _prune
from graphc.passes._quant import const_array, constant, drop_unused_initializers
from graphc.passes._ffn_blocks import Ffn, find_ffns
from graphc.core.registry import register

# Ops applied channel by channel along the last axis (constants: scalars or [.., I] vectors).
@dataclass(frozen=True)
class PruneFfnOptions:
    fraction: float = 0.0  # share of the neurons each FFN loses
    count: int = 0  # or: neurons each FFN loses
    max_error: float = 0.0  # or: per-layer budget of relative output error after correction
    correct: bool = True  # refit the down projection by least squares (STAT)
    ridge: float = 1e-3  # ridge λ relative to the mean diagonal of the Gram matrix
    sequential: bool = True  # refit each layer on the activations of the model pruned so far
    min_keep: int = 1  # neurons every FFN keeps
    fractions: tuple[float, ...] = ()  # or: one fraction per FFN, in graph order (0: left alone)


@register
class PruneFfn(GraphcPass):
    name = "prune-ffn"
    summary = "remove FFN neurons chosen on calibration data; refit the down projection (STAT)"
    Options = PruneFfnOptions

    @property
    def needs_calibration(self) -> bool:
        return self._budget().requested or any(self.options.fractions)

    calibration_texts = 256

    def _budget(self) -> _prune.Budget:
        o = self.options
        return _prune.Budget(o.fraction, o.count, o.max_error)

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        budget = self._budget()
        budget.check(self.name, "neurons")
        if not budget.requested and not any(self.options.fractions):
            stats.notes.append("nothing requested (give fraction, count or max_error)")
            return False
        graph = model.graph
        ffns = find_ffns(graph, stats)
        if not ffns:
            kinds = sorted({n.op_type for n in graph})
            raise PreconditionError(f"no FFN found (up MatMul → element-wise → down MatMul); ops seen: "
                                    f"{', '.join(kinds[:20])}", pass_name=self.name)
        budgets = _prune.layer_budgets(budget, self.options.fractions, len(ffns), self.name, "FFN neurons")
        for f in ffns:
            if budget.count and budget.count > f.width - self.options.min_keep:
                raise PreconditionError(
                    f"count={budget.count} neurons asked, but FFN {f.down.node.name} has {f.width} "
                    f"(min_keep {self.options.min_keep})", pass_name=self.name)
        downs = [f.down.node.inputs[0] for f in ffns]
        original = _prune.activations(model, downs, self.context.calibration, pass_name=self.name)
        targets = {}
        for f, v in zip(ffns, downs):
            b = f.down.bias if f.down.bias is not None else 0.0
            targets[v.name] = original[v.name] @ f.down.weight + b
        widths = []
        for i, (f, v) in enumerate(zip(ffns, downs)):
            self.context.report(self.name, i, len(ffns))
            if not budgets[i].requested:
                original.pop(v.name, None)
                targets.pop(v.name)
                widths.append(f.width)
                continue
            if self.options.sequential and i > 0:
                x = _prune.activations(model, [v], self.context.calibration, pass_name=self.name)[v.name]
            else:
                x = original.pop(v.name)
            plan = _prune.plan_layer(x, targets.pop(v.name), f.down, 1, budgets[i], correct=self.options.correct,
                                     ridge=self.options.ridge, min_keep=self.options.min_keep)
            del x
            if len(plan.keep) == f.width:
                stats.notes.append(f"{f.down.node.name}: kept all {f.width} neurons (left as it was)")
                widths.append(f.width)
                continue
            width, fan = f.width, sum(u.weight.shape[0] for u in f.ups) + f.down.weight.shape[1]
            self._apply(graph, f, plan)
            removed = width - len(plan.keep)
            widths.append(len(plan.keep))
            stats.add("neurons_removed", removed)
            stats.add("parameters_removed", removed * fan)
            stats.notes.append(f"{f.down.node.name}: kept {len(plan.keep)}/{width} neurons, {plan.describe()}")
        original.clear()
        stats.add("ffns", len(ffns))
        if not stats.counts.get("neurons_removed"):
            return False
        _prune.set_arch_metadata(model, "intermediate_size", widths)
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
        drop_unused_initializers(graph)
        return True

    def _apply(self, graph: ir.Graph, f: Ffn, plan: _prune.LayerPlan) -> None:
        keep = plan.channels
        for up in f.ups:
            up.set_weight(graph, up.weight[:, keep], "pruned")
            if up.bias_node is not None and up.bias_node.op_type == ops.ADD:
                up.set_bias(graph, up.bias[keep], "pruned")
        for node in f.region:
            for i, x in enumerate(node.inputs):
                c = const_array(x) if x is not None else None
                if c is not None and c.size != 1:
                    node.replace_input_with(i, constant(graph, f"{x.name}_pruned", c[..., keep]))
        _prune.apply_output_refit(graph, f.down, plan, "pruned")
        _prune.forget_shapes([*(u.node for u in f.ups), *(u.bias_node for u in f.ups if u.bias_node), *f.region])

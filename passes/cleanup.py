"""Lossless cleanup passes. Each wraps what onnx_ir / onnxscript already provide."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphc.pass_base import GraphcPass, PassStats
from graphc.registry import register


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


@register
class FoldConstants(GraphcPass):
    name = "fold-constants"
    summary = "constant folding and shape simplification (onnxscript optimizer)"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxscript import optimizer

        before = _count_nodes(model)
        optimizer.optimize(model, num_iterations=2)
        after = _count_nodes(model)
        stats.add("nodes_removed", before - after)
        return before != after


@register
class RemoveUnused(GraphcPass):
    name = "remove-unused"
    summary = "remove dead nodes, unused initializers, functions and opset imports"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        nodes = _count_nodes(model)
        inits = len(model.graph.initializers)
        modified = False
        for p in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified |= p(model).modified
        stats.add("nodes_removed", nodes - _count_nodes(model))
        stats.add("initializers_removed", inits - len(model.graph.initializers))
        return modified


@register
class CommonSubexpressions(GraphcPass):
    name = "cse"
    summary = "common subexpression elimination"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        before = _count_nodes(model)
        modified = common.CommonSubexpressionEliminationPass()(model).modified
        stats.add("nodes_removed", before - _count_nodes(model))
        return modified


@register
class ShapeInference(GraphcPass):
    name = "shape-inference"
    summary = "ONNX shape inference onto the graph's values"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        return common.ShapeInferencePass()(model).modified


@register
class CompactMetadata(GraphcPass):
    name = "compact-metadata"
    summary = "replace the torch exporter's per-node debug metadata with one short graphc.scope"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from graphc.exporters.metadata import compact_node_metadata

        changed = compact_node_metadata(model)
        if changed:
            stats.add("nodes_compacted", changed)
        stale = [k for k in model.metadata_props if k.startswith("pkg.torch.")]
        for key in stale:
            del model.metadata_props[key]
        return bool(changed or stale)

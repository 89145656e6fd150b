"""Lossless cleanup passes. Each wraps what onnx_ir / onnxscript already provide."""

from __future__ import annotations

import ast

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


# Heavy per-node keys the torch exporter writes (stack traces, FX text): tens of KB per layer.
_TORCH_KEYS = (
    "pkg.torch.onnx.stack_trace",
    "pkg.torch.onnx.fx_node",
    "pkg.torch.onnx.class_hierarchy",
    "pkg.torch.onnx.name_scopes",
    "namespace",
)


def scope_from_metadata(props: dict[str, str]) -> str | None:
    """Dotted module path of a node (``encoder.layer.0.attention.self.query``) from the torch
    exporter's ``pkg.torch.onnx.name_scopes`` or ``namespace`` keys."""
    raw = props.get("pkg.torch.onnx.name_scopes")
    if raw:
        try:
            scopes = [s for s in ast.literal_eval(raw) if s]
        except (ValueError, SyntaxError):
            scopes = []
        # The last entry is the op itself (e.g. 'linear'); the one before is the module.
        dotted = [s for s in scopes if "." in s or s.isidentifier()]
        if len(dotted) >= 2:
            return dotted[-2]
    ns = props.get("namespace")
    if ns:
        parts = [p.split(":")[0].strip() for p in ns.split("/") if p.strip()]
        parts = [p for p in parts if p]
        if len(parts) >= 2:
            return parts[-2]
    return None


@register
class CompactMetadata(GraphcPass):
    name = "compact-metadata"
    summary = "replace the torch exporter's per-node debug metadata with one short graphc.scope"

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        modified = False
        for node in model.graph.all_nodes():
            props = node.metadata_props
            if not any(k in props for k in _TORCH_KEYS):
                continue
            scope = scope_from_metadata(dict(props))
            for key in _TORCH_KEYS:
                props.pop(key, None)
            if scope and "graphc.scope" not in props:
                props["graphc.scope"] = scope
            stats.add("nodes_compacted")
            modified = True
        for key in [k for k in model.metadata_props if k.startswith("pkg.torch.export.")]:
            del model.metadata_props[key]
            modified = True
        return modified

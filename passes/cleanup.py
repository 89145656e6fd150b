"""Lossless cleanup passes. Each wraps what onnx_ir / onnxscript already provide."""

from __future__ import annotations

import math

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphc.core.pass_base import GraphcPass, PassStats
from graphc.core.registry import register


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def _fold_size_limit() -> int:
    from onnxscript.optimizer import _constant_folding

    return _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT


def _should_fold(node: ir.Node) -> bool | None:
    """No evaluation whose result onnxscript would throw away for its size anyway.

    onnxscript evaluates a foldable node first and applies its output size limit after (it
    keeps a result over the limit only if it is no larger than the inputs it replaces): a
    few bytes of Expand/Tile/Range/broadcast on constants could allocate gigabytes first
    (Expand of a [1] to [20000, 20000]: 3 GB and 11 s). Outputs without a static shape
    (shape inference ran just before) are not folded.
    """
    budget = max(_fold_size_limit(), sum(v.const_value.size for v in node.inputs if v is not None and v.const_value is not None))
    for out in node.outputs:
        dims = list(out.shape) if out.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims) or math.prod(dims) > budget:
            return False
    return None  # onnxscript's own rules


def uninlinable_functions(model: ir.Model) -> list[str]:
    """Model-local functions whose opset imports differ from the model's for a shared domain
    (valid ONNX when the ops' schemas agree; onnx_ir's inliner refuses them)."""
    out = []
    for function in model.functions.values():
        clash = [d for d, v in function.opset_imports.items() if d in model.opset_imports and model.opset_imports[d] != v]
        if clash:
            out.append(f"{function.domain}::{function.name}")
    return sorted(out)


def optimize(model: ir.Model, num_iterations: int = 2) -> None:
    """onnxscript's optimizer (folding, dead code, CSE, ...) with bounded folding; functions
    are inlined unless one imports another opset version than the model (then all stay)."""
    from graphc.passes._optimizer import optimize_ir  # onnxscript's pipeline, linear in the node count

    inline = not uninlinable_functions(model)
    optimize_ir(model, num_iterations=num_iterations, should_fold=_should_fold, inline=inline)
    forget_dropped_bodies(model)  # an If folded to one branch: the other's reads are gone too


def forget_dropped_bodies(model: ir.Model) -> int:
    """Detach the nodes of subgraphs no longer in the model from the values they read.

    Folding an ``If`` whose condition is constant keeps one branch; the other branch's nodes
    still count as users of the outer values they read (weights in the main graph, for one),
    so those weights would look used and stay in the file. Returns how many uses were dropped."""
    from graphc.passes._quant import subgraphs

    graphs = [model.graph, *subgraphs(model.graph)]
    live = {id(g) for g in graphs}
    dropped = 0
    for graph in graphs:
        for value in [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]:
            for user, index in list(value.uses()):
                if user.graph is None or id(user.graph) not in live:
                    user.replace_input_with(index, None)
                    dropped += 1
    return dropped


@register
class FoldConstants(GraphcPass):
    name = "fold-constants"
    summary = "constant folding and shape simplification (onnxscript optimizer)"
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        before = _count_nodes(model)
        kept = uninlinable_functions(model)
        if kept:
            stats.notes.append(f"functions not inlined (another opset version than the model): {', '.join(kept)}")
        optimize(model, num_iterations=2)
        after = _count_nodes(model)
        stats.add("nodes_removed", before - after)
        return before != after


@register
class RemoveUnused(GraphcPass):
    name = "remove-unused"
    summary = "remove dead nodes, unused initializers, functions and opset imports"
    dtypes = ("float32", "float16")
    keeps_activations = True

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
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        before = _count_nodes(model)
        modified = common.CommonSubexpressionEliminationPass()(model).modified
        stats.add("nodes_removed", before - _count_nodes(model))
        return modified


@register
class ShapeInference(GraphcPass):
    name = "shape-inference"
    summary = "ONNX shape inference onto the graph's values"
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        return common.ShapeInferencePass()(model).modified


@register
class CompactMetadata(GraphcPass):
    name = "compact-metadata"
    summary = "replace the torch exporter's per-node debug metadata with one short graphc.scope"
    dtypes = ("float32", "float16")
    keeps_activations = True

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from graphc.exporters.metadata import compact_node_metadata

        changed = compact_node_metadata(model)
        if changed:
            stats.add("nodes_compacted", changed)
        stale = [k for k in model.metadata_props if k.startswith("pkg.torch.")]
        for key in stale:
            del model.metadata_props[key]
        return bool(changed or stale)

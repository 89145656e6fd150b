"""onnxscript's optimizer pipeline (``onnxscript.optimizer.optimize_ir``), linear in the
number of nodes.

``optimize_ir`` tries each of its default rewrite rules on every node. A rule whose pattern
has several output nodes (``SlicesSplit``: two Slices of one value → one Split) builds an
index of the whole graph on *every* node it is tried on, before looking at the node: a
5,000-node chain took 16 s and a 20,000-node one 218 s. Here each rule is tried only on nodes
of its (first) output node's op type, which is all the matcher would accept anyway, so the
rewrites made are the same; for single-output rules this only skips the matcher's set-up on
every node. Constant folding records each folded value's direct
inputs only (see :func:`_fold_constants_pass`). Everything else is ``optimize_ir``'s own
pipeline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes


def _gated(rule):
    """A copy of a rule that skips nodes its (first) output node cannot match."""
    pattern = getattr(rule, "_target_pattern", None)
    if pattern is None or not pattern.output_nodes:
        return rule
    wanted = pattern.output_nodes[0].op_identifier()
    if wanted is None:  # a pattern node of any op: nothing to gate on
        return rule
    gated = copy.copy(rule)
    try_rewrite = rule.try_rewrite

    def try_rewrite_gated(model, graph_or_function, node, **kwargs):
        if node.op_identifier() != wanted:
            return None
        return try_rewrite(model, graph_or_function, node, **kwargs)

    gated.try_rewrite = try_rewrite_gated
    return gated


def _fold_constants_pass(**kwargs):
    """onnxscript's FoldConstantsPass, recording each folded value's direct inputs only.

    Upstream records, on every folded value, the names of *all* values it was folded from,
    transitively (a set copied from its inputs' sets, and its sorted repr written as value
    metadata): quadratic time and output size on a chain of foldable nodes (20,000 Adds on a
    constant: 140 s, every value carrying up to 20,000 names)."""
    from onnxscript.optimizer import _constant_folding

    class FoldConstantsPass(_constant_folding.FoldConstantsPass):
        def replace_node(self, node, replacement, root) -> None:
            for value in node.inputs:
                if value is not None:
                    value.meta.pop(_constant_folding.FOLDED_FROM_KEY, None)
            super().replace_node(node, replacement, root)

    return FoldConstantsPass(**kwargs)


def default_rules():
    """onnxscript's default rewrite rules, multi-output ones gated by op type."""
    from onnxscript import rewriter

    return [_gated(rule) for rule in rewriter._DEFAULT_REWRITE_RULES]


def optimize_ir(
    model: ir.Model,
    num_iterations: int = 2,
    *,
    should_fold: Callable[[ir.Node], bool | None] = lambda node: None,
    inline: bool = True,
) -> None:
    """``onnxscript.optimizer.optimize_ir`` with the rule gating above (same defaults)."""
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    passes = [
        ir.passes.PassManager(
            [
                _fold_constants_pass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=should_fold,
                ),
                rewriter.RewritePass(default_rules()),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=num_iterations,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    ]
    if inline:
        passes = [common_passes.InlinePass(), *passes]
    ir.passes.Sequential(*passes)(model)

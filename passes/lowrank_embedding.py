"""Low-rank embedding tables (SEE-like): ``Gather(T, ids)`` with T [V, d] ≈ A [V, r] · B [r, d]
becomes ``MatMul(Gather(A, ids), B)``; math (truncated SVD, rank rules) in ``_lowrank``.

A table is factorized only where it lowers cost, r (V + d) < V d (and by at least
``min_saving`` of its parameters under the error rule). Rank from ``rank_rule``: ``error``
(default), the smallest rank whose relative Frobenius error ``||T - A B|| / ||T||`` is at most
``max_error``; or ``ratio``, the rank keeping ``param_ratio`` of the table's parameters.

Tied LM head (the head multiplies by T^T, as SmolLM2's): factorizing only the lookup would
keep T for the head and *add* A and B, so ``tied_head`` decides:

- ``share`` (default): the head shares the factors: ``h · T^T ≈ (h · B^T) · A^T``, where B^T is
  stored (r x d, small) and A^T is a ``Transpose`` of the one stored A (ORT folds it at load).
  The logits then carry the table's approximation error too, and the head gets cheaper.
- ``skip``: such a table is left alone, with the reason in the stats.

Readers of the table other than ``Gather`` (axis 0), ``MatMul`` (as its weight) and a
``Transpose`` feeding ``MatMul`` weights leave the table alone, with the reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, choice, copy_scope
from graphc.passes import _lowrank as lr
from graphc.passes._quant import constant, drop_unused_initializers
from graphc.passes._weights import gather_tables, readable_tables
from graphc.core.registry import register


class TiedHead(str, enum.Enum):
    SHARE = "share"  # the head reads the same factors: h B^T A^T
    SKIP = "skip"  # a table read by a head stays whole


@dataclass(frozen=True)
class LowRankEmbeddingOptions:
    rank_rule: str = lr.RankRule.ERROR.value
    max_error: float = 0.05  # rank_rule="error": relative Frobenius error of the table, in (0, 1)
    param_ratio: float = 0.5  # rank_rule="ratio": fraction of the table's parameters kept, in (0, 1)
    min_saving: float = 0.1  # rank_rule="error": factorize only if it removes >= this fraction
    min_rows: int = 256  # smaller tables (token types, positions of tiny models) stay whole
    tied_head: str = TiedHead.SHARE.value


@register
class LowRankEmbedding(GraphcPass):
    name = "lowrank-embedding"
    summary = "low-rank embedding tables: Gather(T) -> Gather(A) then MatMul(B), tied LM head shares the factors"
    Options = LowRankEmbeddingOptions

    def _validate(self) -> tuple[lr.RankRule, TiedHead]:
        o = self.options
        rule = choice(lr.RankRule, o.rank_rule, "rank_rule", self.name)
        tied = choice(TiedHead, o.tied_head, "tied_head", self.name)
        lr.check_budget(rule, o.max_error, o.param_ratio, o.min_saving, self.name)
        return rule, tied

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        rule, tied = self._validate()
        graph = model.graph
        modified = False
        for value, label, gathers, direct, transposed, table in readable_tables(gather_tables(graph), stats):
            vocab, dim = table.shape
            if table.dtype != np.float32:
                stats.skip(label, f"table dtype {table.dtype} is not float32")
                continue
            if vocab < self.options.min_rows:
                stats.skip(label, f"{vocab} rows < min_rows={self.options.min_rows}")
                continue
            if transposed and tied is TiedHead.SKIP:
                stats.skip(label, "tied to an LM head (tied_head='skip'): factorizing the lookup alone would add "
                                  "parameters")
                continue
            factors = self._factorize(table, rule)
            if isinstance(factors, str):
                stats.skip(label, factors)
                continue
            self._rewrite(graph, value, factors, gathers, direct, transposed)
            producer = value.producer()  # a Constant (or Cast of one) that held the table
            if producer is not None and producer.graph is graph and not value.uses():
                graph.remove(producer, safe=True)
            stats.add("tables_factorized")
            stats.add("table_params_before", vocab * dim)
            stats.add("table_params_after", factors.rank * (vocab + dim))
            stats.add("lookups_rewritten", len(gathers))
            if transposed or direct:
                stats.add("tied_heads_shared", len(transposed) + len(direct))
            stats.notes.append(f"{label}: [{vocab}, {dim}] -> rank {factors.rank}, relative error "
                               f"{factors.error:.4f}" + (" (tied head shares the factors)" if transposed else ""))
            modified = True
        if modified:
            drop_unused_initializers(graph)
        return modified

    def _factorize(self, table: np.ndarray, rule: lr.RankRule) -> lr.Factors | str:
        o = self.options
        vocab, dim = table.shape
        even = lr.break_even_rank(vocab, dim)
        if not np.isfinite(table).all():
            return "table holds non-finite values"
        decomposition = lr.svd(table)
        if rule is lr.RankRule.RATIO:
            rank = lr.ratio_rank(vocab, dim, o.param_ratio)
            if rank < 1:
                return f"[{vocab}, {dim}] table: param_ratio={o.param_ratio} leaves rank 0"
        else:
            rank = lr.error_rank(decomposition[1], o.max_error)
            limit = int(np.floor((1.0 - o.min_saving) * vocab * dim / (vocab + dim)))
            if rank > min(even, limit):
                return (f"rank {rank} needed for max_error={o.max_error} is not below "
                        f"{'break-even rank ' + str(even) if rank > even else f'{limit} (min_saving={o.min_saving})'}"
                        f" of the [{vocab}, {dim}] table")
        return lr.factorize(table, lr.Metric.plain(), rank=rank, decomposition=decomposition)

    def _rewrite(self, graph: ir.Graph, value: ir.Value, factors: lr.Factors, gathers, direct, transposed) -> None:
        base = value.name or "embedding"
        a = constant(graph, f"{base}_lowrank_a", factors.a)  # [V, r]
        b = constant(graph, f"{base}_lowrank_b", factors.b)  # [r, d]
        for node in gathers:
            gather = ir.node(ops.GATHER, [a, node.inputs[1]], attributes={"axis": 0})
            matmul = ir.node(ops.MATMUL, [gather.outputs[0], b])
            if node.name:
                gather.name, matmul.name = f"{node.name}_lowrank", f"{node.name}_lowrank_b"
            self._replace(graph, node, [gather, matmul])
        for node in direct:  # x [.., V] @ T = (x @ A) @ B
            first = ir.node(ops.MATMUL, [node.inputs[0], a])
            second = ir.node(ops.MATMUL, [first.outputs[0], b])
            self._replace(graph, node, [first, second])
        if transposed:
            b_t = constant(graph, f"{base}_lowrank_b_t", np.ascontiguousarray(factors.b.T))  # [d, r]
            for transpose, node in transposed:  # h [.., d] @ T^T = (h @ B^T) @ A^T
                a_t = ir.node("Transpose", [a], attributes={"perm": [1, 0]})
                first = ir.node(ops.MATMUL, [node.inputs[0], b_t])
                second = ir.node(ops.MATMUL, [first.outputs[0], a_t.outputs[0]])
                if node.name:
                    first.name, second.name = f"{node.name}_lowrank_b", f"{node.name}_lowrank_a"
                self._replace(graph, node, [a_t, first, second])
                if transpose.graph is graph and not any(o.uses() or o in graph.outputs for o in transpose.outputs):
                    graph.remove(transpose, safe=True)

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node, new: list[ir.Node]) -> None:
        for n in new:
            copy_scope(node, n)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [new[-1].outputs[0]])

"""Attention-head pruning with STAT-style correction of the output projection (no retraining).

An attention block is found from its core and traced to its four projections (float
``MatMul`` by constant weights): on unfused graphs from a ``Softmax`` (scores ``MatMul`` ← Q, K;
probabilities ``MatMul`` V), on fused ones from ``MultiHeadAttention``, ``GroupQueryAttention``
or the packed ``Attention`` (com.microsoft; its QKV weight is an input of the op). The traces
go through head-preserving ops (Reshape, Transpose, rotary Mul/Add/Slice/Concat/Neg, KV
repetition Unsqueeze/Expand), and forward from the context through Transpose/Reshape to the
output projection.

Grouped KV (``kv_heads`` < ``heads``, e.g. SmolLM2's 9 query / 3 KV heads): the unit removed is a
KV group, one KV head with its ``heads/kv_heads`` query heads, so the groups stay equal and
query head ``i`` keeps reading KV head ``i // rep``. ``count`` is in query heads and must be a
multiple of ``rep``.

Removing heads: columns of Q/K/V (and their biases, also a packed bias input), rows of the
output projection, ``num_heads``/``kv_num_heads``/``qkv_hidden_sizes`` attributes, and head counts
in the block's Reshape/Expand shapes (constant or Concat-built; each rewritten shape is a new
constant or a new Concat for that one consumer, so constants the exporter shares elsewhere are
untouched). Per-head constant attention biases are sliced. The model's ``graphc.arch.num_heads``
/ ``num_kv_heads`` become the largest per-layer count, with ``*_per_layer`` lists beside them.

Which heads: least contribution to the output projection's output on the calibration tokens
(‖ctx_h W_o[h]‖²). Correction: the output projection is refitted by ridge least squares on the
heads that remain to the original output (see ``passes/_prune.py``). Options as in prune-ffn;
with no fraction, count or max_error (the default) the pass does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from graphc.core import ops
from graphc.core.errors import PassError, PreconditionError
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.passes import _prune
from graphc.passes._quant import const_array, constant, drop_unused_initializers
from graphc.passes._attention_blocks import ROTARY, GQA, Block, shape_entries, find_blocks
from graphc.core.registry import register

@dataclass(frozen=True)
class PruneHeadsOptions:
    fraction: float = 0.0  # share of the heads (KV groups) each attention block loses
    count: int = 0  # or: query heads each block loses (a multiple of heads/kv_heads)
    max_error: float = 0.0  # or: per-layer budget of relative output error after correction
    correct: bool = True  # refit the output projection by least squares (STAT)
    ridge: float = 1e-3  # ridge λ relative to the mean diagonal of the Gram matrix
    sequential: bool = True  # refit each layer on the activations of the model pruned so far
    min_keep: int = 1  # heads (KV groups) every block keeps
    fractions: tuple[float, ...] = ()  # or: one fraction per attention block, in graph order (0: left alone)


def _map_shape(entries: list, b: Block, heads: int, kv: int, where: str) -> list:
    """The shape with head counts (and widths heads × head size) of ``b`` changed."""
    out = list(entries)

    def new(value):
        return heads if value == b.heads else kv

    counts = {b.heads, b.kv_heads}
    widths = {b.heads * b.head_dim: heads * b.head_dim, b.kv_heads * b.head_dim: kv * b.head_dim,
              b.heads * b.v_head_dim: heads * b.v_head_dim, b.kv_heads * b.v_head_dim: kv * b.v_head_dim}
    r, last = len(out), out[-1] if out else None
    if r >= 2 and last in widths and last > 0:
        out[-1] = widths[last]
    elif r >= 4 and last in (b.head_dim, b.v_head_dim):
        cand = [i for i in range(1, r - 1) if out[i] in counts]
        if r == 5:  # [B, kv, rep, S, D] or [B, S, kv, rep, D]: the first is the KV count
            cand = [i for i in cand if out[i] == b.kv_heads][:1]
            if cand:
                out[cand[0]] = kv
            return out
        if len(cand) > 1:
            raise PassError(f"{where}: cannot tell the head axis of shape {entries} (several entries equal a head count)")
        if cand:
            out[cand[0]] = new(out[cand[0]])
    return out


def _fix_shape(graph: ir.Graph, node: ir.Node, b: Block, heads: int, kv: int) -> bool:
    got = shape_entries(node.inputs[1])
    if got is None:
        return False
    entries, concat = got
    mapped = _map_shape(entries, b, heads, kv, node.name)
    if mapped == entries:
        return False
    old = node.inputs[1]
    if concat is None:
        node.replace_input_with(1, constant(graph, f"{old.name}_pruned", np.array(mapped, np.int64)))
        return True
    pos, inputs = 0, []
    for x in concat.inputs:
        c = const_array(x)
        if c is None:
            dims = x.shape.dims if x.shape is not None and len(x.shape) == 1 else None
            pos += dims[0] if dims and isinstance(dims[0], int) else 1
            inputs.append(x)
            continue
        n = int(np.asarray(c).size)
        piece = np.array(mapped[pos:pos + n], dtype=c.dtype).reshape(c.shape)
        inputs.append(x if np.array_equal(piece, c) else constant(graph, f"{x.name}_pruned", piece))
        pos += n
    new = ir.node("Concat", inputs, attributes={"axis": 0}, name=_prune.unique_node_name(graph, f"{concat.name}_pruned"))
    graph.insert_before(node, new)
    node.replace_input_with(1, new.outputs[0])
    return True


# --------------------------------------------------------------------------- the pass


@register
class PruneHeads(GraphcPass):
    name = "prune-heads"
    summary = "remove attention heads chosen on calibration data; refit the output projection (STAT)"
    Options = PruneHeadsOptions
    calibration_texts = 256

    @property
    def needs_calibration(self) -> bool:
        return self._budget().requested or any(self.options.fractions)

    def _budget(self) -> _prune.Budget:
        o = self.options
        return _prune.Budget(o.fraction, o.count, o.max_error)

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        budget = self._budget()
        budget.check(self.name, "heads")
        if not budget.requested and not any(self.options.fractions):
            stats.notes.append("nothing requested (give fraction, count or max_error)")
            return False
        blocks, reasons = find_blocks(model, stats)
        if not blocks:
            seen = "; ".join(reasons[:3]) or "no Softmax, MultiHeadAttention, GroupQueryAttention or Attention node"
            raise PreconditionError(f"no attention block found to prune ({seen})", pass_name=self.name)
        self._check_request(blocks)
        budgets = _prune.layer_budgets(budget, self.options.fractions, len(blocks), self.name, "attention heads")
        graph = model.graph
        values = [b.o.node.inputs[0] for b in blocks]
        original = _prune.activations(model, values, self.context.calibration, pass_name=self.name)
        targets = {}
        for b, v in zip(blocks, values):
            targets[v.name] = original[v.name] @ b.o.weight + (b.o.bias if b.o.bias is not None else 0.0)
        per_layer_heads, per_layer_kv = [], []
        for i, (b, v) in enumerate(zip(blocks, values)):
            self.context.report(self.name, i, len(blocks))
            if not budgets[i].requested:
                original.pop(v.name, None)
                targets.pop(v.name)
                per_layer_heads.append(b.heads)
                per_layer_kv.append(b.kv_heads)
                continue
            if self.options.sequential and i > 0:
                x = _prune.activations(model, [v], self.context.calibration, pass_name=self.name)[v.name]
            else:
                x = original.pop(v.name)
            unit = b.rep * b.v_head_dim
            b_units = _prune.Budget(budgets[i].fraction, budgets[i].count // b.rep, budgets[i].max_error)
            plan = _prune.plan_layer(x, targets.pop(v.name), b.o, unit, b_units, correct=self.options.correct,
                                     ridge=self.options.ridge, min_keep=self.options.min_keep)
            del x
            groups = len(plan.keep)
            if groups == b.kv_heads:
                stats.notes.append(f"{b.anchor.name}: kept all {b.heads} heads (left as it was)")
                per_layer_heads.append(b.heads)
                per_layer_kv.append(b.kv_heads)
                continue
            self._apply(graph, b, plan.keep)
            _prune.apply_output_refit(graph, b.o, plan, "pruned")
            removed = b.heads - groups * b.rep
            per_layer_heads.append(groups * b.rep)
            per_layer_kv.append(groups if b.kv_heads != b.heads else groups * b.rep)
            stats.add("heads_removed", removed)
            stats.notes.append(f"{b.anchor.name}: kept {groups * b.rep}/{b.heads} heads, {plan.describe()}")
        original.clear()
        stats.add("attention_blocks", len(blocks))
        if not stats.counts.get("heads_removed"):
            return False
        _prune.set_arch_metadata(model, "num_heads", per_layer_heads)
        _prune.set_arch_metadata(model, "num_kv_heads", per_layer_kv)
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
        drop_unused_initializers(graph)
        return True

    def _check_request(self, blocks: list[Block]) -> None:
        count, keep = self.options.count, self.options.min_keep
        for b in blocks:
            label = f"{b.kind} {b.anchor.name} ({b.heads} heads, {b.kv_heads} KV heads)"
            if count and count % b.rep:
                raise PreconditionError(
                    f"count={count} query heads is not divisible into whole KV groups of {b.rep} in {label}",
                    pass_name=self.name)
            if count and count // b.rep > b.kv_heads - keep:
                raise PreconditionError(f"count={count} heads asked, but {label} has only {b.heads} "
                                        f"(min_keep {keep} group(s))", pass_name=self.name)

    def _apply(self, graph: ir.Graph, b: Block, keep_groups: np.ndarray) -> None:
        heads, kv = len(keep_groups) * b.rep, (len(keep_groups) if b.kv_heads != b.heads else len(keep_groups) * b.rep)
        q_heads = _prune.expand_units(keep_groups, b.rep)
        kv_heads = q_heads if b.kv_heads == b.heads else keep_groups
        q_cols = _prune.expand_units(q_heads, b.head_dim)
        k_cols = _prune.expand_units(kv_heads, b.head_dim)
        v_cols = _prune.expand_units(kv_heads, b.v_head_dim)
        qw, kw = b.heads * b.head_dim, b.kv_heads * b.head_dim
        packed_cols = np.concatenate([q_cols, qw + k_cols, qw + kw + v_cols])
        if b.kind == ops.ATTENTION:
            self._apply_packed_op(graph, b.anchor, packed_cols, heads, b)
        elif b.packed:
            self._slice_linear(graph, b.q, packed_cols)
        else:
            for lin, cols in ((b.q, q_cols), (b.k, k_cols), (b.v, v_cols)):
                self._slice_linear(graph, lin, cols)
        touched = [n for lin in (b.q, b.k, b.v) if lin is not None for n in (lin.node, lin.bias_node) if n is not None]
        for node in b.core:
            if node.domain == ops.MS_DOMAIN and node.op_type == ops.MULTI_HEAD_ATTENTION:
                node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
                bias = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
                if bias is not None:
                    node.replace_input_with(3, constant(graph, f"{node.inputs[3].name}_pruned", bias[packed_cols]))
                self._slice_head_bias(graph, node, 5, q_heads, b.heads)
            elif node.domain == ops.MS_DOMAIN and node.op_type == GQA:
                node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
                node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", kv)
            elif node.domain == ops.MS_DOMAIN and node.op_type == ROTARY and node.attributes.get_int("num_heads", 0):
                n = node.attributes.get_int("num_heads")
                node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads if n == b.heads else kv)
            elif node.op_type in ("Reshape", "Expand") and node.domain == ops.ONNX_DOMAIN:
                _fix_shape(graph, node, b, heads, kv)
            elif node.op_type == "Add":
                for i in range(len(node.inputs)):
                    self._slice_head_bias(graph, node, i, q_heads, b.heads)
        _prune.forget_shapes(touched + b.core)

    @staticmethod
    def _slice_linear(graph: ir.Graph, lin: _prune.Linear, cols: np.ndarray) -> None:
        lin.set_weight(graph, lin.weight[:, cols], "pruned")
        if lin.bias_node is not None and lin.bias is not None:
            lin.set_bias(graph, lin.bias[cols], "pruned")

    @staticmethod
    def _slice_head_bias(graph: ir.Graph, node: ir.Node, i: int, q_heads: np.ndarray, total: int) -> None:
        """A constant [.., heads, S, S] attention bias loses the removed heads' slices."""
        x = node.inputs[i] if len(node.inputs) > i else None
        c = const_array(x) if x is not None else None
        if c is not None and c.ndim == 4 and c.shape[1] == total and total > 1:
            node.replace_input_with(i, constant(graph, f"{x.name}_pruned", c[:, q_heads]))

    @staticmethod
    def _apply_packed_op(graph: ir.Graph, node: ir.Node, cols: np.ndarray, heads: int, b: Block) -> None:
        w = const_array(node.inputs[1])
        node.replace_input_with(1, constant(graph, f"{node.inputs[1].name}_pruned", w[:, cols]))
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is not None:
            node.replace_input_with(2, constant(graph, f"{node.inputs[2].name}_pruned", bias[cols]))
        node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
        if "qkv_hidden_sizes" in node.attributes:
            sizes = [heads * b.head_dim, heads * b.head_dim, heads * b.v_head_dim]
            node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", sizes)

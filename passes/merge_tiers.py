"""Join neighbouring tiers of a split LM head that the plan gave one precision.

``split-vocab`` cuts a tied embedding / LM-head table into row tiers so that ``mixed-precision``
can give each its bits; where the plan then gives neighbouring tiers the same bits and block
size (SmolLM2-135M: three tiers at 8 bits, three at 4), their separate tables only cost kernels:
each tier is a ``MatMulNBits`` of the head and a lookup chain (``Sub``, ``Clip``,
``GatherBlockQuantized``, ``Add``) at every decode step. This pass joins each run of such tiers
into one table, between the plan and the quantizers.

The rewrite is exact (the float function is unchanged, and the quantizers' blocks run along the
hidden size, so a row quantizes alike in any table). Tier k's table T_k is framed by a zero row
on each side, and the tiers' logits are laid end to end in the head's ``Concat``. Tiers a..b
joined are the table T = [T_a; ...; T_b] with the frames kept inside it:

- head: ``MatMul(x, Transpose(T))`` is the ``Concat`` of the tiers' outputs it replaces, so the
  column map that puts the logits back in token order is unchanged;
- lookup: ``Gather(T, Clip(c[id] - off_a, 0, rows(T) - 1))``: an id of tier j in a..b lands on
  its row inside T, any other id on T's first or last row (zero frames), as before on a tier's.

Only tiers whose ``Concat`` carries ``split-vocab``'s mark are touched; tiers planned with hot
rows (``split_rows``) or whose lookups are not the pass's own form are left as they are, with
the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.core.registry import register
from graphc.passes._quant import constant, drop_unused_initializers
from graphc.passes._weights import META_BITS, META_BLOCK, META_HOT_ROWS, drop_dead
from graphc.passes.split_vocab import META_TIERS


@dataclass(frozen=True)
class MergeTiersOptions:
    pass


@dataclass
class _Tier:
    matmul: ir.Node  # MatMul(x, Transpose(T_k))
    transpose: ir.Node
    table: ir.Value  # T_k, a 2-D float constant framed by zero rows
    lookups: dict[int, tuple[ir.Node, ir.Node, ir.Node | None]]  # per lookup site: (Gather, Clip, Sub or None)

    @property
    def plan(self) -> tuple[str | None, str | None]:
        return self.matmul.metadata_props.get(META_BITS), self.matmul.metadata_props.get(META_BLOCK)


@register
class MergeTiers(GraphcPass):
    name = "merge-tiers"
    summary = "neighbouring tiers of a split LM head with one planned precision joined into one table (fewer kernels)"
    Options = MergeTiersOptions
    keeps_activations = True  # float-exact: the same logits and lookups

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        modified = False
        marked = [n for n in graph if n.op_type == "Concat" and META_TIERS in n.metadata_props]
        if not marked:
            stats.notes.append("no LM head split in tiers (split-vocab) found")
        for cat in marked:
            label = cat.metadata_props[META_TIERS]
            tiers = _tiers(graph, cat)
            if isinstance(tiers, str):
                stats.skip(label, tiers)
                continue
            runs, start = [], 0
            for k in range(1, len(tiers) + 1):
                if k == len(tiers) or tiers[k].plan != tiers[start].plan:
                    if k - start > 1:
                        runs.append((start, k))
                    start = k
            if not runs:
                stats.notes.append(f"{label}: no neighbouring tiers share a planned precision")
                continue
            parts = list(cat.inputs)
            old = [cat] + [n for t in tiers for n in (t.matmul, t.transpose)] + [
                n for t in tiers for look in t.lookups.values() for n in (*look, *_adds(look[0])) if n is not None]
            for a, b in reversed(runs):  # from the end: the Concat's positions before a run stay valid
                merged = _merge(graph, tiers[a:b])
                parts[a:b] = [merged]
                bits, block = tiers[a].plan
                stats.add("tiers_merged", b - a - 1)
                stats.notes.append(f"{label}: tiers {a}-{b - 1} ({bits or 'unplanned'} bits, block {block or '-'}) "
                                   "as one table")
            new = ir.node("Concat", parts, attributes=dict(cat.attributes), name=cat.name)
            new.metadata_props.update(cat.metadata_props)
            graph.insert_before(cat, new)
            ir.convenience.replace_all_uses_with(cat.outputs[0], new.outputs[0])
            drop_dead(list({id(n): n for n in old}.values()))  # what the joined tiers leave unused
            modified = True
        if modified:
            drop_unused_initializers(graph)
        return modified


def _adds(look: ir.Node) -> list[ir.Node]:
    return [u for u, _ in look.outputs[0].uses() if u.op_type == "Add"]


def _tiers(graph: ir.Graph, cat: ir.Node) -> list[_Tier] | str:
    """The tiers behind a marked ``Concat`` in order, or why they cannot be joined."""
    tiers = []
    for value in cat.inputs:
        mm = value.producer() if value is not None else None
        tr = mm.inputs[1].producer() if mm is not None and mm.op_type == ops.MATMUL and mm.inputs[1] is not None else None
        table = tr.inputs[0] if tr is not None and tr.op_type == "Transpose" else None
        if table is None or table.const_value is None or len(table.const_value.shape) != 2 or len(value.uses()) != 1:
            return "a tier of the head is not MatMul(x, Transpose(table)) read by the Concat alone"
        if META_HOT_ROWS in mm.metadata_props:
            return "tiers planned with hot rows (split_rows) are kept apart"
        lookups = {}
        for user, index in table.uses():
            if user is tr:
                continue
            clip = user.inputs[1].producer() if user.op_type == ops.GATHER and index == 0 and user.inputs[1] else None
            if clip is None or clip.op_type != "Clip" or user.attributes.get_int("axis", 0) != 0:
                return "a tier's table has a reader other than its head and its clipped lookups"
            sub = clip.inputs[0].producer() if clip.inputs[0] is not None else None
            sub = sub if sub is not None and sub.op_type == "Sub" else None
            where = sub.inputs[0] if sub is not None else clip.inputs[0]  # the ids' columns: one per lookup site
            lookups[id(where)] = (user, clip, sub)
        tiers.append(_Tier(mm, tr, table, lookups))
    if len({tuple(sorted(t.lookups)) for t in tiers}) != 1:
        return "the tiers are not looked up at the same sites"
    for k, t in enumerate(tiers[1:], 1):
        for look, _, _ in t.lookups.values():
            adds = [u for u, _ in look.outputs[0].uses()]
            if len(adds) != 1 or adds[0].op_type != "Add" or adds[0].inputs[1] is not look.outputs[0] \
                    or adds[0].outputs[0].is_graph_output():
                return f"tier {k}'s lookup is not added to the tiers before it"
    return tiers


def _merge(graph: ir.Graph, run: list[_Tier]) -> ir.Value:
    """One table for the tiers of ``run``: its head's output (for the Concat); the lookups
    rewired in the graph. The old nodes are left for the caller to remove once unused."""
    first = run[0]
    table = np.concatenate([t.table.const_value.numpy() for t in run])
    name = f"{first.table.name}_{run[-1].table.name.rsplit('_', 1)[-1]}"  # e.g. W_tier3_tier5
    value = constant(graph, name, table)
    tr = ir.node("Transpose", [value], attributes=dict(first.transpose.attributes))
    mm = ir.node(ops.MATMUL, [first.matmul.inputs[0], tr.outputs[0]], name=first.matmul.name)
    mm.metadata_props.update(first.matmul.metadata_props)
    graph.insert_before(first.matmul, [tr, mm])
    for site, (look, clip, _) in first.lookups.items():
        pos = clip.inputs[0]
        high = constant(graph, f"{name}_high", np.array(len(table) - 1, np.int32))
        new_clip = ir.node("Clip", [pos, clip.inputs[1], high])
        new_look = ir.node(ops.GATHER, [value, new_clip.outputs[0]], attributes={"axis": 0}, name=look.name)
        new_look.metadata_props.update(look.metadata_props)
        graph.insert_before(look, [new_clip, new_look])
        ir.convenience.replace_all_uses_with(look.outputs[0], new_look.outputs[0])
        for t in run[1:]:  # the joined tiers' rows are in new_look: their terms of the sum go
            add = t.lookups[site][0].outputs[0].uses()[0][0]
            ir.convenience.replace_all_uses_with(add.outputs[0], add.inputs[0])
    return mm.outputs[0]

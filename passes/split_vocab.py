"""Split a tied embedding / LM-head table into row tiers by how much each token matters, so that
``mixed-precision`` can give the tiers different bits (frequent tokens int8, the rest int4).

Why: a tied table is both the embedding lookup and the LM head, and on a small LM it is a large
share of the bytes (SmolLM2-135M: 28.3 M of 134.5 M weights). Quantizing the head moves token
v's logit by delta_v; to first order the KL of the next-token distribution grows by
1/2 sum_v p_v delta_v^2 (minus the mean shift), so a row's error costs in proportion to the
probability p_v the model gives its token, and a lookup row's error in proportion to how often
the token is read. Both are concentrated on few rows (Zipf), so a few frequent rows at 8 bits and
the rest at 4 keep most of what int8 keeps at a fraction of its extra bytes.

Importance of row v: the mean of (a) its mean next-token probability under the model on the
calibration feeds (softmax of the head's output, padding left out) and (b) its share of the
lookups the calibration feeds make; ties (rows neither predicted nor read) broken by row norm,
then id. Rows are ranked by it and cut into tiers at the cumulative row ``fractions``
(default 1/32, 1/16, 1/8, 1/4, 1/2: tiers of 1/32, 1/32, 1/16, 1/8, 1/4 and 1/2 of the rows).

The rewrite (exact: the float function is unchanged). Tier k is its own table T_k, its rows
framed by one zero row on each side. With c[v] the column of token v in the tiers laid end to
end (an int32 vector, the only new constant of size V):

- head ``MatMul(x, Transpose(T))`` -> ``GatherElements(Concat_k(MatMul(x, Transpose(T_k))), c, axis=-1)``
  (``c`` expanded to the logits' shape);
- lookup ``Gather(T, ids)`` -> ``sum_k Gather(T_k, Clip(Gather(c, ids) - off_k, 0, V_k + 1))``:
  an id of another tier lands on a zero row (which every block quantizer keeps exactly zero).

Each T_k is again a table tied to a head, which ``mixed-precision``, ``quantize-nbits`` and
``quantize-gather-block`` treat as one weight stored once. Run it after ``awq-scale`` (a head
that no longer makes a graph output directly would otherwise be offered to it) and before
``mixed-precision``. Only tables read by an axis-0 ``Gather`` and through a ``Transpose`` by
``MatMul`` (a tied head) are split; an untied head or lookup is left alone, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.passes import _row_use as row_use
from graphc.passes._quant import constant, drop_unused_initializers
from graphc.passes._weights import gather_tables, readable_tables
from graphc.core.registry import register


MIN_OPSET = 12  # Clip on int32 inputs
# node metadata on the Concat of a split head's tiers (the table's name): each tier's table is
# framed by zero rows and its lookup clips into it, so that ``merge-tiers`` can join tiers again
META_TIERS = "graphc.vocab_tiers"


@dataclass(frozen=True)
class SplitVocabOptions:
    fractions: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # cumulative row shares where tiers end
    feeds: int = 8  # calibration feeds the importance is measured on
    min_rows: int = 1024  # smaller tables are left whole


@register
class SplitVocab(GraphcPass):
    name = "split-vocab"
    summary = "tied embedding/LM-head table split into row tiers by token importance (for per-tier bits)"
    Options = SplitVocabOptions
    needs_calibration = True
    keeps_activations = True  # float-exact: the head's tiers read the same input, the lookup sums to the same rows

    def _validate(self) -> list[float]:
        o = self.options
        try:
            fr = [float(f) for f in o.fractions]
        except (TypeError, ValueError):
            raise UnsupportedError(f"fractions={o.fractions!r}: expected numbers in (0, 1)", pass_name=self.name) from None
        if not fr or any(not 0 < f < 1 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
            raise UnsupportedError(f"fractions={list(o.fractions)}: expected increasing numbers in (0, 1)",
                                   pass_name=self.name)
        if not isinstance(o.feeds, int) or o.feeds < 1:
            raise UnsupportedError(f"feeds={o.feeds!r}; at least 1", pass_name=self.name)
        if not isinstance(o.min_rows, int) or o.min_rows < 2:
            raise UnsupportedError(f"min_rows={o.min_rows!r}; at least 2", pass_name=self.name)
        return fr

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        fractions = self._validate()
        graph = model.graph
        found = []
        for value, label, gathers, direct, transposed, table in readable_tables(gather_tables(graph), stats):
            if direct or not transposed or not gathers:
                stats.skip(label, "not a table tied to an LM head (a Gather and a MatMul through a Transpose)")
                continue
            if table.dtype != np.float32:
                stats.skip(label, f"table dtype {table.dtype} is not float32")
                continue
            if table.shape[0] < self.options.min_rows:
                stats.skip(label, f"{table.shape[0]} rows < min_rows={self.options.min_rows}")
                continue
            found.append((value, table, gathers, transposed))
        if found and model.opset_imports.get("", 0) < MIN_OPSET:
            for value, *_ in found:
                stats.skip(value.name or "table", f"opset {model.opset_imports.get('', 0)} < {MIN_OPSET} "
                                                  "(the tiers' lookups clip int32 positions)")
            return False
        if not found:
            stats.notes.append("no tied embedding / LM-head table found")
            return False
        feeds = list(self.context.calibration or [])[: self.options.feeds]
        if not feeds:
            raise PassError("needs calibration data (tokens are ranked by the model's next-token probabilities and "
                            "the lookups on it), and none was given", pass_name=self.name)
        for value, table, gathers, transposed in found:
            prob, reads = self._importance(model, table.shape[0], gathers, transposed, feeds)
            tiers = _tiers(table, prob, reads, fractions)
            self._rewrite(graph, value, table, tiers, gathers, transposed)
            stats.add("tables_split")
            stats.add("tiers", len(tiers))
            for k, rows in enumerate(tiers):
                stats.notes.append(
                    f"{value.name}: tier {k}: {len(rows)} rows, {prob[rows].sum():.1%} of the next-token probability, "
                    f"{reads[rows].sum():.1%} of the lookups")
        drop_unused_initializers(graph)
        return True

    def _importance(self, model, rows, gathers, transposed, feeds) -> tuple[np.ndarray, np.ndarray]:
        """(mean next-token probability, share of lookups) per row, each summing to 1 (or 0)."""
        from graphc.core.calibrate import exposing_session, token_rows

        heads = [mm.outputs[0].name for _, mm in transposed]
        session, inputs = exposing_session(model, heads)
        prob = np.zeros(rows, np.float64)
        for feed in feeds:
            for out in session.run(heads, {k: v for k, v in feed.items() if k in inputs}):
                logits = token_rows(np.asarray(out, np.float32), feed.get("attention_mask"))
                logits = logits - logits.max(axis=1, keepdims=True)
                p = np.exp(logits)
                prob += (p / p.sum(axis=1, keepdims=True)).sum(axis=0)
        prob = prob / prob.sum() if prob.sum() > 0 else prob
        reads = np.zeros(rows, np.float64)
        for node in gathers:
            ids = row_use.calibration_ids(feeds, node.inputs[1].name) if node.inputs[1] is not None else None
            if ids is not None:
                ids = ids[(ids >= 0) & (ids < rows)]
                reads += np.bincount(ids, minlength=rows)
        reads = reads / reads.sum() if reads.sum() > 0 else reads
        return prob, reads

    def _rewrite(self, graph: ir.Graph, value: ir.Value, table: np.ndarray, tiers, gathers, transposed) -> None:
        base = value.name or "table"
        cols = table.shape[1]
        zero = np.zeros((1, cols), np.float32)
        column = np.empty(table.shape[0], np.int32)  # c[v]: token v's column in the tiers end to end
        tables, offsets, off = [], [], 0
        for k, rows in enumerate(tiers):
            tables.append(constant(graph, f"{base}_tier{k}", np.concatenate([zero, table[rows], zero])))
            column[rows] = off + 1 + np.arange(len(rows), dtype=np.int32)
            offsets.append(off)
            off += len(rows) + 2
        col = constant(graph, f"{base}_tier_column", column)
        for transpose, node in transposed:
            new, parts = [], []
            for k, t in enumerate(tables):
                tr = ir.node("Transpose", [t], attributes={"perm": [1, 0]})
                mm = ir.node(ops.MATMUL, [node.inputs[0], tr.outputs[0]])
                _name(node, mm, f"_tier{k}", f".tier{k}")
                new += [tr, mm]
                parts.append(mm.outputs[0])
            cat = ir.node("Concat", parts, attributes={"axis": -1})
            _name(node, cat, "_tiers", "")
            cat.metadata_props[META_TIERS] = base  # merge-tiers finds the tiers from here
            back = _columns(graph, base, cat.outputs[0], col, table.shape[0])
            for k, n in enumerate(back):
                _name(node, n, "_tier_columns" if n is back[-1] else f"_tier_columns_{k}", "")
            _replace(graph, node, [*new, cat, *back])
            if transpose.graph is graph and not any(o.uses() or o.is_graph_output() for o in transpose.outputs):
                graph.remove(transpose, safe=True)
        for node in gathers:
            where = ir.node(ops.GATHER, [col, node.inputs[1]], attributes={"axis": 0})
            new, total = [where], None
            for k, (t, o) in enumerate(zip(tables, offsets)):
                pos = where.outputs[0]
                if o:
                    sub = ir.node("Sub", [pos, constant(graph, f"{base}_tier{k}_offset", np.array(o, np.int32))])
                    new.append(sub)
                    pos = sub.outputs[0]
                clip = ir.node("Clip", [pos, constant(graph, f"{base}_tier_low", np.array(0, np.int32)),
                                        constant(graph, f"{base}_tier{k}_high", np.array(len(tiers[k]) + 1, np.int32))])
                look = ir.node(ops.GATHER, [t, clip.outputs[0]], attributes={"axis": 0})
                _name(node, look, f"_tier{k}", f".tier{k}")
                new += [clip, look]
                if total is None:
                    total = look.outputs[0]
                else:
                    add = ir.node("Add", [total, look.outputs[0]])
                    new.append(add)
                    total = add.outputs[0]
            _replace(graph, node, new)


def _tiers(table: np.ndarray, prob: np.ndarray, reads: np.ndarray, fractions) -> list[np.ndarray]:
    """Row ids per tier, most important first; ids ascending within a tier."""
    rows = table.shape[0]
    have = [a for a in (prob, reads) if a.sum() > 0]
    score = sum(have) / len(have) if have else np.zeros(rows)
    norm = np.linalg.norm(table.astype(np.float64), axis=1)
    order = np.lexsort((np.arange(rows), -norm, -score))  # last key sorts first
    edges = sorted({int(round(f * rows)) for f in fractions} - {0, rows})
    return [np.sort(part) for part in np.split(order, edges) if len(part)]


def _columns(graph: ir.Graph, base: str, tiers: ir.Value, col: ir.Value, rows: int) -> list[ir.Node]:
    """Nodes that put the tiers' logits back in token order (out[..., v] = tiers[..., c[v]]).

    ``GatherElements`` with ``c`` broadcast to the output's shape, not ``Gather``: ONNX Runtime's
    CPU ``Gather`` on the last axis copies element by element through a generic index loop, 7x
    slower at one token and ~3.5x at 512 (SmolLM2's 49,152 columns, 2 cores, measured in
    docs/genai.md); the result is the same bits."""
    shape = ir.node("Shape", [tiers])
    lead = ir.node("Slice", [shape.outputs[0], constant(graph, f"{base}_tier_zero", np.array([0], np.int64)),
                             constant(graph, f"{base}_tier_last", np.array([-1], np.int64))])
    full = ir.node("Concat", [lead.outputs[0], constant(graph, f"{base}_tier_rows", np.array([rows], np.int64))],
                   attributes={"axis": 0})
    wide = ir.node("Expand", [col, full.outputs[0]])
    back = ir.node("GatherElements", [tiers, wide.outputs[0]], attributes={"axis": -1})
    return [shape, lead, full, wide, back]


def _name(src: ir.Node, dst: ir.Node, suffix: str, scope_suffix: str) -> None:
    copy_scope(src, dst)
    if src.name:
        dst.name = f"{src.name}{suffix}"
    scope = src.metadata_props.get("graphc.scope")
    if scope and scope_suffix:
        dst.metadata_props["graphc.scope"] = f"{scope}{scope_suffix}"


def _replace(graph: ir.Graph, node: ir.Node, new: list[ir.Node]) -> None:
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [new[-1].outputs[0]])

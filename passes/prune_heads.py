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

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from graphc import ops
from graphc.errors import PassError, PreconditionError
from graphc.pass_base import GraphcPass, PassStats
from graphc.passes import _prune
from graphc.passes._quant import const_array, constant, drop_unused_initializers
from graphc.registry import register

GQA = "GroupQueryAttention"
_FUSED = {ops.MULTI_HEAD_ATTENTION, GQA, ops.ATTENTION}
# Ops a projection's output passes through on its way into the attention core; for the
# first group only the data input (0) is followed.
_DATA0 = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Cast", "Identity", "Neg"}
_MIXING = {"Mul", "Add", "Sub", "Div", "Concat"}
_SCORE_OPS = {"Add", "Mul", "Div", "Where", "Cast", "Sub"}
_PROB_OPS = {"Where", "Cast", "Identity", "Dropout"}
_MAX_TRACE = 64
_ROTARY = "RotaryEmbedding"  # com.microsoft; head-preserving on its input 0


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


@dataclass
class Block:
    kind: str  # "Softmax" (unfused) or the fused op's type
    anchor: ir.Node
    q: _prune.Linear | None
    k: _prune.Linear | None
    v: _prune.Linear | None
    o: _prune.Linear
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    core: list[ir.Node] = field(default_factory=list)

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads

    @property
    def packed(self) -> bool:
        return self.q is not None and self.q is self.k


class _NoMatch(Exception):
    pass


# --------------------------------------------------------------------------- finding blocks


def _trace_back(value: ir.Value, core: list[ir.Node]) -> list[_prune.Linear]:
    """The projections feeding ``value`` through head-preserving ops (nodes passed: ``core``)."""
    found: list[_prune.Linear] = []
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        lin = _prune.producer_linear(v)
        if lin is not None:
            if all(f.node is not lin.node for f in found):
                found.append(lin)
            continue
        node = v.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _MAX_TRACE:
            break
        if node.domain == ops.MS_DOMAIN and node.op_type == _ROTARY:
            core.append(node)
            stack.append(node.inputs[0])
        elif node.domain != ops.ONNX_DOMAIN:
            continue
        elif node.op_type in _DATA0:
            core.append(node)
            stack.append(node.inputs[0])
        elif node.op_type in _MIXING:
            core.append(node)
            stack.extend(x for x in node.inputs if x is not None and const_array(x) is None)
    return found


def _one(found: list[_prune.Linear], what: str) -> _prune.Linear:
    if len(found) != 1:
        raise _NoMatch(f"{what} comes from {len(found)} constant-weight projections (needs exactly 1)")
    return found[0]


def _output_projection(value: ir.Value, core: list[ir.Node]) -> _prune.Linear:
    for _ in range(4):
        uses = list(value.uses())
        if len(uses) != 1:
            raise _NoMatch("the attention output is used more than once before its projection")
        user, idx = uses[0]
        lin = _prune.linear(user)
        if lin is not None and idx == 0:
            return lin
        if user.op_type not in ("Transpose", "Reshape") or idx != 0:
            raise _NoMatch(f"the attention output goes to {user.op_type}, not a constant-weight projection")
        core.append(user)
        value = user.outputs[0]
    raise _NoMatch("no output projection found after the attention output")


def _follow(value: ir.Value, allowed: set[str], want: str, back: bool) -> ir.Node:
    """From ``value`` through ``allowed`` ops (backward or forward) to a node of type ``want``."""
    for _ in range(8):
        if back:
            node = value.producer()
            if node is None:
                break
            if node.op_type == want:
                return node
            if node.op_type not in allowed:
                break
            nxt = [x for x in node.inputs if x is not None and const_array(x) is None and x.producer() is not None]
            # the scores come through the input that leads to a MatMul of two variables
            value = next((x for x in nxt if x.producer().op_type in allowed | {want}), None)
            if value is None:
                break
        else:
            # the probabilities may also feed a NaN guard: Where(IsNaN(p), 0, p)
            uses = [(n, i) for n, i in value.uses() if n.op_type != "IsNaN"]
            if len(uses) != 1:
                break
            node, idx = uses[0]
            if node.op_type == want and idx == 0:
                return node
            if node.op_type not in allowed:
                break
            value = node.outputs[0]
    raise _NoMatch(f"no {want} {'before' if back else 'after'} the Softmax")


def _head_dim_from_shapes(core: list[ir.Node], width: int) -> int | None:
    for node in core:
        if node.op_type == "Reshape":
            entries = _shape_entries(node.inputs[1])
            if entries and len(entries[0]) >= 4 and isinstance(entries[0][-1], int) and entries[0][-1] > 0:
                d = entries[0][-1]
                if width % d == 0:
                    return d
    return None


def _match(node: ir.Node, model: ir.Model) -> Block:
    core: list[ir.Node] = []
    if node.op_type == "Softmax":
        scores = _follow(node.inputs[0], _SCORE_OPS, "MatMul", back=True)
        context = _follow(node.outputs[0], _PROB_OPS, "MatMul", back=False)
        if any(const_array(x) is not None for x in scores.inputs):
            raise _NoMatch("the scores MatMul has a constant input")
        q = _one(_trace_back(scores.inputs[0], core), "Q")
        k = _one(_trace_back(scores.inputs[1], core), "K")
        v = _one(_trace_back(context.inputs[1], core), "V")
        o = _output_projection(context.outputs[0], core)
        core += [scores, node, context]
        meta = model.metadata_props.get(f"{ops.META_ARCH_PREFIX}head_dim")
        d = int(meta) if meta and q.weight.shape[1] % int(meta) == 0 else _head_dim_from_shapes(core, q.weight.shape[1])
        if not d:
            raise _NoMatch("cannot tell the head size (no graphc.arch.head_dim and no [.., heads, head_dim] reshape)")
        heads, kv = q.weight.shape[1] // d, k.weight.shape[1] // d
        return _block("Softmax", node, q, k, v, o, heads, kv, d, core)
    if node.op_type == ops.MULTI_HEAD_ATTENTION:
        ins = list(node.inputs) + [None] * (8 - len(node.inputs))
        if ins[1] is None or ins[2] is None:
            raise _NoMatch("packed QKV input (no separate key and value)")
        if any(x is not None for x in ins[6:]):
            raise _NoMatch("has past key/value inputs (a KV cache's head count would change)")
        q = _one(_trace_back(ins[0], core), "Q")
        k = _one(_trace_back(ins[1], core), "K")
        v = _one(_trace_back(ins[2], core), "V")
        heads = node.attributes.get_int("num_heads")
        d = q.weight.shape[1] // heads
        o = _output_projection(node.outputs[0], core)
        return _block(node.op_type, node, q, k, v, o, heads, k.weight.shape[1] // d, d, core + [node])
    if node.op_type == GQA:
        ins = list(node.inputs) + [None] * (9 - len(node.inputs))
        if ins[3] is not None or ins[4] is not None:
            if ins[3] in model.graph.inputs or ins[4] in model.graph.inputs:
                raise _NoMatch("has past key/value graph inputs (a KV cache's head count would change)")
        heads, kv = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
        q = _one(_trace_back(ins[0], core), "Q")
        if ins[1] is None:
            k = v = q
            d = q.weight.shape[1] // (heads + 2 * kv)
        else:
            k = _one(_trace_back(ins[1], core), "K")
            v = _one(_trace_back(ins[2], core), "V")
            d = q.weight.shape[1] // heads
        o = _output_projection(node.outputs[0], core)
        return _block(GQA, node, q, k, v, o, heads, kv, d, core + [node])
    # packed com.microsoft Attention: the QKV weight is the op's input 1
    heads = node.attributes.get_int("num_heads")
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2:
        raise _NoMatch("Attention weights are not a constant 2-D tensor")
    sizes = list(node.attributes.get_ints("qkv_hidden_sizes", []) or [w.shape[1] // 3] * 3)
    if any(len(node.inputs) > i and node.inputs[i] is not None for i in (4, 6, 7)):
        raise _NoMatch("has past or extra inputs")
    o = _output_projection(node.outputs[0], core)
    return Block(ops.ATTENTION, node, None, None, None, o, heads, heads, sizes[0] // heads, sizes[2] // heads,
                 core + [node])


def _block(kind, anchor, q, k, v, o, heads, kv, d, core) -> Block:
    inside = {id(n) for n in core} | {id(anchor)}
    for lin in {id(x): x for x in (q, k, v) if x is not None}.values():
        if any(id(user) not in inside for user, _ in lin.output.uses()):
            raise _NoMatch(f"projection {lin.node.name} is also used outside the attention block")
    if heads <= 0 or kv <= 0 or heads % kv:
        raise _NoMatch(f"{heads} query heads are not divisible into {kv} KV heads")
    q_width = heads * d
    if (not (q is k) and q.weight.shape[1] != q_width) or q_width == 0:
        raise _NoMatch(f"Q width {q.weight.shape[1]} is not divisible into {heads} heads")
    v_width = o.weight.shape[0]
    if v_width % heads:
        raise _NoMatch(f"output projection input {v_width} is not divisible into {heads} heads")
    return Block(kind, anchor, q, k, v, o, heads, kv, d, v_width // heads, core)


def find_blocks(model: ir.Model, stats: PassStats | None = None) -> tuple[list[Block], list[str]]:
    """Attention blocks in graph order, and why each candidate core was not one."""
    blocks, reasons = [], []
    for node in model.graph:
        fused = node.domain == ops.MS_DOMAIN and node.op_type in _FUSED
        if not (fused or (node.op_type == "Softmax" and node.domain == ops.ONNX_DOMAIN)):
            continue
        try:
            blocks.append(_match(node, model))
        except _NoMatch as e:
            reasons.append(f"{node.op_type} {node.name}: {e}")
            if stats is not None:
                stats.skip(node.name or node.op_type, str(e))
    return blocks, reasons


# --------------------------------------------------------------------------- shapes


def _shape_entries(value: ir.Value | None):
    """(entries, pieces) of a shape value: entries are ints or None (unknown); pieces are the
    Concat inputs (None for a constant shape). None if the shape cannot be read at all."""
    if value is None:
        return None
    c = const_array(value)
    if c is not None:
        return [int(x) for x in np.asarray(c).reshape(-1)], None
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain != ops.ONNX_DOMAIN:
        return None
    entries: list[int | None] = []
    for x in node.inputs:
        c = const_array(x)
        if c is not None:
            entries += [int(v) for v in np.asarray(c).reshape(-1)]
        else:
            dims = x.shape.dims if x.shape is not None and len(x.shape) == 1 else None
            n = dims[0] if dims and isinstance(dims[0], int) else 1
            entries += [None] * n
    return entries, node


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
    got = _shape_entries(node.inputs[1])
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
            elif node.domain == ops.MS_DOMAIN and node.op_type == _ROTARY and node.attributes.get_int("num_heads", 0):
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

"""Attention blocks found in a graph and traced to their four projections (used by head
pruning and the planner): from a ``Softmax`` core on unfused graphs, from ``MultiHeadAttention``,
``GroupQueryAttention`` or the packed ``Attention`` on fused ones. See ``prune_heads`` for the
ops the traces go through."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import PassStats
from graphc.passes import _prune
from graphc.passes._quant import const_array

GQA = "GroupQueryAttention"
_FUSED = {ops.MULTI_HEAD_ATTENTION, GQA, ops.ATTENTION}
# Ops a projection's output passes through on its way into the attention core; for the
# first group only the data input (0) is followed.
_DATA0 = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Cast", "Identity", "Neg"}
_MIXING = {"Mul", "Add", "Sub", "Div", "Concat"}
_SCORE_OPS = {"Add", "Mul", "Div", "Where", "Cast", "Sub"}
_PROB_OPS = {"Where", "Cast", "Identity", "Dropout"}
_MAX_TRACE = 64
ROTARY = "RotaryEmbedding"  # com.microsoft; head-preserving on its input 0


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
        if node.domain == ops.MS_DOMAIN and node.op_type == ROTARY:
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
            entries = shape_entries(node.inputs[1])
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


def shape_entries(value: ir.Value | None):
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

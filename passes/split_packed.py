"""Packed projections split into one MatMul each, so that each can be planned and quantized on its
own.

Some models and exporters multiply one input by several projections packed into one weight:
Phi-3's ``qkv_proj`` and ``gate_up_proj`` (the output then cut by ``Slice``s or a ``Split``),
onnxruntime-genai's model builder's Q/K/V (the packed result handed to GroupQueryAttention as its
query). Quantized whole, the projections get one precision; planned apart, ``mixed-precision``
gives each the bits it needs (SmolLM2, planned apart: K and V at 8 bits and Q at 4 in 27 of 30
layers; planned together, +5.87% perplexity against +4.30%, docs/results.md), and
``pack-nbits`` packs again whatever comes out alike. Here a ``MatMul`` with a constant 2-D weight

- whose output only last-axis ``Slice``s (constant bounds, step 1) or one last-axis ``Split``
  read, becomes one MatMul per piece over the weight's column block, in place of the piece;
- that feeds GroupQueryAttention's query when the op has no key and value inputs (through a
  bias ``Add``, split too), becomes three MatMuls (Q, K, V by the op's head counts) fed as the
  op's query, key and value: the separate-input form graphc's own fused exports have.

Exact: each output column is the same dot product.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, constant, drop_unused_initializers

MS = "com.microsoft"
_LAST = 2 ** 62  # an end past any width (exporters write INT64_MAX)


@register
class SplitPacked(GraphcPass):
    name = "split-packed"
    summary = "packed projections (Q/K/V, gate/up) split into one MatMul each (planned and quantized apart)"
    keeps_activations = False  # new MatMul outputs (the inputs a calibration sweep reads are unchanged)
    dtypes = ("float32", "float16")  # exact rewrites: the numbers are moved, not computed

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        changed = False
        for node in list(graph):
            if node.graph is not graph:
                continue  # removed by an earlier rewrite
            if node.op_type == "GroupQueryAttention" and node.domain == MS:
                if len(node.inputs) > 2 and (node.inputs[1] is not None or node.inputs[2] is not None):
                    continue  # separate inputs already
                why = _split_query(graph, node)
                kind = "attentions_split"
            elif node.op_type == ops.MATMUL and node.domain in ("", "ai.onnx"):
                pieces = _pieces(node)
                if pieces is None:
                    continue
                why = _split_matmul(graph, node, pieces)
                kind = "matmuls_split"
            else:
                continue
            if why:
                stats.skip(node.name or node.op_type, why)
                continue
            stats.add(kind)
            changed = True
        if changed:
            drop_unused_initializers(graph)
        return changed


def _weight(node: ir.Node) -> np.ndarray | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = const_array(node.inputs[1])
    return w if w is not None and w.ndim == 2 else None


def _pieces(node: ir.Node) -> list[tuple[ir.Value, int, int]] | None:
    """(output, first column, end column) for each piece the MatMul's readers cut its output into,
    when every reader is a last-axis Slice or the one reader a last-axis Split; else None."""
    w = _weight(node)
    out = node.outputs[0]
    users = [u for u, _ in out.uses()]
    if w is None or not users or out.is_graph_output():
        return None
    n = w.shape[1]
    # the output's rank: its own shape's, else its input's (a MatMul by a 2-D weight keeps it)
    x = node.inputs[0]
    rank = len(out.shape) if out.shape is not None else (len(x.shape) if x is not None and x.shape is not None else None)
    last = {-1} | ({rank - 1} if rank else set())
    if len(users) == 1 and users[0].op_type == "Split" and users[0].domain in ("", "ai.onnx"):
        split = users[0]
        if split.attributes.get_int("axis", 0) not in last:
            return None
        sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        count = len(split.outputs)
        if sizes is None:
            if n % count:
                return None
            sizes = [n // count] * count
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
        if len(sizes) != count or sum(sizes) != n:
            return None
        edges = np.cumsum([0, *sizes])
        if any(o.is_graph_output() for o in split.outputs):
            return None
        return [(o, int(a), int(b)) for o, a, b in zip(split.outputs, edges, edges[1:])]
    pieces = []
    for user in users:
        if user.op_type != "Slice" or user.domain not in ("", "ai.onnx") or user.inputs[0] is not out:
            return None
        bounds = [const_array(v) if i < len(user.inputs) and (v := user.inputs[i]) is not None else None
                  for i in range(1, 5)]
        starts, ends, axes, steps = bounds
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        if axes is None or int(np.asarray(axes).reshape(-1)[0]) not in last:
            return None
        if steps is not None and int(np.asarray(steps).reshape(-1)[0]) != 1:
            return None
        a, b = int(np.asarray(starts).reshape(-1)[0]), int(np.asarray(ends).reshape(-1)[0])
        a, b = (a + n if a < 0 else a), (b + n if b < 0 else min(b, n))
        if not 0 <= a < b <= n:
            return None
        pieces.append((user.outputs[0], a, b))
    if len(pieces) < 2 or any(o.is_graph_output() for o, _, _ in pieces):
        return None
    return pieces


def _matmul(graph: ir.Graph, src: ir.Node, before: ir.Node, w: np.ndarray, a: int, b: int, part: str) -> ir.Node:
    wv = constant(graph, f"{src.inputs[1].name}.{part}", np.ascontiguousarray(w[:, a:b]))
    mm = ir.node(ops.MATMUL, [src.inputs[0], wv], name=f"{src.name or src.inputs[1].name}/{part}")
    copy_scope(src, mm)
    graph.insert_before(before, mm)
    return mm


def _split_matmul(graph: ir.Graph, node: ir.Node, pieces: list[tuple[ir.Value, int, int]]) -> str | None:
    w = _weight(node)
    readers = {id(u): u for u, _ in node.outputs[0].uses()}.values()
    for i, (out, a, b) in enumerate(pieces):
        mm = _matmul(graph, node, node, w, a, b, f"part{i}")
        mm.outputs[0].shape, mm.outputs[0].type = out.shape, out.type
        ir.convenience.replace_all_uses_with(out, mm.outputs[0])
    for reader in list(readers):
        graph.remove(reader, safe=True)
    graph.remove(node, safe=True)
    return None


def _split_query(graph: ir.Graph, attn: ir.Node) -> str | None:
    packed = attn.inputs[0]
    heads = attn.attributes.get_int("num_heads", 0)
    kv = attn.attributes.get_int("kv_num_heads", 0)
    if packed is None or not heads or not kv or len(attn.inputs) < 5:
        return "no packed query, no head counts or no past"
    if len(packed.uses()) != 1 or packed.is_graph_output():
        return "the packed projection has other readers"
    node, bias_node, bias = packed.producer(), None, None
    if node is not None and node.op_type == "Add":
        consts = [const_array(v) for v in node.inputs]
        k = next((i for i, c in enumerate(consts) if c is not None and c.ndim == 1), None)
        if k is None:
            return "the packed projection's Add has no constant bias"
        bias_node, bias = node, consts[k]
        node = node.inputs[1 - k].producer()
        if node is None or len(node.outputs[0].uses()) != 1:
            return "the projection before the bias has other readers"
    if node is None or node.op_type != ops.MATMUL or node.domain not in ("", "ai.onnx"):
        return f"the packed query is made by {node.op_type if node is not None else 'a graph input'}, not a MatMul"
    w = _weight(node)
    if w is None:
        return "the packed projection's weight is not a 2-D constant"
    n = w.shape[1]
    if n % (heads + 2 * kv):
        return f"width {n} is not (num_heads + 2 kv_num_heads) x a head size"
    if bias is not None and bias.shape[0] != n:
        return f"bias of {bias.shape[0]} values for a width of {n}"
    head = n // (heads + 2 * kv)
    cuts = [0, heads * head, (heads + kv) * head, n]
    for i, (part, a, b) in enumerate(zip("qkv", cuts, cuts[1:])):
        out = _matmul(graph, node, attn, w, a, b, part).outputs[0]
        if bias is not None:
            bv = constant(graph, f"{bias_node.name or 'qkv_bias'}.{part}", np.ascontiguousarray(bias[a:b]))
            add = ir.node("Add", [out, bv], name=f"{bias_node.name or bv.name}/{part}")
            copy_scope(bias_node, add)
            graph.insert_before(attn, add)
            out = add.outputs[0]
        attn.replace_input_with(i, out)
    for dead in (bias_node, node):
        if dead is not None:
            graph.remove(dead, safe=True)
    return None

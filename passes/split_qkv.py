"""A packed Q/K/V projection feeding GroupQueryAttention split into its three projections.

onnxruntime-genai's model builder (and any exporter that packs) multiplies the normalized hidden
state by one [hidden, (heads + 2 kv_heads) x head] weight and hands the op the packed result as
its query. Quantized whole, the three projections get one precision; planned apart,
``mixed-precision`` gives them the bits each needs (SmolLM2, planned apart: K and V at 8 bits
and Q at 4 in 27 of 30 layers), and ``pack-nbits`` packs again whatever came out alike. Here
``MatMul(x, W)`` [+ ``Add(bias)``] feeding a GroupQueryAttention's query with no key and value
inputs becomes three MatMuls (and biases) over W's column blocks, fed to the op as its query,
key and value: the op's separate-input form, which graphc's own fused exports have. Exact: each
output column is the same dot product.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, constant, drop_unused_initializers

MS = "com.microsoft"


@register
class SplitQkv(GraphcPass):
    name = "split-qkv"
    summary = "a packed Q/K/V MatMul feeding GroupQueryAttention split into three (planned and quantized apart)"
    keeps_activations = False  # new MatMul outputs (the inputs the sweep reads are unchanged)

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        changed = False
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != MS:
                continue
            label = node.name or "GroupQueryAttention"
            if len(node.inputs) > 2 and (node.inputs[1] is not None or node.inputs[2] is not None):
                continue  # separate inputs already
            why = self._split(graph, node)
            if why:
                stats.skip(label, why)
                continue
            stats.add("attentions_split")
            changed = True
        if changed:
            drop_unused_initializers(graph)
        return changed

    def _split(self, graph: ir.Graph, attn: ir.Node) -> str | None:
        packed = attn.inputs[0]
        heads = attn.attributes.get_int("num_heads", 0)
        kv = attn.attributes.get_int("kv_num_heads", 0)
        if packed is None or not heads or not kv or len(attn.inputs) < 5:
            return "no packed query, no head counts or no past"
        if len(packed.uses()) != 1 or packed in graph.outputs:
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
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2:
            return "the packed projection's weight is not a 2-D constant"
        n = w.shape[1]
        if n % (heads + 2 * kv):
            return f"width {n} is not (num_heads + 2 kv_num_heads) x a head size"
        head = n // (heads + 2 * kv)
        cuts = [0, heads * head, (heads + kv) * head, n]
        if bias is not None and bias.shape[0] != n:
            return f"bias of {bias.shape[0]} values for a width of {n}"
        outs = []
        for part, (a, b) in zip("qkv", zip(cuts, cuts[1:])):
            wv = constant(graph, f"{node.inputs[1].name}.{part}", np.ascontiguousarray(w[:, a:b]))
            mm = ir.node(ops.MATMUL, [node.inputs[0], wv], name=f"{node.name or 'qkv'}/{part}")
            copy_scope(node, mm)
            graph.insert_before(attn, mm)
            out = mm.outputs[0]
            if bias is not None:
                bv = constant(graph, f"{bias_node.name or 'qkv_bias'}.{part}", np.ascontiguousarray(bias[a:b]))
                add = ir.node("Add", [out, bv], name=f"{bias_node.name or 'qkv_bias'}/{part}")
                copy_scope(bias_node, add)
                graph.insert_before(attn, add)
                out = add.outputs[0]
            outs.append(out)
        for i, v in enumerate(outs):
            attn.replace_input_with(i, v)
        for dead in (bias_node, node):
            if dead is not None:
                graph.remove(dead, safe=True)
        return None

"""Pack sibling ``MatMulNBits`` (one input, one layout) into one, with a ``Split`` after it.

A transformer block multiplies one normalized hidden state by Q, K and V (and, in a gated MLP,
by gate and up). Quantized separately these are three (two) ``MatMulNBits`` calls; decoding one
token at a time, each call's fixed cost (the activation's int8 quantization at
``accuracy_level`` 4, the thread pool's dispatch) is paid once per call, and onnxruntime-genai's
model builder stores them packed for that reason. Here nodes that

- read the same input ``A`` and have equal ``K``, ``bits``, ``block_size`` and
  ``accuracy_level``, all with or all without zero points and a bias, and no ``g_idx``,
- hold constant weights, scales (directly or behind one ``Cast``) and zero points that nothing
  else reads (a tied LM head, whose codes an embedding lookup shares, stays as it is),
- and whose output is not a graph output,

become one ``MatMulNBits`` over the rows of all of them (codes, scales, zero points and biases
concatenated along N: each output channel is quantized on its own, so nothing is requantized)
followed by a ``Split`` along the last axis into the original outputs. Each packed node lists
its members in ``graphc.nbits.packed``. ``mixed-precision`` with ``siblings = true`` plans
such groups at one precision so that they can be packed.

Run it after ``quantize-nbits`` and ``quantize-gather-block`` and before ``compact-scales``
(which then compacts the packed scales as one tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import constant, drop_unused_initializers

META_PACKED = "graphc.nbits.packed"
_LAYOUT = ("K", "bits", "block_size", "accuracy_level")


@dataclass(frozen=True)
class PackNBitsOptions:
    min_members: int = 2  # groups smaller than this stay as they are


@dataclass
class _Member:
    node: ir.Node
    b: np.ndarray  # [N, n_blocks, blob] uint8
    scales: np.ndarray  # [N * n_blocks]
    cast: ir.Node | None  # the Cast between the stored scales and the op
    zp: np.ndarray | None
    bias: np.ndarray | None

    @property
    def n(self) -> int:
        return int(self.node.attributes.get_int("N", 0))


@register
class PackNBits(GraphcPass):
    name = "pack-nbits"
    summary = "pack MatMulNBits that read one input with one layout (Q/K/V, gate/up) into one, then Split"
    Options = PackNBitsOptions

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        if self.options.min_members < 2:
            raise UnsupportedError(f"min_members={self.options.min_members}; at least 2", pass_name=self.name)
        graph = model.graph
        groups: dict[tuple, list[_Member]] = {}
        for node in graph:
            member = _member(node, graph)
            if member is None:
                continue
            layout = tuple(node.attributes.get_int(k, 0) for k in _LAYOUT)
            key = (id(node.inputs[0]), layout, member.zp is not None, member.bias is not None,
                   member.scales.dtype.str, member.cast is not None)
            groups.setdefault(key, []).append(member)
        by_input: dict[int, list[tuple]] = {}
        for key, members in groups.items():
            by_input.setdefault(key[0], []).append(key)
        for keys in by_input.values():
            if len(keys) > 1:  # siblings that differ in layout: packed per layout at most
                layouts = [f"{len(groups[k])} x {k[1][1]}-bit b{k[1][2]}" for k in keys]
                first = groups[keys[0]][0].node
                stats.skip(first.name or "MatMulNBits", f"siblings of other layouts stay apart: {', '.join(layouts)}")
                stats.add("sibling_groups_split")
        modified = False
        split_as_input = model.opset_imports.get("", 0) >= 13
        for members in groups.values():
            if len(members) < self.options.min_members:
                continue
            self._pack(graph, members, split_as_input)
            stats.add("groups_packed")
            stats.add("nodes_packed", len(members))
            modified = True
        if modified:
            drop_unused_initializers(graph)  # the members' codes, scales, zero points and biases
        if not modified:
            any_nbits = any(n.op_type == ops.MATMUL_NBITS and n.domain == ops.MS_DOMAIN for n in graph)
            stats.notes.append("no two MatMulNBits read one input with one layout" if any_nbits else
                               "no MatMulNBits in the graph (run quantize-nbits first)")
        return modified

    @staticmethod
    def _pack(graph: ir.Graph, members: list[_Member], split_as_input: bool) -> None:
        first = members[0].node
        base = first.name or "matmul_nbits"
        sizes = [m.n for m in members]
        b = constant(graph, f"{base}_packed_B", np.concatenate([m.b for m in members], axis=0))
        scales = constant(graph, f"{base}_packed_scales", np.concatenate([m.scales.reshape(-1) for m in members]))
        pre: list[ir.Node] = []
        if members[0].cast is not None:
            cast = ir.node(ops.CAST, [scales], attributes={"to": members[0].cast.attributes.get_int("to", 1)})
            pre.append(cast)
            scales = cast.outputs[0]
        inputs: list[ir.Value | None] = [first.inputs[0], b, scales]
        if members[0].zp is not None:
            inputs.append(constant(graph, f"{base}_packed_zero_points",
                                   np.concatenate([m.zp.reshape(m.n, -1) for m in members], axis=0)))
        if members[0].bias is not None:
            while len(inputs) < 5:
                inputs.append(None)
            inputs.append(constant(graph, f"{base}_packed_bias", np.concatenate([m.bias for m in members])))
        attrs = {k: first.attributes.get_int(k, 0) for k in _LAYOUT}
        packed = ir.node(ops.MATMUL_NBITS, inputs, domain=ops.MS_DOMAIN, attributes={**attrs, "N": sum(sizes)},
                         name=f"{base}_packed")
        copy_scope(first, packed)
        out = first.outputs[0]
        packed.outputs[0].type = out.type or first.inputs[0].type
        if out.shape is not None and len(out.shape) >= 1:
            packed.outputs[0].shape = ir.Shape([*out.shape[:-1], sum(sizes)])
        packed.metadata_props[META_PACKED] = ",".join(m.node.name or "?" for m in members)
        if split_as_input:
            split_sizes = constant(graph, f"{base}_packed_split", np.asarray(sizes, np.int64))
            split = ir.node("Split", [packed.outputs[0], split_sizes], attributes={"axis": -1},
                            num_outputs=len(members), name=f"{base}_packed_split")
        else:
            split = ir.node("Split", [packed.outputs[0]], attributes={"axis": -1, "split": sizes},
                            num_outputs=len(members), name=f"{base}_packed_split")
        copy_scope(first, split)
        graph.insert_before(first, [*pre, packed, split])
        for m, out in zip(members, split.outputs):
            old = m.node.outputs[0]
            name, old.name = old.name, None
            out.name, out.shape, out.type = name, old.shape, old.type or first.inputs[0].type
            old.replace_all_uses_with(out)
        for m in members:
            graph.remove(m.node, safe=True)
            if m.cast is not None:
                graph.remove(m.cast, safe=True)


def _member(node: ir.Node, graph: ir.Graph) -> _Member | None:
    """The node as a packable member, or None."""
    if node.op_type != ops.MATMUL_NBITS or node.domain != ops.MS_DOMAIN or node.inputs[0] is None:
        return None
    if len(node.outputs) != 1 or node.outputs[0] in graph.outputs:
        return None
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    if ins[4] is not None or ins[1] is None:  # g_idx: columns reordered per node
        return None
    b = _own_const(ins[1], node)
    if b is None or b.ndim != 3:
        return None
    cast, scales_value = None, ins[2]
    producer = scales_value.producer() if scales_value is not None else None
    if producer is not None and producer.op_type == ops.CAST and len(scales_value.uses()) == 1:
        cast, scales_value = producer, producer.inputs[0]
    scales = _own_const(scales_value, cast or node)
    if scales is None:
        return None
    zp = None
    if ins[3] is not None:
        zp = _own_const(ins[3], node)
        if zp is None:
            return None
    bias = None
    if ins[5] is not None:
        bias = _own_const(ins[5], node)
        if bias is None:
            return None
    n = node.attributes.get_int("N", 0)
    if b.shape[0] != n or scales.size % max(n, 1) or (bias is not None and bias.shape != (n,)):
        return None
    return _Member(node, b, scales, cast, zp, bias)


def _own_const(value: ir.Value | None, reader: ir.Node) -> np.ndarray | None:
    """The constant behind ``value`` when ``reader`` is its only reader."""
    if value is None or value.const_value is None or {id(u) for u, _ in value.uses()} != {id(reader)}:
        return None
    return value.const_value.numpy()

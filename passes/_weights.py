"""Weights as the low-bit passes and the precision planner share them: the node metadata a
plan writes (bits, block size) and reads back, digests that recognise a table tied to an LM
head, the constant behind a (transposed) weight, and who reads an embedding table."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.passes._quant import const_array

META_WEIGHT = "graphc.nbits.weight"  # node metadata: digest of the float W^T [N, K] a MatMulNBits holds
# node metadata written by ``mixed-precision`` on a MatMul/Gather: the bits and block size planned
# for the weight it reads; quantize-nbits and quantize-gather-block follow them over their options
META_BITS = "graphc.quant.bits"
META_BLOCK = "graphc.quant.block_size"
# node metadata from ``mixed-precision`` on a Gather: the rows (comma-separated ids) kept at the
# planned bits; the other rows get META_COLD_BITS / META_COLD_BLOCK
META_HOT_ROWS = "graphc.quant.hot_rows"
META_COLD_BITS = "graphc.quant.cold_bits"
META_COLD_BLOCK = "graphc.quant.cold_block_size"


def weight_digest(w_t: np.ndarray) -> str:
    """Digest of a float32 [N, K] array (what MatMulNBits quantizes; an embedding table tied
    to an LM head has the same digest)."""
    import hashlib

    digest = hashlib.sha256(repr(tuple(np.shape(w_t))).encode())
    rows = max(1, (16 << 20) // max(1, 4 * int(np.prod(np.shape(w_t)[1:], dtype=np.int64))))
    for i in range(0, len(w_t), rows):  # C-order bytes a block of rows at a time: never a copy of the whole
        digest.update(memoryview(np.ascontiguousarray(w_t[i:i + rows], dtype=np.float32)).cast("B"))
    return digest.hexdigest()[:24]


def constant_weight(value: ir.Value | None) -> tuple[np.ndarray, int] | None:
    """The constant array behind ``value`` (initializer, Constant, Cast of one, or a 2-D
    Transpose of one: a tied LM head reads the embedding table transposed), with the identity
    of the stored tensor."""
    if value is None:
        return None
    arr = const_array(value)
    if arr is not None:
        return arr, id(value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        inner = const_array(producer.inputs[0])
        perm = producer.attributes.get_ints("perm", None)
        if inner is not None and inner.ndim == 2 and (perm is None or list(perm) == [1, 0]):
            return inner.T, id(producer.inputs[0])
    return None


def planned_config(node: ir.Node, bits: int, block_size: int) -> tuple[int, int, bool]:
    """(bits, block_size, planned): a ``mixed-precision`` plan's choice written on the node,
    else the given defaults."""
    b, k = node.metadata_props.get(META_BITS), node.metadata_props.get(META_BLOCK)
    if b is None and k is None:
        return bits, block_size, False
    return (int(b) if b else bits), (int(k) if k else block_size), True


def gather_tables(graph: ir.Graph) -> list[ir.Value]:
    """2-D float constants a ``Gather`` reads as its table, in graph order, once each (who else
    reads them: :func:`table_readers`)."""
    seen: dict[int, ir.Value] = {}
    for node in graph:
        if node.op_type == ops.GATHER and node.domain in ("", "ai.onnx") and node.inputs[0] is not None:
            arr = const_array(node.inputs[0])
            if arr is not None and arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
                seen.setdefault(id(node.inputs[0]), node.inputs[0])
    return list(seen.values())


def table_readers(value: ir.Value):
    """(gathers, MatMuls reading the table as weight, (Transpose, MatMul) pairs reading T^T),
    or why the table must stay whole."""
    if value.is_graph_output() or value.is_graph_input():
        return "the table is a graph input or output"
    gathers, direct, transposed = [], [], []
    for node, index in value.uses():
        if node.op_type == ops.GATHER and node.domain in ("", "ai.onnx") and index == 0:
            if node.attributes.get_int("axis", 0) != 0:
                return f"Gather {node.name or ''} on an axis other than 0"
            gathers.append(node)
        elif node.op_type == ops.MATMUL and node.domain in ("", "ai.onnx") and index == 1:
            direct.append(node)
        elif node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            perm = node.attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return f"also read by a Transpose with perm {list(perm)}"
            out = node.outputs[0]
            if out.is_graph_output():
                return "its transpose is a graph output"
            for user, i in out.uses():
                if user.op_type != ops.MATMUL or user.domain not in ("", "ai.onnx") or i != 1:
                    return f"its transpose is also read by {user.op_type} {user.name or ''}".rstrip()
                transposed.append((node, user))
        else:
            return f"also read by {node.op_type} {node.name or ''} (input {index})".rstrip()
    return gathers, direct, transposed


def readable_tables(values, stats):
    """(value, label, gathers, direct, transposed, table array) for each table of ``values``
    that may be rewritten; the others are skipped in ``stats`` with the reason
    (:func:`table_readers`)."""
    from graphc.passes._quant import const_array

    for value in values:
        label = value.name or "table"
        readers = table_readers(value)
        if isinstance(readers, str):
            stats.skip(label, readers)
            continue
        yield (value, label, *readers, const_array(value))


def node_candidates(graph, candidate, stats, nothing: str) -> list:
    """``candidate(graph, node, stats)`` of every node that gives one; ``nothing`` noted in
    ``stats`` when none does."""
    found = [c for n in list(graph) if (c := candidate(graph, n, stats)) is not None]
    if not found:
        stats.notes.append(nothing)
    return found


# ops that only rearrange or relabel constants: an exporter's weight preparation (torch's old
# exporter reorders LSTM gates with Slice + Concat + Unsqueeze, inside If bodies where the
# optimizer leaves a large multi-use constant alone)
_REARRANGING = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Flatten",
                          "Cast"})


def rearranged_constant(value: ir.Value | None, opset: int, max_nodes: int = 64) -> tuple[np.ndarray, list[ir.Node]] | None:
    """The array behind ``value`` when it is a constant, or is computed from constants by
    rearranging ops only (Slice, Concat, Unsqueeze, Reshape, Transpose, ...), evaluated with
    ONNX's reference evaluator at the model's default-domain ``opset``; with the nodes of that computation (empty for a constant), so
    a pass that reads the array in their place can remove the ones nothing else reads."""
    arr = const_array(value)
    if arr is not None:
        return arr, []
    if value is None:
        return None
    cone: list[ir.Node] = []
    leaves: dict[str, np.ndarray] = {}
    stack = [value]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        leaf = const_array(v)
        if leaf is not None:
            if not v.name:
                return None
            leaves[v.name] = leaf
            continue
        node = v.producer()
        if (node is None or node.op_type not in _REARRANGING or node.domain not in ("", "ai.onnx")
                or len(cone) >= max_nodes or any(o is not None and not o.name for o in node.outputs)):
            return None
        cone.append(node)
        stack.extend(i for i in node.inputs if i is not None)
    return _evaluate(cone, leaves, value, opset), cone


def _evaluate(cone: list[ir.Node], leaves: dict[str, np.ndarray], value: ir.Value, opset: int) -> np.ndarray:
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    order = _topological([ir.serde.serialize_node(n) for n in reversed(cone)])
    proto = helper.make_graph(order, "cone", [], [helper.make_tensor_value_info(value.name, 0, None)],
                              [numpy_helper.from_array(a, name) for name, a in leaves.items()])
    model = helper.make_model(proto, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def _topological(nodes):
    produced = {o for n in nodes for o in n.output}
    done: set[str] = set()
    order, pending = [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in done or i not in produced for i in n.input if i)]
        if not ready:
            raise ValueError("cycle in a constant computation")
        for n in ready:
            order.append(n)
            done.update(n.output)
            pending.remove(n)
    return order


def drop_dead(nodes: list[ir.Node]) -> None:
    """Remove those of ``nodes`` whose outputs nothing reads any more (repeatedly: a chain)."""
    alive = list(nodes)
    removed = True
    while removed:
        removed = False
        for node in list(alive):
            if node.graph is not None and not any(o.uses() or o.is_graph_output() for o in node.outputs):
                node.graph.remove(node, safe=True)
                alive.remove(node)
                removed = True

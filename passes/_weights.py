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

    a = np.ascontiguousarray(w_t, dtype=np.float32)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:24]


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

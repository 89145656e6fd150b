"""An LM head stored as its own copy of the embedding table tied again to the table.

Some exporters write a tied model's head as a second initializer: onnxruntime-genai's model
builder stores SmolLM2's ``lm_head`` as a [hidden, vocab] MatMul weight beside the [vocab,
hidden] embedding table, the same numbers transposed (113 MB twice in float32). The copy costs
its bytes, and the passes that treat a tied table as one weight (``split-vocab``'s tiers,
``quantize-gather-block`` reading the head's codes) cannot see the tie. Where a MatMul's
constant weight equals the transpose of a table an axis-0 ``Gather`` reads, bit for bit, the
MatMul reads ``Transpose(table)`` instead (the form graphc's exporter writes for tied weights)
and the copy goes. The builder's own tied form (the head's MatMul reads the weight W, the lookup
``Gather(Transpose(W))``, which constant folding leaves alone when large) is turned into that
form too, the table stored once. Exact: the same numbers reach the MatMul and the Gather.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, constant, drop_unused_initializers
from graphc.passes._weights import gather_tables

SAMPLES = 64  # entries compared before the whole arrays are


@register
class TieHead(GraphcPass):
    name = "tie-head"
    summary = "an LM head stored as a transposed copy of the embedding table reads the table again"
    keeps_activations = True  # the same numbers reach the MatMul
    dtypes = ("float32", "float16")  # exact rewrites: the numbers are moved, not computed

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        turned = _turn_transposed_tables(graph, stats)
        tables = [(v, const_array(v)) for v in gather_tables(graph)]
        if not tables:  # (a turned table is one: not reached after a turn)
            stats.notes.append("no embedding table (a Gather of a 2-D float constant)")
            return turned
        changed = turned
        transposes: dict[int, ir.Value] = {}
        for node in list(graph):
            if node.op_type != ops.MATMUL or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            weight = node.inputs[1]
            if weight.producer() is not None or weight.const_value is None:
                continue  # a Transpose of a table already, or not a constant
            shape = weight.shape
            if shape is None or len(shape) != 2:
                continue
            for table, array in tables:
                if table is weight or tuple(array.shape) != (shape[1], shape[0]):
                    continue
                w = const_array(weight)
                if w is None or w.dtype != array.dtype or not _same_transposed(w, array):
                    continue
                if id(table) not in transposes:
                    t = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name=f"{table.name}/tied_head")
                    copy_scope(node, t)
                    graph.insert_before(node, t)
                    transposes[id(table)] = t.outputs[0]
                node.replace_input_with(1, transposes[id(table)])
                stats.add("heads_tied")
                stats.add("bytes_freed", int(w.nbytes))
                stats.notes.append(f"{node.name or weight.name}: its weight {weight.name!r} is the transposed table "
                                   f"{table.name!r}; it reads the table")
                changed = True
                break
        if changed:
            drop_unused_initializers(graph)
        if not stats.counts.get("heads_tied") and not stats.counts.get("tables_turned"):
            stats.notes.append("no MatMul weight is a transposed copy of an embedding table")
        return changed


def _turn_transposed_tables(graph: ir.Graph, stats: PassStats) -> bool:
    """The other tied form (onnxruntime-genai's model builder writes it): the head's MatMul reads
    the weight W [hidden, vocab] and the lookup ``Gather(Transpose(W))``. Turned into graphc's
    form, the table T = W^T stored once: ``Gather(T)``, the MatMuls ``MatMul(x, Transpose(T))``."""
    changed = False
    for node in list(graph):
        if node.op_type != ops.GATHER or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        transpose = node.inputs[0].producer()
        if transpose is None or transpose.op_type != "Transpose" or transpose.graph is not graph:
            continue
        w = transpose.inputs[0]
        perm = transpose.attributes.get_ints("perm", None)
        array = w.const_value.numpy() if w is not None and w.const_value is not None else None
        if array is None or array.ndim != 2 or (perm is not None and list(perm) != [1, 0]):
            continue
        readers = [(u, i) for u, i in w.uses() if u is not transpose]
        if not readers or any(u.op_type != ops.MATMUL or i != 1 for u, i in readers) or w.is_graph_output():
            continue  # W must be read only as a MatMul weight and by the lookup's Transpose
        table = constant(graph, f"{w.name}.table", np.ascontiguousarray(array.T))
        back = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name=f"{table.name}/tied_head")
        copy_scope(readers[0][0], back)
        graph.insert_before(transpose, back)
        for u, _ in readers:
            u.replace_input_with(1, back.outputs[0])
        for u, i in list(transpose.outputs[0].uses()):
            u.replace_input_with(i, table)
        graph.remove(transpose, safe=True)
        stats.add("tables_turned")
        stats.notes.append(f"{w.name}: the lookup read it through a Transpose; stored once as the table "
                           f"{table.name!r}, the head reads its transpose")
        changed = True
    return changed  # (W, now unread, goes with the caller's drop_unused_initializers)


def _same_transposed(w: np.ndarray, table: np.ndarray) -> bool:
    """w == table.T bit for bit: a few entries first, then row blocks of the table (no
    transposed copy of the whole)."""
    rng = np.random.default_rng(0)
    i = rng.integers(0, table.shape[0], SAMPLES)
    j = rng.integers(0, table.shape[1], SAMPLES)
    if not np.array_equal(w[j, i].view(np.uint8), table[i, j].view(np.uint8)):
        return False
    step = 4096
    for r in range(0, table.shape[0], step):
        if not np.array_equal(np.ascontiguousarray(w[:, r:r + step].T).view(np.uint8),
                              np.ascontiguousarray(table[r:r + step]).view(np.uint8)):
            return False
    return True

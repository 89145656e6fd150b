"""An LM head stored as its own copy of the embedding table tied again to the table.

Some exporters write a tied model's head as a second initializer: onnxruntime-genai's model
builder stores SmolLM2's ``lm_head`` as a [hidden, vocab] MatMul weight beside the [vocab,
hidden] embedding table, the same numbers transposed (113 MB twice in float32). The copy costs
its bytes, and the passes that treat a tied table as one weight (``split-vocab``'s tiers,
``quantize-gather-block`` reading the head's codes) cannot see the tie. Where a MatMul's
constant weight equals the transpose of a table an axis-0 ``Gather`` reads, bit for bit, the
MatMul reads ``Transpose(table)`` instead (the form graphc's exporter writes for tied weights)
and the copy goes. Exact: the same numbers reach the MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, drop_unused_initializers

SAMPLES = 64  # entries compared before the whole arrays are


@register
class TieHead(GraphcPass):
    name = "tie-head"
    summary = "an LM head stored as a transposed copy of the embedding table reads the table again"
    keeps_activations = True  # the same numbers reach the MatMul
    dtypes = ("float32", "float16")  # exact rewrites: the numbers are moved, not computed

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        tables = _tables(graph)
        if not tables:
            stats.notes.append("no embedding table (an axis-0 Gather of a 2-D float constant)")
            return False
        changed = False
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
        else:
            stats.notes.append("no MatMul weight is a transposed copy of an embedding table")
        return changed


def _tables(graph: ir.Graph) -> list[tuple[ir.Value, np.ndarray]]:
    seen: dict[int, tuple[ir.Value, np.ndarray]] = {}
    for node in graph:
        if node.op_type != ops.GATHER or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        if node.attributes.get_int("axis", 0) != 0 or id(node.inputs[0]) in seen:
            continue
        arr = const_array(node.inputs[0])
        if arr is not None and arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating) and arr.shape[0] > 1:
            seen[id(node.inputs[0])] = (node.inputs[0], arr)
    return list(seen.values())


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

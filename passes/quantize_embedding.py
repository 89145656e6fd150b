"""int8 embedding tables: ``Gather(table, ids)`` → ``Gather(int8 table) * Gather(row scales)``.

Each row gets its own symmetric scale, so rare tokens with small norms keep their
precision. Only the gathered rows are dequantized at run time (never the whole table).
Standard ONNX ops only; row scales may be stored as float16 (``scale_dtype``) to save a
further 2 bytes per row, with the rows quantized against the rounded scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import constant, drop_unused_initializers, embedding_table, scale_dtype_for

_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class EmbeddingOptions:
    min_rows: int = 64  # smaller tables (token types) stay float
    scale_dtype: str = "float16"
    per_row: bool = True  # False: one scale for the whole table (smallest, as ORT's QEmbedLayerNorm)


@register
class QuantizeEmbedding(GraphcPass):
    name = "quantize-embedding"
    summary = "int8 embedding tables with per-row scales (Gather of int8 rows, standard ops)"
    Options = EmbeddingOptions

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        if self.options.scale_dtype not in _SCALE_DTYPES:
            raise UnsupportedError(
                f"scale_dtype={self.options.scale_dtype!r}; supported: {', '.join(_SCALE_DTYPES)}",
                pass_name=self.name,
            )
        graph = model.graph
        done: dict[int, tuple[ir.Value, ir.Value]] = {}
        modified = False
        for node in list(graph):
            table = embedding_table(node, stats, self.options.min_rows)
            if table is None:
                continue
            label = node.name or node.op_type
            key = id(node.inputs[0])
            if key not in done:
                done[key] = self._quantize_table(graph, node.inputs[0], table, stats)
            qtable, scales = done[key]
            ids = node.inputs[1]
            rows = ir.node(ops.GATHER, [qtable, ids], attributes={"axis": 0})
            as_float = ir.node(ops.CAST, [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT})
            new = [rows, as_float]
            scale_out = scales
            if self.options.per_row:
                row_scales = ir.node(ops.GATHER, [scales, ids], attributes={"axis": 0})
                new.append(row_scales)
                scale_out = row_scales.outputs[0]
            if scales.dtype != ir.DataType.FLOAT:  # float16 unless it could not hold the scales
                cast_scale = ir.node(ops.CAST, [scale_out], attributes={"to": ir.DataType.FLOAT})
                new.append(cast_scale)
                scale_out = cast_scale.outputs[0]
            mul = ir.node(ops.MUL, [as_float.outputs[0], scale_out])
            new.append(mul)
            for n in new:
                copy_scope(node, n)
            ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [mul.outputs[0]])
            stats.add("gathers_quantized")
            modified = True
        drop_unused_initializers(graph)
        return modified

    def _quantize_table(self, graph: ir.Graph, value: ir.Value, table: np.ndarray, stats: PassStats):
        amax = np.abs(table).max(axis=1, keepdims=True) if self.options.per_row else np.abs(table).max(keepdims=True).reshape(1)
        scale = (amax / 127.0).astype(np.float32)
        scale[scale == 0] = 1
        scale = scale.astype(scale_dtype_for(scale, _SCALE_DTYPES[self.options.scale_dtype]))
        q = np.clip(np.rint(table / scale.astype(np.float32)), -127, 127).astype(np.int8)
        base = value.name or "embedding"
        stats.add("tables_quantized")
        stats.add("table_bytes_before", int(table.nbytes))
        stats.add("table_bytes_after", int(q.nbytes + scale.nbytes))
        suffix = "row_scale" if self.options.per_row else "scale"
        return constant(graph, f"{base}_int8", q), constant(graph, f"{base}_{suffix}", scale)

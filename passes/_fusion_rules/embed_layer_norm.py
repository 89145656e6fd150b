"""BERT embeddings → com.microsoft ``EmbedLayerNormalization``.

    LayerNormalization(Gather(word, ids) + Gather(segment, segment_ids)
                       + Gather(position, Slice(position_ids_buffer, 0, S)))

as both exporters write it for transformers' BertEmbeddings (the position ids are the
model's ``arange`` buffer sliced to the sequence length). ORT's op computes positions
``0..S-1`` itself, so the check proves the buffer is that ``arange``, the slice starts at 0
along the sequence axis with step 1, and ends at the sequence length of the ids. One rule;
variants with and without token types, Adds in either order (commuted).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _static(value: ir.Value | None):
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _is_sequence_length_of(value: ir.Value, inputs: list[ir.Value]) -> bool:
    """``Shape(x, 1, 2)`` or ``Unsqueeze(Gather(Shape(x), 1), 0)`` with x one of ``inputs``."""
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Shape":
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        return (node.inputs[0] in inputs and start is not None and start.as_int() == 1
                and end is not None and end.as_int() == 2)
    if node.op_type == "Unsqueeze":
        gather = node.inputs[0].producer()
        axes = _static(node.inputs[1]) if len(node.inputs) > 1 else None
        if gather is None or gather.op_type != "Gather" or axes is None or axes.reshape(-1).tolist() != [0]:
            return False
        shape = gather.inputs[0].producer()
        index = _static(gather.inputs[1])
        return (shape is not None and shape.op_type == "Shape" and not shape.attributes
                and shape.inputs[0] in inputs and index is not None and int(index.reshape(())) == 1)
    return False


def ln_axis(context) -> int:
    ln = context.root
    axis = ln.attributes.get("axis")
    return axis.as_int() if axis is not None else -1


class EmbedLayerNorm(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, segments: bool) -> None:
        super().__init__(name)
        self._segments = segments

    def pattern(self, op, input_ids, word_table, segment_ids, segment_table, position_table, buffer,
                starts, ends, axes, gamma, beta):
        emb = op.Gather(word_table, input_ids)
        if self._segments:
            emb = op.Add(emb, op.Gather(segment_table, segment_ids))
        positions = op.Slice(buffer, starts, ends, axes, _allow_other_inputs=True, _outputs=["positions"])
        emb = op.Add(emb, op.Gather(position_table, positions))
        return op.LayerNormalization(emb, gamma, beta, _allow_other_attributes=True, _outputs=["ln"])

    def check(self, context, input_ids, word_table, position_table, buffer, starts, ends, axes, gamma, beta,
              positions, segment_ids=None, segment_table=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        axis = ln_axis(context)
        if axis not in (-1, 2):
            return result.fail(f"LayerNormalization over axis {axis}, not the hidden axis", gamma)
        for node in context.nodes:
            if node.op_type == "Gather" and node.attributes.get("axis") is not None and node.attributes["axis"].as_int() != 0:
                return result.fail("an embedding Gather is not along axis 0", node)
        ids = [input_ids] + ([segment_ids] if segment_ids is not None else [])
        for v in ids:
            if v.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or v.shape is None or len(v.shape) != 2:
                return result.fail("ids are not 2-D integers [B, S]", v)
        tables = [word_table, position_table] + ([segment_table] if segment_table is not None else [])
        for t in tables + [gamma, beta]:
            if t.const_value is None:
                return result.fail("an embedding table or the LayerNorm weights are not constant", t)
        if any(t.const_value.dtype != ir.DataType.FLOAT for t in tables + [gamma, beta]):
            return result.fail("EmbedLayerNormalization here is float32 only", word_table)
        hidden = word_table.const_value.shape[-1]
        if any(t.const_value.shape[-1] != hidden for t in tables):
            return result.fail("tables of different widths", position_table)
        table = _static(buffer)
        if table is None or table.ndim != 2 or table.shape[0] != 1 or not np.array_equal(table[0], np.arange(table.shape[1])):
            return result.fail("position ids are not the arange buffer [1, max_positions]", buffer)
        if table.shape[1] > position_table.const_value.shape[0]:
            return result.fail("position buffer longer than the position table", buffer)
        step_node = positions.producer()
        steps = _static(step_node.inputs[4]) if len(step_node.inputs) > 4 and step_node.inputs[4] is not None else np.ones(1)
        if _static(starts) is None or _static(starts).reshape(-1).tolist() != [0]:
            return result.fail("position slice does not start at 0", starts)
        if _static(axes) is None or _static(axes).reshape(-1).tolist() not in ([1], [-1]) or steps is None \
                or steps.reshape(-1).tolist() != [1]:
            return result.fail("position slice is not along the sequence axis with step 1", axes)
        if not _is_sequence_length_of(ends, ids):
            return result.fail("position slice does not end at the ids' sequence length", ends)
        return result

    def rewrite(self, op, input_ids, word_table, position_table, gamma, beta, ln, segment_ids=None,
                segment_table=None, **_):
        epsilon = ln.producer().attributes.get("epsilon")
        ids32 = op.Cast(input_ids, to=ir.DataType.INT32)
        seg32 = op.Cast(segment_ids, to=ir.DataType.INT32) if segment_ids is not None else None
        out, _mask_index = op.EmbedLayerNormalization(  # ORT's schema wants both outputs
            ids32, seg32, word_table, position_table, segment_table, gamma, beta,
            epsilon=epsilon.as_float() if epsilon is not None else 1e-5, _domain="com.microsoft", _outputs=2,
        )
        return out


rules = pattern.RewriteRuleSet([
    EmbedLayerNorm.rule("EmbedLayerNorm", segments=True),
    EmbedLayerNorm.rule("EmbedLayerNorm_no_segments", segments=False),
], commute=True)

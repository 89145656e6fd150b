"""Fused attention reads the key-padding mask, not the exporter's bias tensor.

After ``fuse-ort``, com.microsoft ``Attention`` / ``MultiHeadAttention`` nodes on a dynamo
export take the exporter's additive [batch, 1, seq, seq] float bias (``attention_bias``), built
from ``attention_mask`` by a few dozen ops on every call, and added to every head's scores.
Where that bias is verified (by evaluating it on probe inputs, ``_padding_mask``) to be exactly
the key-padding mask of ``attention_mask``, this pass feeds ORT the mask itself as
``mask_index`` ([batch, seq] int32, which ORT's kernels handle for any padding) and drops the
bias; the bias subgraph is then dead and ``remove-unused`` deletes it. Exact: the same keys
are masked. Causal or other biases are left alone with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.passes._padding_mask import mask_index, padding_bias_problem
from graphc.core.registry import register

# com.microsoft op -> (mask_index input, attention_bias input)
_SLOTS = {"Attention": (3, 5), "MultiHeadAttention": (4, 5)}


@dataclass(frozen=True)
class MaskIndexOptions:
    mask_input: str = "attention_mask"  # the graph input holding the key-padding mask


@register
class AttentionMaskIndex(GraphcPass):
    name = "attention-mask-index"
    summary = "fused attention takes the key-padding mask (mask_index) instead of the exporter's float bias"
    Options = MaskIndexOptions
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        verdicts: dict[str, str | None] = {}
        changed = False
        for node in list(graph):
            if node.domain != ops.MS_DOMAIN or node.op_type not in _SLOTS:
                continue
            mask_slot, bias_slot = _SLOTS[node.op_type]
            label = node.name or node.op_type
            bias = node.inputs[bias_slot] if len(node.inputs) > bias_slot else None
            if bias is None:
                continue
            if len(node.inputs) > mask_slot and node.inputs[mask_slot] is not None:
                stats.skip(label, "already has a mask_index")
                continue
            if any(v is not None for v in node.inputs[bias_slot + 1:]):
                stats.skip(label, "reads inputs after attention_bias (past state)")
                continue
            key = bias.name or str(id(bias))
            if key not in verdicts:
                verdicts[key] = padding_bias_problem(model, bias, self.options.mask_input)
            if verdicts[key] is not None:
                stats.skip(label, verdicts[key])
                continue
            inputs = list(node.inputs) + [None] * max(0, mask_slot + 1 - len(node.inputs))
            inputs[mask_slot] = mask_index(graph, self.options.mask_input)
            inputs = inputs[:bias_slot]
            while inputs and inputs[-1] is None:
                inputs.pop()
            for i in range(len(node.inputs)):
                node.replace_input_with(i, inputs[i] if i < len(inputs) else None)
            node.resize_inputs(len(inputs))
            stats.add("masks_from_attention_mask")
            changed = True
        return changed

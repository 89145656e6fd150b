"""Drop unused optional outputs (mean / inv_std / residual sum of normalization ops).

onnxscript's SkipLayerNormalization fusion emits all four outputs; ORT computes and writes
every declared output, so an unused ``input_skip_bias_sum`` costs a full activation write.
Unused outputs at the end go; an unused one before a used one (the mean and inv_std of a
skip norm whose residual sum feeds the next block) is left unnamed (``""``, ONNX's absent
optional output), as onnxruntime-genai's model builder writes them (on SmolLM2's int4 decoder,
one thread, ``bench/profile_decode.py --threads 1``: the 60 skip norms' kernels 0.42-0.46 ms a
step unnamed against 0.48-0.56 ms named; docs/genai.md).
"""

from __future__ import annotations

import onnx_ir as ir

from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.core.registry import register

# (domain, op) → minimum number of outputs the op needs.
TRIMMABLE = {
    ("com.microsoft", "SkipLayerNormalization"): 1,
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): 1,
    ("", "LayerNormalization"): 1,
    ("com.microsoft", "SimplifiedLayerNormalization"): 1,
}


def _used(value: ir.Value, graph: ir.Graph) -> bool:
    return bool(value.uses()) or value in graph.outputs


@register
class TrimUnusedOutputs(GraphcPass):
    name = "trim-outputs"
    summary = "drop unused optional outputs of normalization ops (saves an activation write each)"
    dtypes = ("float32", "float16")
    keeps_activations = True

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        modified = False
        for node in list(graph):
            minimum = TRIMMABLE.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
            if minimum is None:
                continue
            keep = len(node.outputs)
            while keep > minimum and not _used(node.outputs[keep - 1], graph):
                keep -= 1
            for value in node.outputs[minimum:keep]:
                if value.name and not _used(value, graph):  # absent, before one that is used
                    value.name = ""
                    stats.add("outputs_unnamed")
                    modified = True
            if keep == len(node.outputs):
                continue
            new = ir.node(
                node.op_type,
                list(node.inputs),
                attributes=dict(node.attributes),
                domain=node.domain,
                num_outputs=keep,
                name=node.name,
            )
            copy_scope(node, new)
            new.metadata_props.update({k: v for k, v in node.metadata_props.items() if k not in new.metadata_props})
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], node.outputs[:keep], new.outputs
            )
            stats.add("outputs_dropped", len(node.outputs) - keep)
            modified = True
        return modified

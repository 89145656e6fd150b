"""Transformer fusions into ONNX Runtime's fused ops, reusing onnxscript's ort_fusions rules.

Stops at ``MultiHeadAttention`` by default (``attention = "mha"``): Q, K and V stay separate
MatMuls that the int8 pass can quantize (the packed ``Attention`` op takes its QKV weight as a
float input and would keep 25% of the matmul work in fp32). ``attention = "attention"`` goes
on to the packed op, as onnxscript's ``optimize_for_ort`` does. Attention over a KV cache
(``graphc export --kv-cache``) becomes ``GroupQueryAttention`` with past and present in the op
(``_fusion_rules/gqa_kv.py``), whatever the target.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphc.core.errors import PassError
from graphc.core.pass_base import GraphcPass, PassStats, choice
from graphc.passes._fusion_rules import gemm_matmul, gqa_kv, identity_reshape, normalize, sym_dims
from graphc.passes._fusion_rules.table import FUSIONS, function_for, preparation
from graphc.passes._fusion_rules.shapes import symbolic_shapes
from graphc.passes._fusion_rules.misses import FAMILIES, anchors, best_partial_match, count_ops, miss_reason
from graphc.core.registry import register


_PRIVATE_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate fusion functions


class AttentionTarget(str, enum.Enum):
    NONE = "none"
    MHA = "mha"
    ATTENTION = "attention"


@dataclass(frozen=True)
class FuseOptions:
    attention: str = AttentionTarget.MHA.value
    gelu: bool = True
    normalization: bool = True
    rotary: bool = True
    # off by default: the embedding tables move into the fused op, where quantize-embedding and
    # quantize-gather-block (int8, int4 recipes) no longer find their Gathers
    embed_layer_norm: bool = False


@register
class FuseOrt(GraphcPass):
    name = "fuse-ort"
    summary = "fuse attention, SkipLayerNorm, (Bias)Gelu, RMSNorm, rotary into ORT ops (onnxscript rules)"
    dtypes = ("float32", "float16")
    Options = FuseOptions

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxscript import rewriter

        from graphc.passes.cleanup import optimize  # folding bounded in memory

        target = choice(AttentionTarget, self.options.attention, "attention", self.name)

        counts: dict[str, int] = {}
        before = {f.name: count_ops(model, f.fused_ops) for f in FAMILIES}
        gemm_to_matmul_add, shape_rules = preparation()
        rewriter.rewrite(model, [gemm_to_matmul_add])
        # onnxscript's _pre_optimize, with graphc's bounded optimize
        common.ShapeInferencePass()(model)
        optimize(model)
        shape_rules.apply_to_model(model)
        optimize(model)
        if _has_unknown_dims(model):  # legacy exporter: run-time reshapes; name their dims
            common.ShapeInferencePass()(model)
            stats.add("symbolic_shapes", symbolic_shapes(model))
        normalize.rules.apply_to_model(model)
        if flattened := gemm_matmul.rules.apply_to_model(model):  # GPT-2's Conv1D: before the attention rules
            stats.add("gemm_to_matmul", flattened)
        optimize(model)  # fold what the static dims made constant (legacy rotary slice ends)
        if renamed := sym_dims.canonicalize(model):  # KV cache: "past + S" and "S + past" are one length
            stats.add("canonical_dims", renamed)

        on = {"gelu": self.options.gelu, "normalization": self.options.normalization,
              "embed_layer_norm": self.options.normalization and self.options.embed_layer_norm,
              "rotary": self.options.rotary, "attention": target is not AttentionTarget.NONE}
        for fusion in FUSIONS:
            if not on[fusion.option] or (fusion.when is not None and not fusion.when(counts, target.value)):
                continue
            counts[fusion.key] = int(function_for(fusion)(model, **dict(fusion.kwargs)))
            if fusion.key == "gqa_kv_cache" and (kv_left := gqa_kv.over_cache(model)):
                # the MHA rules below may still take them
                stats.skip(f"GroupQueryAttention with KV cache ({len(kv_left)} unfused, e.g. {kv_left[0].name!r})",
                           best_partial_match(model, [gqa_kv.rules]))
        enabled = {
            "attention": target is not AttentionTarget.NONE, "skip_layer_norm": self.options.normalization,
            "embed_layer_norm": self.options.embed_layer_norm, "gelu": self.options.gelu,
            "rms_norm": self.options.normalization, "rotary": self.options.rotary,
        }
        report_misses(model, stats, before, enabled)  # before optimize inlines unconsumed intermediates
        if reshapes := identity_reshape.apply(model):  # lets Transpose pairs cancel
            stats.add("identity_reshapes", reshapes)
        optimize(model)
        leftovers = [n for n in model.graph.all_nodes() if n.domain.startswith(_PRIVATE_DOMAIN)]
        if leftovers:
            # Never leave onnxscript's private intermediate functions for ORT to choke on.
            common.InlinePass()(model)
            common.RemoveUnusedFunctionsPass()(model)
            stats.notes.append(f"inlined {len(leftovers)} unconsumed intermediate fusion node(s)")
            still = sorted({n.op_type for n in model.graph.all_nodes() if n.domain.startswith(_PRIVATE_DOMAIN)})
            if still:  # no function body to inline (onnxscript's SDPA has none): refuse
                raise PassError(f"onnxscript left its intermediate op(s) {', '.join(still)} in the graph")
        for key, n in counts.items():
            if n:
                stats.add(key, n)
        fused_ops = {}
        for node in model.graph.all_nodes():
            if node.domain == "com.microsoft":
                fused_ops[node.op_type] = fused_ops.get(node.op_type, 0) + 1
        stats.counts.update({f"ops.{k}": v for k, v in sorted(fused_ops.items())})
        if not any(counts.values()):
            stats.notes.append("no fusion pattern matched")
        return any(counts.values())


def _has_unknown_dims(model: ir.Model) -> bool:
    return any(
        not isinstance(d, int) and (d.value is None or str(d.value).startswith("unk__"))
        for node in model.graph for v in node.outputs if v.shape is not None for d in v.shape
    )


def report_misses(model: ir.Model, stats: PassStats, before: dict[str, int], enabled: dict[str, bool]) -> None:
    """Per fusion family switched on: how many it fused, how many instances it left, and why."""
    for family in FAMILIES:
        if not enabled[family.name]:
            continue
        fused = count_ops(model, family.fused_ops) - before[family.name]
        left = anchors(model, family)
        if not fused and not left:
            continue  # the model has none of these
        stats.add(f"fused.{family.name}", fused)
        stats.add(f"misses.{family.name}", len(left))
        line = f"{family.name}: fused {fused}; {len(left)} miss{'es' if len(left) != 1 else ''}"
        if left:
            reason = miss_reason(model, family)
            stats.skip(f"{family.name} ({len(left)} unfused, e.g. {left[0].name!r})", reason)
            line += f" ({reason})"
        stats.notes.append(line)

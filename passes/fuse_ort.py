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

from graphc.errors import PassError
from graphc.pass_base import GraphcPass, PassStats, choice
from graphc.passes._fusion_rules import (
    embed_layer_norm, gelu_tanh, gemm_matmul, gqa, gqa_kv, normalize, quick_gelu, rms_norm, rotary_cache, sym_dims,
)
from graphc.passes._fusion_rules.shapes import symbolic_shapes
from graphc.passes._fusion_rules.misses import FAMILIES, anchors, best_partial_match, count_ops, miss_reason
from graphc.registry import register


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
        from onnxscript.rewriter.ort_fusions import _core as C

        from graphc.passes.cleanup import optimize  # folding bounded in memory

        target = choice(AttentionTarget, self.options.attention, "attention", self.name)

        counts: dict[str, int] = {}
        before = {f.name: count_ops(model, f.fused_ops) for f in FAMILIES}
        rewriter.rewrite(model, [C._gemm_to_matmul_add.gemm_to_matmul_add_rule])
        # C._pre_optimize, with graphc's bounded optimize
        common.ShapeInferencePass()(model)
        optimize(model)
        C.shape_optimization.rules.apply_to_model(model)
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

        def fuse(key: str, func, **kw) -> None:
            counts[key] = int(func(model, **kw))

        if self.options.gelu:
            fuse("erf_gelu", C.fuse_erfgelu)
            fuse("quick_gelu", _apply(quick_gelu.rules))  # CLIP
        if self.options.normalization:
            fuse("rms_normalization", C.fuse_rms_normalization)
            fuse("rms_normalization_opset17", _apply(rms_norm.rules))  # legacy exporter
            if self.options.embed_layer_norm:
                fuse("embed_layer_normalization", _apply(embed_layer_norm.rules))
            fuse("skip_layer_normalization", C.fuse_skip_layer_normalization)
            fuse("skip_rms_normalization", C.fuse_skip_rms_normalization)
        if self.options.rotary:
            fuse("rotary_embedding", C.fuse_rotary_embedding)
            fuse("cos_sin_cache", C.fuse_cos_sin_cache)
            fuse("broadcast_cos_sin_cache", _apply(rotary_cache.rules))  # transformers 5.x
            fuse("partial_rotary_embedding", C.fuse_partial_rotary_embedding)
        if target is not AttentionTarget.NONE:
            fuse("sdpa", C.fuse_sdpa, apply_shape_inference=True)
            fuse("gqa", C.fuse_gqa)
            fuse("gqa_kv_cache", _apply(gqa_kv.rules))  # KV-cache decoders: past/present in the op
            if kv_left := gqa_kv.over_cache(model):  # the MHA rules below may still take them
                stats.skip(f"GroupQueryAttention with KV cache ({len(kv_left)} unfused, e.g. {kv_left[0].name!r})",
                           best_partial_match(model, [gqa_kv.rules]))
            fuse("gqa_untiled", _apply(gqa.rules))  # no KV cache: graphc's exports
            fuse("packed_qkv_for_gqa", C.fuse_qkv_gqa)
            fuse("mha1", C.fuse_mha1)
            fuse("mha2", C.fuse_mha2)
            fuse("mha_scale", C.fuse_mha_scale)
            if counts["mha1"] or counts["mha2"]:
                fuse("mha_bias", C.fuse_mha_bias)
                if target is AttentionTarget.ATTENTION:
                    fuse("attention", C.fuse_attention)
        if self.options.gelu:
            fuse("gelu", C.fuse_gelu)
            fuse("gelu_tanh", _apply(gelu_tanh.rules))  # GPT-2's gelu_new
            fuse("bias_gelu", C.fuse_bias_gelu)
        if target is not AttentionTarget.NONE:
            # SDPA matched but no MHA/GQA rule consumed it (e.g. Llama's GQA with rotary): the
            # intermediate SDPA function becomes MultiHeadAttention, or is inlined back below.
            fuse("sdpa_via_mha", C.replace_sdpa_by_mha)
        enabled = {
            "attention": target is not AttentionTarget.NONE, "skip_layer_norm": self.options.normalization,
            "embed_layer_norm": self.options.embed_layer_norm, "gelu": self.options.gelu,
            "rms_norm": self.options.normalization, "rotary": self.options.rotary,
        }
        report_misses(model, stats, before, enabled)  # before optimize inlines unconsumed intermediates
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


def _apply(rule_set):
    from onnxscript.rewriter import _fusion_utils

    return _fusion_utils.apply_fusion_rules(rule_set)


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

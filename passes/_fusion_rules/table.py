"""The fusions ``fuse-ort`` applies, in order, as one table: key (its count in the stats),
the option that switches it on, where the rule comes from (onnxscript's ORT fusions or graphc's
own rule modules in this package), and an optional condition on what fused before.

Order matters (the rules rewrite each other's inputs: RMSNorm before SkipRMSNorm, SDPA before
the attention rules that consume it, Gelu after attention so that a BiasGelu is not split); a
new fusion is a row here plus its rule module and a test on a hand-built graph
(``tests/passes/test_*_rule.py``). onnxscript's private modules are reached through
:func:`ort_fusion` and :func:`apply_rules` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fusion:
    key: str
    option: str  # "gelu", "normalization", "embed_layer_norm", "rotary" or "attention"
    source: str  # "onnxscript:<fuse function>" or "graphc:<module in _fusion_rules>"
    note: str = ""
    kwargs: tuple[tuple[str, Any], ...] = ()
    # counts so far, attention target → run or not (e.g. mha_bias only after an MHA fusion)
    when: Callable[[dict[str, int], str], bool] | None = None


def _after_mha(counts: dict[str, int], target: str) -> bool:
    return bool(counts.get("mha1") or counts.get("mha2"))


def _packed_attention(counts: dict[str, int], target: str) -> bool:
    return _after_mha(counts, target) and target == "attention"


FUSIONS: tuple[Fusion, ...] = (
    Fusion("erf_gelu", "gelu", "onnxscript:fuse_erfgelu"),
    Fusion("quick_gelu", "gelu", "graphc:quick_gelu", "CLIP"),
    Fusion("rms_normalization", "normalization", "onnxscript:fuse_rms_normalization"),
    Fusion("rms_normalization_opset17", "normalization", "graphc:rms_norm", "legacy exporter"),
    Fusion("centered_rms_normalization", "normalization", "graphc:centered_norm", "Cohere's LayerNorm"),
    Fusion("embed_layer_normalization", "embed_layer_norm", "graphc:embed_layer_norm"),
    Fusion("skip_layer_normalization", "normalization", "onnxscript:fuse_skip_layer_normalization"),
    Fusion("skip_rms_normalization", "normalization", "onnxscript:fuse_skip_rms_normalization"),
    Fusion("rotary_embedding", "rotary", "onnxscript:fuse_rotary_embedding"),
    Fusion("interleaved_rotary_embedding", "rotary", "graphc:interleaved_rotary", "Cohere"),
    Fusion("cos_sin_cache", "rotary", "onnxscript:fuse_cos_sin_cache"),
    Fusion("broadcast_cos_sin_cache", "rotary", "graphc:rotary_cache", "transformers 5.x"),
    Fusion("partial_rotary_embedding", "rotary", "onnxscript:fuse_partial_rotary_embedding"),
    Fusion("disentangled_attention", "attention", "graphc:disentangled_attention", "DeBERTa"),
    Fusion("sdpa", "attention", "onnxscript:fuse_sdpa", kwargs=(("apply_shape_inference", True),)),
    Fusion("gqa", "attention", "onnxscript:fuse_gqa"),
    Fusion("gqa_kv_cache", "attention", "graphc:gqa_kv", "KV-cache decoders: past/present in the op"),
    Fusion("gqa_untiled", "attention", "graphc:gqa", "no KV cache: graphc's exports"),
    Fusion("packed_qkv_for_gqa", "attention", "onnxscript:fuse_qkv_gqa"),
    Fusion("mha1", "attention", "onnxscript:fuse_mha1"),
    Fusion("mha2", "attention", "onnxscript:fuse_mha2"),
    Fusion("mha_scale", "attention", "onnxscript:fuse_mha_scale"),
    Fusion("mha_bias", "attention", "onnxscript:fuse_mha_bias", when=_after_mha),
    Fusion("attention", "attention", "onnxscript:fuse_attention", "packed QKV", when=_packed_attention),
    Fusion("gelu", "gelu", "onnxscript:fuse_gelu"),
    Fusion("gelu_tanh", "gelu", "graphc:gelu_tanh", "GPT-2's gelu_new"),
    Fusion("bias_gelu", "gelu", "onnxscript:fuse_bias_gelu"),
    # SDPA matched but no MHA/GQA rule consumed it (e.g. Llama's GQA with rotary): the
    # intermediate SDPA function becomes MultiHeadAttention, or is inlined back afterwards
    Fusion("sdpa_via_mha", "attention", "onnxscript:replace_sdpa_by_mha"),
)


def ort_fusion(name: str) -> Callable[..., int]:
    """onnxscript's ORT fusion function ``name`` (``onnxscript.rewriter.ort_fusions._core``)."""
    from onnxscript.rewriter.ort_fusions import _core

    return getattr(_core, name)


def apply_rules(rule_set) -> Callable[..., int]:
    """A graphc rule set as a fusion function (model → count), as onnxscript applies its own."""
    from onnxscript.rewriter import _fusion_utils

    return _fusion_utils.apply_fusion_rules(rule_set)


def apply_rules_then_prune(rule_set) -> Callable[..., int]:
    """:func:`apply_rules` for rules that keep the nodes they matched (values several matches
    share, such as rotary's angles): after a match, what they left dead is removed."""

    def apply(model, **kwargs) -> int:
        import onnx_ir.passes.common as common

        count = apply_rules(rule_set)(model, **kwargs)
        if count:
            common.RemoveUnusedNodesPass()(model)
        return count

    return apply


def function_for(fusion: Fusion) -> Callable[..., int]:
    kind, _, name = fusion.source.partition(":")
    if kind == "onnxscript":
        return ort_fusion(name)
    import importlib

    module = importlib.import_module(f"graphc.passes._fusion_rules.{name}")
    return getattr(module, "apply", None) or apply_rules(module.rules)  # a module's own apply: rules + clean-up


def preparation() -> tuple[Any, Any]:
    """onnxscript's preparation before its ORT fusions: its Gemm → MatMul + Add rule and its
    shape-optimization rule set (``_core._pre_optimize``, which fuse-ort runs with graphc's
    bounded constant folding in between)."""
    from onnxscript.rewriter.ort_fusions import _core

    return _core._gemm_to_matmul_add.gemm_to_matmul_add_rule, _core.shape_optimization.rules

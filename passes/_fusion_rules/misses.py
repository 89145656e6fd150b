"""What each fusion family fused, what it left (misses), and why (onnxscript's match tracer).

A miss is an unfused instance of the family's anchor op (a ``Softmax`` for attention, an
``Erf`` for Gelu, ...). Its reason is the best partial match onnxscript's ``MatchingTracer``
finds among the family's rules on the graph as the pass leaves it: the failing check's
message, or the first node where the pattern stopped matching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

MS = "com.microsoft"
FUSION_DOMAIN = "ai.onnxruntime._fusion"


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _is_residual_add(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "Add" and node.domain == ""
            and all(v is not None and v.const_value is None and not v.is_initializer() for v in node.inputs))


def _from_gather(value: ir.Value | None, depth: int = 3) -> bool:
    node = _producer(value)
    if node is None or depth == 0:
        return False
    return node.op_type == "Gather" or (node.op_type == "Add" and any(_from_gather(v, depth - 1) for v in node.inputs))


def _softmax(node: ir.Node) -> bool:
    return node.domain == "" and node.op_type == "Softmax" or (node.domain == FUSION_DOMAIN and node.op_type == "SDPA")


def _skip_ln(node: ir.Node) -> bool:
    return (node.domain == "" and node.op_type == "LayerNormalization" and _is_residual_add(_producer(node.inputs[0]))
            and not _from_gather(node.inputs[0]))


def _embed_ln(node: ir.Node) -> bool:
    """A LayerNorm of an embedding lookup plus something (positions, token types): the op takes a
    word and a position table, so a norm straight after the lookup (no position add: DeBERTa-v3,
    ModernBERT, rotary decoders) is nothing it could fuse."""
    src = _producer(node.inputs[0]) if node.domain == "" and node.op_type == "LayerNormalization" else None
    return src is not None and src.op_type == "Add" and _from_gather(node.inputs[0])


def _erf(node: ir.Node) -> bool:
    """Erf (exact Gelu), a Tanh followed by ``+ 1`` (tanh Gelu), or a Sigmoid of x scaled by a
    constant (quick Gelu)."""
    if node.domain != "":
        return False
    if node.op_type == "Erf":
        return True
    if node.op_type == "Tanh":
        return any(u.op_type == "Add" and any(v is not None and v.const_value is not None for v in u.inputs)
                   for u in node.outputs[0].consumers())
    scale = _producer(node.inputs[0]) if node.op_type == "Sigmoid" else None
    return scale is not None and scale.op_type == "Mul" and any(v is not None and v.const_value is not None
                                                                 for v in scale.inputs)


def _rms(node: ir.Node) -> bool:
    if node.domain != "" or node.op_type != "ReduceMean":
        return False
    src = _producer(node.inputs[0])
    return src is not None and (src.op_type == "Pow" or (src.op_type == "Mul" and src.inputs[0] is src.inputs[1]))


def _rotary(node: ir.Node) -> bool:
    if node.domain == FUSION_DOMAIN and node.op_type == "RotaryEmbedding":
        return True
    if node.domain != "" or node.op_type != "Neg":
        return False
    # rotate-half: -x2 concatenated with x1; interleaved: -x_odd stacked (Unsqueeze, Concat) with x_even
    return any(u.op_type == "Concat" or (u.op_type == "Unsqueeze" and any(c.op_type == "Concat" for c, _ in u.outputs[0].uses()))
               for u, _ in node.outputs[0].uses())


@dataclass(frozen=True)
class Family:
    name: str
    fused_ops: tuple[str, ...]  # the ORT ops it makes (com.microsoft, or ORT's onnx-domain contrib ops)
    anchor: Callable[[ir.Node], bool]  # an unfused instance left in the graph
    rules: Callable[[], Sequence]  # rule sets whose best partial match explains a miss


def _rules_attention():
    from onnxscript.rewriter.ort_fusions import sdpa

    from graphc.passes._fusion_rules import gqa, gqa_kv

    return [sdpa.sdpa_rules, gqa.rules, gqa_kv.rules]


def _rules_skip_ln():
    from onnxscript.rewriter.ort_fusions import skip_normalization

    return [skip_normalization.skip_layer_normalization_ruleset]


def _rules_embed_ln():
    from graphc.passes._fusion_rules import embed_layer_norm

    return [embed_layer_norm.rules]


def _rules_gelu():
    from onnxscript.rewriter.ort_fusions import erfgelu, gelu

    from graphc.passes._fusion_rules import gelu_tanh, quick_gelu

    return [erfgelu.rules, gelu.gelu_rules, gelu_tanh.rules, quick_gelu.rules]


def _rules_rms():
    from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

    from graphc.passes._fusion_rules import rms_norm

    return [rms_normalization.rms_normalization_ruleset, rms_norm.rules, skip_normalization.skip_rms_normalization_ruleset]


def _rules_rotary():
    from onnxscript.rewriter.ort_fusions import cos_sin_cache, rotary_embedding

    from graphc.passes._fusion_rules import interleaved_rotary, rotary_cache

    return [rotary_embedding.rotary_embedding_rules, cos_sin_cache.cos_sin_cache_rules, rotary_cache.rules,
            interleaved_rotary.rules]


FAMILIES: tuple[Family, ...] = (
    Family("attention", ("MultiHeadAttention", "Attention", "GroupQueryAttention"), _softmax, _rules_attention),
    Family("skip_layer_norm", ("SkipLayerNormalization",), _skip_ln, _rules_skip_ln),
    Family("embed_layer_norm", ("EmbedLayerNormalization",), _embed_ln, _rules_embed_ln),
    Family("gelu", ("Gelu", "BiasGelu", "FastGelu", "QuickGelu"), _erf, _rules_gelu),
    Family("rms_norm", ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"), _rms, _rules_rms),
    Family("rotary", ("RotaryEmbedding",), _rotary, _rules_rotary),
)
_CONTRIB_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}  # ORT registers it in the onnx domain


def count_ops(model: ir.Model, op_types: Sequence[str]) -> int:
    return sum(1 for n in model.graph.all_nodes()
               if n.op_type in op_types and (n.domain == MS or (n.domain == "" and n.op_type in _CONTRIB_ONNX_DOMAIN)))


def anchors(model: ir.Model, family: Family) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if family.anchor(n)]


def miss_reason(model: ir.Model, family: Family) -> str:
    """The best partial match of the family's rules, as one line."""
    rule_sets = family.rules()
    if not rule_sets:
        return f"graphc has no {family.name} rule yet"
    return best_partial_match(model, rule_sets)


def best_partial_match(model: ir.Model, rule_sets: Sequence) -> str:
    """The rules' best partial match on the graph, as one line."""
    from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

    best = None  # a failure beats a success: a rule that matched hands over to one that failed
    for rule_set in rule_sets:
        tracer = MatchingTracer()
        rule_set.apply_to_model(model, tracer=tracer)
        for rule, matches in tracer.best_matches_map.items():
            for info in matches:
                key = (info.status != MatchStatus.SUCCESS, info.score())
                if best is None or key > best[0]:
                    best = (key, rule, info)
    if best is None:
        return "no rule matched any node of the pattern"
    _, rule, info = best
    if info.status == MatchStatus.SUCCESS:
        return f"rule {rule} matches here but a later rule did not consume its result"
    what = "check failed" if info.status == MatchStatus.CONDITION_FAILED else "pattern mismatch"
    reason = " ".join((info.match_result.reason or "no reason given").split())
    return f"rule {rule}: {what}: {reason} (best partial match: {len(info.match_result.nodes)} nodes at {info.root_node.name!r})"

"""Grouped-query attention without a KV cache → com.microsoft ``GroupQueryAttention``.

transformers' ``repeat_kv`` tiles each of the ``Hkv`` key/value heads ``G = H / Hkv`` times
(``Unsqueeze(kv, 2)`` → ``Expand`` → ``Reshape`` to ``[B, H, S, D]``) before attention.
onnxscript's own GQA rule wants the KV-cache graph of a generation export; this one takes
the intermediate SDPA op over tiled K/V (the exports graphc makes: no cache) and hands the
untiled K/V to ORT's GQA kernel, which reads each KV head for its group without copying.

The model's mask goes in whole as ``attention_bias`` with ``causal=0``: the op adds it to
Q·Kᵀ as the SDPA did, so the result does not depend on how the batch is padded (GQA's own
causal/``seqlens_k`` masking assumes right padding). The bias is clamped to the lowest finite
float once per mask: onnxscript's SDPA pattern drops the exporter's IsNaN guard, so a -inf
row would otherwise turn NaN and leak into the next layer through K/V. ``seqlens_k`` is ``S - 1`` for every
row and ``total_sequence_length`` is ``S``: every key position is present.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

FUSION_DOMAIN = "ai.onnxruntime._fusion"


def _repeat_kv(op, x, name):
    return op.Reshape(op.Expand(op.Unsqueeze(x, [2]), pattern.ANY_VALUE, _outputs=[f"{name}_tiled"]),
                      pattern.ANY_VALUE)


class UntiledGQA(pattern.RewriteRuleClassBase):
    """One rule; variants with and without a mask (attention bias)."""

    def __init__(self, name: str, *, has_mask: bool) -> None:
        super().__init__(name)
        self._has_mask = has_mask
        self._finite_masks: dict[ir.Value, ir.Value] = {}

    def cleanup(self) -> None:
        self._finite_masks.clear()

    def pattern(self, op, query, key, value, mask):
        inputs = [query, _repeat_kv(op, key, "key"), _repeat_kv(op, value, "value")]
        if self._has_mask:
            inputs.append(mask)
        return op.SDPA(*inputs, key_format="BHSd", _allow_other_attributes=True, _domain=FUSION_DOMAIN,
                       _outputs=["sdpa_output"])

    def check(self, context, query, key, value, key_tiled, value_tiled, mask=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for name, v in (("query", query), ("key", key), ("value", value)):
            if not _ir_utils.has_rank(v, 4):
                return result.fail(f"{name} is not 4-D [B, H, S, D]", v)
        heads, kv_heads, head = query.shape[1], key.shape[1], query.shape[3]
        if not all(isinstance(d, int) for d in (heads, kv_heads, head)):
            return result.fail("head counts or head size are not static", query)
        if value.shape[1] != kv_heads or key.shape[3] != head or value.shape[3] != head:
            return result.fail("key and value heads or head sizes differ", value)
        if kv_heads == 0 or heads % kv_heads or heads == kv_heads:
            return result.fail(f"{heads} query heads over {kv_heads} KV heads is not grouped attention", key)
        for tiled in (key_tiled, value_tiled):
            if tiled.shape is None or len(tiled.shape) != 5 or tiled.shape[1] != kv_heads or tiled.shape[2] != heads // kv_heads:
                return result.fail(f"K/V are not tiled [B, {kv_heads}, {heads // kv_heads}, S, D]", tiled)
        if query.shape[2] != key.shape[2] or not (query.shape[2] == value.shape[2]):
            return result.fail("query and key lengths differ (a KV cache): not handled", key)
        if mask is not None:
            if mask.dtype != query.dtype:
                return result.fail("the mask is not an additive bias of the query's type", mask)
            if mask.shape is None or len(mask.shape) != 4 or mask.shape[1] not in (1, heads):
                return result.fail("the mask is not [B or 1, H or 1, S, S]", mask)
        self._heads, self._kv_heads, self._head = heads, kv_heads, head
        return result

    def _scale_and_extra(self, sdpa_output: ir.Value, bound: dict) -> tuple[float, dict]:
        """The op's ``scale`` and any further attributes, from what the pattern bound."""
        return sdpa_scale(sdpa_output, self._head), {}

    def rewrite(self, op, query, key, value, mask=None, sdpa_output=None, **bound):
        scale, extra = self._scale_and_extra(sdpa_output, bound)
        to_3d = op.Constant(value_ints=[0, 0, -1])
        q, k, v = (op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), to_3d) for x in (query, key, value))
        length = op.Shape(key, start=2, end=3)  # [1], int64
        total = op.Cast(op.Squeeze(length, op.Constant(value_ints=[0])), to=ir.DataType.INT32)
        batch = op.Shape(query, start=0, end=1)
        seqlens = op.Cast(op.Expand(op.Sub(length, op.Constant(value_ints=[1])), batch), to=ir.DataType.INT32)
        if mask is not None:
            # -inf in the mask (the legacy exporter's sdpa) makes a fully masked row NaN, which
            # the graph's IsNaN guard used to zero; the lowest finite value keeps it finite
            if mask not in self._finite_masks:
                dtype = ir.DataType(mask.dtype).numpy()
                lowest = np.array(np.finfo(dtype).min, dtype)  # float16: its own lowest, not -inf
                self._finite_masks[mask] = op.Max(mask, op.Constant(value=ir.tensor(lowest)))
            mask = self._finite_masks[mask]
        out = op.GroupQueryAttention(
            q, k, v, None, None, seqlens, total, None, None, None, mask,
            num_heads=self._heads, kv_num_heads=self._kv_heads, scale=scale, causal=0,
            _domain="com.microsoft", **extra,
        )
        out_4d = op.Reshape(out, op.Constant(value_ints=[0, 0, self._heads, self._head]))
        return op.Transpose(out_4d, perm=[0, 2, 1, 3])


class SoftcapUntiledGQA(UntiledGQA):
    """Gemma-2's attention without a cache: the scaled scores soft-capped, ``cap · tanh(s / cap)``,
    before the mask, in primitive ops (onnxscript's SDPA rule does not take it) → the op's
    ``softcap`` (ONNX Runtime's CPU kernel caps after the scale, before the bias)."""

    def pattern(self, op, query, key, value, mask, scale, cap, cap_again):
        return softcap_attention(op, query, _repeat_kv(op, key, "key"), _repeat_kv(op, value, "value"),
                                 scale, cap, cap_again, mask if self._has_mask else None)

    def check(self, context, scale, cap, cap_again, probs, **bound) -> pattern.MatchResult:
        result = softcap_check(scale, cap, cap_again, probs)
        return result if not result else super().check(context, **bound)

    def _scale_and_extra(self, sdpa_output: ir.Value, bound: dict) -> tuple[float, dict]:
        return softcap_attributes(bound)


def sdpa_scale(sdpa_output: ir.Value, head: int) -> float:
    """The scale of onnxscript's intermediate SDPA op: its attribute, else 1/sqrt(head size)."""
    scale_attr = sdpa_output.producer().attributes.get("scale")
    return scale_attr.as_float() if scale_attr is not None else 1.0 / math.sqrt(head)


def softcap_attention(op, query, keys, values, scale, cap, cap_again, mask):
    """The pattern of soft-capped attention over tiled keys and values: ``softmax(cap ·
    tanh(Q·Kᵀ·scale / cap) [+ mask]) · V`` (output ``sdpa_output``, softmax output ``probs``)."""
    scores = op.Mul(op.MatMul(query, op.Transpose(keys, perm=[0, 1, 3, 2])), scale)
    scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap_again)
    if mask is not None:
        scores = op.Add(scores, mask)
    probs = op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])
    return op.MatMul(probs, values, _outputs=["sdpa_output"])


def softcap_check(scale: ir.Value, cap: ir.Value, cap_again: ir.Value, probs: ir.Value) -> pattern.MatchResult:
    """One-element constant scale and cap, the same cap dividing and multiplying, softmax over the
    keys: what the op's ``softcap`` computes."""
    result = pattern.MatchResult()
    values = []
    for name, v in (("scale", scale), ("cap", cap), ("cap", cap_again)):
        if v.const_value is None or v.const_value.size != 1:
            return result.fail(f"the {name} is not a one-element constant", v)
        values.append(float(v.const_value.numpy().reshape(())))
    if values[1] != values[2] or values[1] <= 0:
        return result.fail(f"tanh is divided by {values[1]} and multiplied by {values[2]}: not one soft cap", cap)
    if probs.producer().attributes.get_int("axis", -1) not in (-1, 3):
        return result.fail("softmax is not over the keys (last axis)", probs)
    return result


def softcap_attributes(bound: dict) -> tuple[float, dict]:
    """(scale, {"softcap": cap}) from a soft-cap pattern's bound constants."""
    return (float(bound["scale"].const_value.numpy().reshape(())),
            {"softcap": float(bound["cap"].const_value.numpy().reshape(()))})


rules = pattern.RewriteRuleSet([
    UntiledGQA.rule("UntiledGQA", has_mask=True),
    UntiledGQA.rule("UntiledGQA_nomask", has_mask=False),
    SoftcapUntiledGQA.rule("SoftcapUntiledGQA", has_mask=True),
])

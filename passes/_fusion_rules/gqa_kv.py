"""Attention over a KV cache → com.microsoft ``GroupQueryAttention`` with past and present.

A KV-cache decoder (``graphc export --kv-cache``) appends this call's keys and values to the
past, ``present = Concat(past, new, axis=2)`` ([B, Hkv, P + S, D], a graph output), tiles the
``Hkv`` heads ``G = H / Hkv`` times (transformers' ``repeat_kv``: Unsqueeze → Expand →
Reshape) and attends with the model's mask. This rule takes onnxscript's intermediate SDPA op
over such tiled presents and hands ORT's GQA kernel the untiled new keys and values with the
past (BNSH), taking both presents from the op.

What the op computes, from ONNX Runtime's CPU kernel (``group_query_attention_helper.h``,
``gqa_attention_base.h``) and its schema: row ``b`` reads ``seqlens_k[b] + 1`` keys, of which
the first ``seqlens_k[b] + 1 - S`` come from the past buffer (all of them on a first prompt,
``S == total_sequence_length``); the new keys are written after them in the present. With
``seqlens_k = P + S - 1`` in every row and ``total_sequence_length = P + S``, every key is read
and the presents are exactly ``Concat(past, new)``, whatever the mask holds. The mask then
goes in whole as ``attention_bias`` with ``causal=0`` (the kernel adds it to Q·Kᵀ as the SDPA
did; its own causal window would assume right padding), so left padding, right padding and
the causal part all stay the model's. The bias is clamped to the lowest finite float (as in
``gqa.py``). Rotary is not folded in (``do_rotary``): the kernel derives positions from
``seqlens_k`` and, on a first prompt, reads only the first position id, where the model's
``position_ids`` can be anything (left padding); the separate ``RotaryEmbedding`` nodes keep them,
moved onto the [B, S, heads·D] projections (no Transpose there and back) where the chain allows.

Refused by the kernel at run time (an error, never a different result): a call with past
context and more than one new token at batch > 1 ("batch_size must be 1 when sequence_length
> 1 and past context is given"). Refused here: head sizes that are not a multiple of 8.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from graphc.passes._fusion_rules.gqa import sdpa_scale, softcap_attention, softcap_attributes, softcap_check
from graphc.passes._fusion_rules.sym_dims import same

FUSION_DOMAIN = "ai.onnxruntime._fusion"


def _tiled(op, x, name):
    return op.Reshape(op.Expand(op.Unsqueeze(x, [2]), pattern.ANY_VALUE, _outputs=[f"{name}_tiled"]),
                      pattern.ANY_VALUE)


class KVCacheGQA(pattern.RewriteRuleClassBase):
    """One rule; variants with and without a mask (attention bias), and with the K/V heads tiled
    (grouped attention) or not: a model with as many KV heads as query heads (GPT-2, Phi-2,
    Llama-2-7B: transformers' ``repeat_kv`` returns its input when there is nothing to repeat)
    attends over the presents themselves, and takes the op with ``kv_num_heads = num_heads``,
    the form onnxruntime-genai's shared past/present buffers need."""

    def __init__(self, name: str, *, has_mask: bool, tiled: bool = True) -> None:
        super().__init__(name)
        self._has_mask = has_mask
        self._tiled = tiled
        self._per_mask: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}

    def cleanup(self) -> None:
        self._per_mask.clear()

    def pattern(self, op, query, past_key, key, past_value, value, mask):
        present_key = op.Concat(past_key, key, _outputs=["present_key"])
        present_value = op.Concat(past_value, value, _outputs=["present_value"])
        if self._tiled:
            inputs = [query, _tiled(op, present_key, "key"), _tiled(op, present_value, "value")]
        else:
            inputs = [query, present_key, present_value]
        if self._has_mask:
            inputs.append(mask)
        out = op.SDPA(*inputs, key_format="BHSd", _allow_other_attributes=True, _domain=FUSION_DOMAIN,
                      _outputs=["sdpa_output"])
        return out, present_key, present_value

    def check(self, context, query, past_key, key, past_value, value, present_key, present_value,
              key_tiled=None, value_tiled=None, mask=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for name, v in (("query", query), ("past key", past_key), ("key", key), ("past value", past_value),
                        ("value", value)):
            if not _ir_utils.has_rank(v, 4):
                return result.fail(f"{name} is not 4-D [B, heads, sequence, head size]", v)
        for concat in (present_key, present_value):
            axis = concat.producer().attributes.get_int("axis", 0)
            if axis not in (2, -2):
                return result.fail(f"the cache is concatenated on axis {axis}, not the sequence axis 2", concat)
        heads, kv_heads, head = query.shape[1], key.shape[1], query.shape[3]
        if not all(isinstance(d, int) for d in (heads, kv_heads, head)):
            return result.fail("head counts or head size are not static", query)
        for v in (past_key, value, past_value):
            if v.shape[1] != kv_heads or v.shape[3] != head:
                return result.fail(f"past/new keys and values are not [B, {kv_heads}, *, {head}]", v)
        if not self._tiled and heads != kv_heads:
            return result.fail(f"{heads} query heads over {kv_heads} KV heads, not tiled", key)
        if self._tiled and (kv_heads == 0 or heads % kv_heads or heads == kv_heads):
            return result.fail(f"{heads} query heads over {kv_heads} KV heads is not grouped attention", key)
        if head % 8:
            return result.fail(f"head size {head} is not a multiple of 8 (ONNX Runtime's GroupQueryAttention)", query)
        for tiled in (key_tiled, value_tiled) if self._tiled else ():
            if tiled.shape is None or len(tiled.shape) != 5 or tiled.shape[1] != kv_heads or tiled.shape[2] != heads // kv_heads:
                return result.fail(f"K/V are not tiled [B, {kv_heads}, {heads // kv_heads}, T, D]", tiled)
        if not (same(query.shape[2], key.shape[2]) and same(key.shape[2], value.shape[2])):
            return result.fail("the query and the new keys/values do not have the same known length", key)
        if not same(past_key.shape[2], past_value.shape[2]):
            return result.fail("past keys and values do not have the same known length", past_value)
        if mask is not None:
            if mask.dtype != query.dtype:
                return result.fail("the mask is not an additive bias of the query's type", mask)
            if (mask.shape is None or len(mask.shape) != 4 or mask.shape[1] not in (1, heads)
                    or not same(mask.shape[2], query.shape[2]) or not same(mask.shape[3], present_key.shape[2])):
                return result.fail("the mask is not [B or 1, H or 1, S, past + S]", mask)
        self._heads, self._kv_heads, self._head = heads, kv_heads, head
        return result

    def _scale_and_extra(self, sdpa_output: ir.Value, bound: dict) -> tuple[float, dict]:
        """The op's ``scale`` and any further attributes, from what the pattern bound."""
        return sdpa_scale(sdpa_output, self._head), {}

    def rewrite(self, op, query, past_key, key, past_value, value, mask=None, sdpa_output=None, **bound):
        scale, extra = self._scale_and_extra(sdpa_output, bound)
        to_3d = op.Constant(value_ints=[0, 0, -1])
        q, k, v = (self._rotary_bsd(op, x) or op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), to_3d)
                   for x in (query, key, value))
        if mask is not None and mask in self._per_mask:
            bias, seqlens, total = self._per_mask[mask]
        else:
            if mask is not None:  # the mask's last axis is the total length (checked): shared by all layers
                length = op.Shape(mask, start=3, end=4)
            else:
                length = op.Add(op.Shape(past_key, start=2, end=3), op.Shape(key, start=2, end=3))
            total = op.Cast(op.Squeeze(length, op.Constant(value_ints=[0])), to=ir.DataType.INT32)
            batch = op.Shape(q, start=0, end=1)
            seqlens = op.Cast(op.Expand(op.Sub(length, op.Constant(value_ints=[1])), batch), to=ir.DataType.INT32)
            bias = None
            if mask is not None:
                dtype = ir.DataType(mask.dtype).numpy()
                lowest = np.array(np.finfo(dtype).min, dtype)  # float16: its own lowest, not -inf
                bias = op.Max(mask, op.Constant(value=ir.tensor(lowest)))
                self._per_mask[mask] = (bias, seqlens, total)
        out, present_key, present_value = op.GroupQueryAttention(
            q, k, v, past_key, past_value, seqlens, total, None, None, None, bias,
            num_heads=self._heads, kv_num_heads=self._kv_heads, scale=scale, causal=0,
            _domain="com.microsoft", _outputs=3, **extra,
        )
        out_4d = op.Reshape(out, op.Constant(value_ints=[0, 0, self._heads, self._head]))
        return op.Transpose(out_4d, perm=[0, 2, 1, 3]), present_key, present_value

    def _rotary_bsd(self, op, x: ir.Value) -> ir.Value | None:
        """``RotaryEmbedding(Transpose(Reshape(x3, [B, S, n, D])))``, ORT's op on [B, n, S, D], as
        the same op on ``x3`` [B, S, n·D] (ORT reads a 3-D input as [B, S, n, D]): the GQA input
        without the Transpose there and back. None where the chain is not exactly that."""
        rot = x.producer()
        if (rot is None or rot.op_type != "RotaryEmbedding" or rot.domain != "com.microsoft" or len(rot.inputs) != 4
                or rot.attributes.get_int("is_packed_batching", 0)):
            return None
        dims = rot.attributes.get_int("rotary_embedding_dim", 0)  # partial rotary: the first dims of a head
        cos = rot.inputs[2]
        if cos is None or cos.shape is None or len(cos.shape) != 2 or cos.shape[1] != (dims or self._head) // 2:
            return None  # without rotary_embedding_dim ORT takes a 3-D input's head size from the cache
        transpose = rot.inputs[0].producer()
        if (transpose is None or transpose.op_type != "Transpose" or transpose.domain != ""
                or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]):
            return None
        reshape = transpose.inputs[0].producer()
        if reshape is None or reshape.op_type != "Reshape" or reshape.domain != "":
            return None
        x3, x4 = reshape.inputs[0], reshape.outputs[0]
        if (x3 is None or x3.shape is None or len(x3.shape) != 3 or x4.shape is None or len(x4.shape) != 4
                or x3.shape[2] != x4.shape[2] * x4.shape[3] or x4.shape[3] != self._head
                or not (same(x3.shape[0], x4.shape[0]) and same(x3.shape[1], x4.shape[1]))
                or rot.attributes.get_int("num_heads", 0) not in (0, x4.shape[2])):
            return None
        attributes = {name: attr for name, attr in rot.attributes.items()}
        if dims:  # ORT reads a 3-D input's heads from num_heads when part of each head rotates
            attributes["num_heads"] = x4.shape[2]
        return op.RotaryEmbedding(x3, *rot.inputs[1:], _domain="com.microsoft", **attributes)


class SoftcapKVCacheGQA(KVCacheGQA):
    """Gemma-2's attention: the scaled scores soft-capped, ``cap · tanh(scores / cap)``, before the
    mask, written out in primitive ops (onnxscript's SDPA rule does not take it). The op's
    ``softcap`` attribute computes the same at the same place (ONNX Runtime's CPU kernel: scale,
    then the cap, then the bias)."""

    def pattern(self, op, query, past_key, key, past_value, value, mask, scale, cap, cap_again):
        present_key = op.Concat(past_key, key, _outputs=["present_key"])
        present_value = op.Concat(past_value, value, _outputs=["present_value"])
        out = softcap_attention(op, query, _tiled(op, present_key, "key"), _tiled(op, present_value, "value"),
                                scale, cap, cap_again, mask if self._has_mask else None)
        return out, present_key, present_value

    def check(self, context, scale, cap, cap_again, probs, **bound) -> pattern.MatchResult:
        result = softcap_check(scale, cap, cap_again, probs)
        return result if not result else super().check(context, **bound)

    def _scale_and_extra(self, sdpa_output: ir.Value, bound: dict) -> tuple[float, dict]:
        return softcap_attributes(bound)


def over_cache(model: ir.Model) -> list[ir.Node]:
    """Intermediate SDPA nodes still attending over a concatenated cache (unfused by this rule)."""

    def producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
        node = value.producer() if value is not None else None
        return node if node is not None and node.op_type == op_type and node.domain == "" else None

    left = []
    for node in model.graph.all_nodes():
        if node.domain != FUSION_DOMAIN or node.op_type != "SDPA" or len(node.inputs) < 2:
            continue
        reshape = producer(node.inputs[1], "Reshape")
        expand = reshape and producer(reshape.inputs[0], "Expand")
        unsqueeze = expand and producer(expand.inputs[0], "Unsqueeze")
        if unsqueeze and producer(unsqueeze.inputs[0], "Concat"):
            left.append(node)
    return left


rules = pattern.RewriteRuleSet([
    KVCacheGQA.rule("KVCacheGQA", has_mask=True),
    KVCacheGQA.rule("KVCacheGQA_nomask", has_mask=False),
    KVCacheGQA.rule("KVCacheMHA", has_mask=True, tiled=False),
    KVCacheGQA.rule("KVCacheMHA_nomask", has_mask=False, tiled=False),
    SoftcapKVCacheGQA.rule("SoftcapKVCacheGQA", has_mask=True),
])

"""Rotary embedding on interleaved pairs of dims → ORT's ``RotaryEmbedding`` with ``interleaved = 1``.

Cohere (transformers' ``CohereForCausalLM``; GPT-J's ``rotate_every_two`` is the same math)
rotates each pair (x[2i], x[2i+1]) of a head by angle i instead of the two halves::

    freqs = position_ids[:, :, None].float() * inv_freq
    emb = repeat_interleave(freqs, 2)     # Unsqueeze at a new last axis, Expand by 2, Reshape back
    rot = stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)   # Slice step 2, Neg, Unsqueeze, Concat, Reshape
    out = x * cos(emb)[:, None] + rot * sin(emb)[:, None]

so that out[2i] = x[2i] cos_i - x[2i+1] sin_i and out[2i+1] = x[2i+1] cos_i + x[2i] sin_i: ORT's
op with ``interleaved = 1`` and the caches ``rotary_cache`` builds (cos/sin of position ⊗
inv_freq, [max_pos, D/2]). One rule for the whole form, angles included, so that a form it does
not recognise stays as the exporter wrote it (no intermediate op left without its caches).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from graphc.passes._fusion_rules.rotary_cache import BroadcastCosSinCache
from graphc.passes._fusion_rules.table import apply_rules_then_prune


class InterleavedRotary(BroadcastCosSinCache):
    """Variants: with or without a Cast of the position ids to float (as the cache rule)."""

    def pattern(self, op, x, position_ids, axes, inv_freq, at_pair, pair, emb_shape, start_odd, end_odd, axes_odd,
                steps_odd, start_even, end_even, axes_even, steps_even, at_neg, at_even, shape):
        pos = op.Unsqueeze(position_ids, axes)
        if self._cast_positions:
            pos = op.Cast(pos, to=ir.DataType.FLOAT)
        freqs = op.Mul(pos, inv_freq)
        emb = op.Reshape(op.Expand(op.Unsqueeze(freqs, at_pair), pair), emb_shape, _allow_other_attributes=True)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        odd = op.Slice(x, start_odd, end_odd, axes_odd, steps_odd)
        even = op.Slice(x, start_even, end_even, axes_even, steps_even)
        pairs = op.Concat(op.Unsqueeze(op.Neg(odd), at_neg), op.Unsqueeze(even, at_even), axis=-1)
        rotated = op.Reshape(pairs, shape, _allow_other_attributes=True)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, position_ids, axes, inv_freq, at_pair, pair, emb_shape, start_odd, end_odd,
              axes_odd, steps_odd, start_even, end_even, axes_even, steps_even, at_neg, at_even, shape,
              **_) -> pattern.MatchResult:
        result = super().check(context, x, position_ids, axes, inv_freq)
        if not result:
            return result
        head = x.shape[3]  # 2 x the angles (checked above)
        if not isinstance(x.shape[1], int):
            return result.fail("the number of heads is not known", x)
        if not _ir_utils.is_singleton_value(at_pair, lambda a: a in (3, -1)):
            return result.fail("the angles are not repeated on a new last axis", at_pair)
        reps = _shape_entries(pair)
        if reps is None or len(reps) != 4 or reps[-1] != 2 or any(r != 1 for r in reps[:-1]):
            return result.fail(f"the angles are expanded by {reps}, expected [1, 1, 1, 2]", pair)
        target = _shape_entries(emb_shape)
        if target is None or len(target) != 3 or target[-1] not in (head, -1):
            return result.fail(f"the repeated angles are reshaped to {target}, expected [B, S, {head}]", emb_shape)
        for start, end, axes_, steps, first in ((start_odd, end_odd, axes_odd, steps_odd, 1),
                                                (start_even, end_even, axes_even, steps_even, 0)):
            if not (_ir_utils.is_singleton_value(start, first) and _ir_utils.is_singleton_value(steps, 2)
                    and _ir_utils.is_singleton_value(end, lambda e: e >= head)
                    and _ir_utils.is_singleton_value(axes_, lambda a: a in (3, -1))):
                return result.fail(f"not the {'odd' if first else 'even'} dims of the last axis (start {first}, step 2)")
        for at in (at_neg, at_even):
            if not _ir_utils.is_singleton_value(at, lambda a: a in (4, -1)):
                return result.fail("the pairs are not stacked on a new last axis", at)
        target = _shape_entries(shape)
        if target is None or len(target) != 4 or target[-1] != head:
            return result.fail(f"the pairs are reshaped to {target}, expected [B, H, S, {head}]", shape)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, **_):
        return super().rewrite(op, x, position_ids, inv_freq, 1, x.shape[1])


def _shape_entries(shape: ir.Value) -> list | None:
    """A Reshape's target shape entry by entry (None where only known at run time): a constant,
    or a Concat of constants and ``Shape`` slices of values of known rank (the exporter's
    [B, H, S, D] or [*freqs.shape[:-1], -1]); None when its length is not known."""
    if shape.const_value is not None:
        return shape.const_value.numpy().reshape(-1).tolist()
    node = shape.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    entries: list = []
    for part in node.inputs:
        if part is None:
            return None
        if part.const_value is not None:
            entries += part.const_value.numpy().reshape(-1).tolist()
            continue
        src = part.producer()
        if src is None or src.op_type != "Shape" or src.inputs[0] is None or src.inputs[0].shape is None:
            return None
        rank = src.inputs[0].shape.rank()
        start, end = src.attributes.get_int("start", 0), src.attributes.get_int("end", rank)
        start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
        entries += [None] * max(end - start, 0)  # dims of the input, read at run time
    return entries


rules = pattern.RewriteRuleSet([
    InterleavedRotary.rule("InterleavedRotary_cast", cast_positions=True),
    InterleavedRotary.rule("InterleavedRotary", cast_positions=False),
])


# the rules keep the nodes they matched (the angles are shared by every layer): what is left dead goes
apply = apply_rules_then_prune(rules)

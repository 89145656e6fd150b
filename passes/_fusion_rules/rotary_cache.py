"""Rotary cos/sin caches as transformers 5.x computes them, for com.microsoft ``RotaryEmbedding``.

onnxscript's ``cos_sin_cache`` rule expects ``freqs = (inv_freq @ position_ids).transpose``;
transformers 5.x (Llama and friends) broadcasts instead::

    freqs = position_ids[:, :, None].float() * inv_freq      # Unsqueeze, Cast, Mul
    emb = cat(freqs, freqs); cos, sin = emb.cos(), emb.sin()
    q_embed = q * cos[:, None] + rotate_half(q) * sin[:, None]

This rule takes onnxscript's intermediate ``RotaryEmbedding(x, cos, sin)`` (from its
rotate-half rule) with such caches and emits ORT's op with position ids and caches
``cos(arange(max_pos + 1) ⊗ inv_freq)`` computed in the graph (no maximum length baked in).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from graphc.passes._fusion_rules.table import apply_rules_then_prune

FUSION_DOMAIN = "ai.onnxruntime._fusion"


class BroadcastCosSinCache(pattern.RewriteRuleClassBase):
    """One rule, variants: with or without a Cast of the position ids to float."""

    def __init__(self, name: str, *, cast_positions: bool) -> None:
        super().__init__(name, remove_nodes=False)  # cos/sin are shared by every layer
        self._cast_positions = cast_positions
        self._caches: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def cleanup(self) -> None:
        self._caches.clear()

    def pattern(self, op, x, position_ids, axes, inv_freq, interleaved, num_heads):
        pos = op.Unsqueeze(position_ids, axes)
        if self._cast_positions:
            pos = op.Cast(pos, to=ir.DataType.FLOAT)
        freqs = op.Mul(pos, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain=FUSION_DOMAIN)

    def check(self, context, x, position_ids, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if inv_freq.const_value is None:
            return result.fail("inv_freq is not a constant", inv_freq)
        freq = inv_freq.const_value.numpy()
        if freq.ndim < 1 or any(d != 1 for d in freq.shape[:-1]):
            return result.fail(f"inv_freq has shape {list(freq.shape)}, expected [..., 1, E]", inv_freq)
        if position_ids.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return result.fail("position ids are not integers", position_ids)
        if axes.const_value is None:
            return result.fail("Unsqueeze axes are not constant", axes)
        rank = len(position_ids.shape) if position_ids.shape is not None else None
        got = sorted(int(a) for a in axes.const_value.numpy().reshape(-1))
        # the unsqueezed ids must be [B or 1, S, 1]
        if not ((rank == 1 and got in ([0, 2], [0, -1])) or (rank == 2 and got in ([2], [-1]))):
            return result.fail(f"position ids of rank {rank} unsqueezed at {got}, expected [B, S, 1]", position_ids)
        if not _ir_utils.has_rank(x, 4) or not isinstance(x.shape[3], int):
            return result.fail("rotary input is not [B, H, S, D] with a known head size", x)
        if 2 * freq.shape[-1] != x.shape[3]:
            return result.fail(f"partial rotary ({2 * freq.shape[-1]} of {x.shape[3]} dims) not handled", x)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
        if position_ids.shape is not None and len(position_ids.shape) == 1:
            position_ids = op.Unsqueeze(position_ids, op.Constant(value_ints=[0]))
        position_ids = op.Cast(position_ids, to=ir.DataType.INT64)
        # ORT wants position ids [B, S]: broadcast the [1, S] ids over x's batch
        batch = op.Shape(_batch_source(x), start=0, end=1)
        seq = op.Shape(position_ids, start=1, end=2)
        position_ids = op.Expand(position_ids, op.Concat(batch, seq, axis=0))
        if inv_freq not in self._caches:
            freq = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1)
            count = op.Add(op.ReduceMax(position_ids, keepdims=0), op.Constant(value_int=1))
            positions = op.Cast(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)),
                                to=ir.DataType.FLOAT)
            angles = op.MatMul(op.Reshape(positions, op.Constant(value_ints=[-1, 1])),
                               op.Constant(value=ir.tensor(freq)))
            self._caches[inv_freq] = (op.Cos(angles), op.Sin(angles))
        cos, sin = self._caches[inv_freq]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                  _domain="com.microsoft")


def _batch_source(x: ir.Value) -> ir.Value:
    """A value with ``x``'s batch dim, read before any last-axis ``Slice`` (partial rotary rotates
    ``x[..., :r]``): a ``Shape`` of the slice would be its second reader, and onnxscript's partial
    rotary rule only folds a slice the rotary alone reads."""
    node = x.producer()
    while node is not None and node.op_type == "Slice" and node.domain == "" and len(node.inputs) >= 4:
        axes = node.inputs[3].const_value if node.inputs[3] is not None else None
        if axes is None or node.inputs[0] is None or 0 in axes.numpy().reshape(-1).tolist():
            break
        x = node.inputs[0]
        node = x.producer()
    return x


rules = pattern.RewriteRuleSet([
    BroadcastCosSinCache.rule("BroadcastCosSinCache_cast", cast_positions=True),
    BroadcastCosSinCache.rule("BroadcastCosSinCache", cast_positions=False),
])


# the rule keeps the nodes it matched (the cos/sin caches are shared by every layer); the dead
# rotate-half intermediates go right after it: one still reading the rotated slice would keep
# onnxscript's partial-rotary rule (next in fuse-ort) from matching a slice the rotary alone must read
apply = apply_rules_then_prune(rules)

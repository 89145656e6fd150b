"""DeBERTa(-v2/v3) attention → com.microsoft ``MultiHeadAttention`` with an attention bias.

transformers' ``DisentangledSelfAttention`` attends over 3-D head-major tensors [B·H, S, d]:
``bmm(q, kᵀ / scale)``, plus the relative-position scores (content→position and position→content,
``rel_att`` [B·H, S, S]) where the config has ``relative_attention``, reshaped to [B, H, S, S],
masked with ``masked_fill(~mask, finfo.min)`` (the mask [B, 1, S, S] is padding on both the
query and the key side), softmax, ``bmm`` with v, back to [B, S, H·d]. onnxscript's SDPA rule
wants 4-D Q/K/V and an additive mask, so none of it fused.

Here Q, K and V go in as the projections' outputs [B, S, H·d], ``scale`` is 1 / the divisor of kᵀ,
and ``attention_bias`` [B, H or 1, S, S] is ``rel_att`` (reshaped as the scores were) plus
``Where(~mask, finfo.min, 0)``. A masked score becomes finfo.min in both forms (the bias swamps
any finite score in float32), so a padded query row, all of whose keys are masked, is uniform
in both, as before. The relative-position scores themselves (two gathered bmm's a layer) stay
as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _source(heads: ir.Value) -> ir.Value | None:
    """x where ``heads`` is Reshape(Transpose(Reshape(x, [B, S, H, d]), (0, 2, 1, 3)), [B·H, S, d]),
    else None. (The head tensors are not part of the pattern: the relative-position scores read
    q and k too, and onnxscript replaces no match whose inner values have other readers.)"""
    node = heads.producer()
    chain = []
    for op_type in ("Reshape", "Transpose", "Reshape"):
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx") or not node.inputs:
            return None
        chain.append(node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    perm = chain[1].attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [0, 2, 1, 3]:
        return None
    return chain[2].inputs[0]


class DisentangledAttention(pattern.RewriteRuleClassBase):
    """One rule; variants with and without the relative-position scores."""

    def __init__(self, name: str, *, relative: bool) -> None:
        super().__init__(name)
        self._relative = relative

    def pattern(self, op, query_3d, key_3d, value_3d, divisor, rel_att, masked, fill):
        scores = op.MatMul(query_3d, op.Div(op.Transpose(key_3d, perm=[0, 2, 1]), divisor))
        if self._relative:
            scores = op.Add(scores, rel_att)
        scores = op.Reshape(scores, pattern.ANY_VALUE, _allow_other_attributes=True, _outputs=["scores_4d"])
        probs = op.Softmax(op.Where(masked, fill, scores), _allow_other_attributes=True, _outputs=["probs"])
        out = op.MatMul(op.Reshape(probs, pattern.ANY_VALUE, _allow_other_attributes=True), value_3d)
        out = op.Reshape(out, pattern.ANY_VALUE, _allow_other_attributes=True)
        return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), pattern.ANY_VALUE, _allow_other_attributes=True,
                          _outputs=["attention_output"])

    def check(self, context, query_3d, key_3d, value_3d, divisor, masked, fill, scores_4d, probs,
              attention_output, rel_att=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        sources = [_source(v) for v in (query_3d, key_3d, value_3d)]
        for name, v, src in zip(("query", "key", "value"), (query_3d, key_3d, value_3d), sources):
            if src is None:
                return result.fail(f"the {name} heads are not Reshape(Transpose(Reshape(x))) of a projection", v)
        query, key, value = sources
        for name, v in (("query", query), ("key", key), ("value", value)):
            if v.shape is None or len(v.shape) != 3 or not isinstance(v.shape[2], int):
                return result.fail(f"{name} is not [B, S, hidden] with a static hidden size", v)
        hidden = query.shape[2]
        if key.shape[2] != hidden or value.shape[2] != hidden:
            return result.fail("query, key and value widths differ", key)
        for name, v in (("query", query_3d), ("key", key_3d), ("value", value_3d)):
            if v.shape is None or len(v.shape) != 3 or not isinstance(v.shape[2], int):
                return result.fail(f"the {name} heads are not [B·H, S, d] with a static head size", v)
        head = query_3d.shape[2]
        if head <= 0 or hidden % head or key_3d.shape[2] != head or value_3d.shape[2] != head:
            return result.fail(f"head size {head} does not divide the width {hidden}", query_3d)
        heads = hidden // head
        if scores_4d.shape is None or len(scores_4d.shape) != 4 or scores_4d.shape[1] != heads:
            return result.fail(f"the scores are not reshaped to [B, {heads}, S, S]", scores_4d)
        axis = probs.producer().attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, 3):
            return result.fail("the softmax is not over the keys", probs)
        if attention_output.shape is not None and (len(attention_output.shape) != 3
                                                   or attention_output.shape[2] != hidden):
            return result.fail("the output is not [B, S, hidden]", attention_output)
        for name, v in (("divisor of kᵀ", divisor), ("masked score", fill)):
            if v.const_value is None or v.const_value.size != 1:
                return result.fail(f"the {name} is not a one-element constant", v)
        if float(divisor.const_value.numpy().reshape(())) <= 0:
            return result.fail("the divisor of kᵀ is not positive", divisor)
        if float(fill.const_value.numpy().reshape(())) > -1e30:
            return result.fail("masked scores are not filled with a very large negative value", fill)
        if (masked.dtype != ir.DataType.BOOL or masked.shape is None or len(masked.shape) != 4
                or masked.shape[1] not in (1, heads)):
            return result.fail("the mask is not boolean [B, 1 or H, S, S]", masked)
        if query.dtype != ir.DataType.FLOAT or (rel_att is not None and rel_att.dtype != ir.DataType.FLOAT):
            return result.fail("not float32 (the rule writes a float32 bias)", query)
        self._heads, self._sources = heads, sources
        return result

    def rewrite(self, op, divisor, masked, fill, scores_4d, rel_att=None, **_):
        query, key, value = self._sources
        zero = op.Constant(value=ir.tensor(np.zeros((), np.float32)))
        bias = op.Where(masked, fill, zero)
        if rel_att is not None:
            bias = op.Add(op.Reshape(rel_att, scores_4d.producer().inputs[1]), bias)
        scale = 1.0 / float(divisor.const_value.numpy().reshape(()))
        return op.MultiHeadAttention(query, key, value, None, None, bias, num_heads=self._heads, scale=scale,
                                     _domain="com.microsoft")


rules = pattern.RewriteRuleSet([
    DisentangledAttention.rule("DisentangledAttention_relative", relative=True),
    DisentangledAttention.rule("DisentangledAttention", relative=False),
])

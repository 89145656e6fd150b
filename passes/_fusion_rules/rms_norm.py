"""RMSNorm → ``SimplifiedLayerNormalization`` for opset ≤ 17 graphs (the legacy exporter's).

onnxscript's rule matches ``ReduceMean`` with its axes as an input (opset 18); before opset
18 the axes are an attribute. Same check and rewrite as onnxscript's rule (reused by
subclassing); only the ``ReduceMean`` in the pattern differs.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import RmsNormFusion


class RmsNormAxesAttribute(RmsNormFusion):
    def pattern(self, op, x, scale, epsilon, compute_dtype, target_dtype):
        x = pattern.OrValue([op.Cast(x, to=compute_dtype), x])
        mean_square = op.ReduceMean(op.Pow(x, 2.0), axes=[-1], keepdims=1)
        reciprocal_rms = op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon)))
        normalized = op.Mul(x, reciprocal_rms)
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
        scale = pattern.OrValue([op.Cast(scale, to=compute_dtype), scale])
        return op.Mul(normalized, scale) if self._mul_order else op.Mul(scale, normalized)


rules = pattern.RewriteRuleSet([
    RmsNormAxesAttribute.rule("RmsNormAxesAttribute1", _mul_order=False),
    RmsNormAxesAttribute.rule("RmsNormAxesAttribute2", _mul_order=True),
])

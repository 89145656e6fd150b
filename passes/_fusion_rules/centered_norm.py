"""A bias-free LayerNorm written as an RMS norm of the centered input → ``LayerNormalization``.

Cohere's ``CohereLayerNorm`` subtracts the mean, then divides by the root mean square of what is
left and scales (no bias). onnxscript's RMS rule fuses the second half, leaving
``SimplifiedLayerNormalization(x - ReduceMean(x))``: the same numbers as ORT's
``LayerNormalization(x, scale, 0)`` over the last axis with the same epsilon, which is one op, and
the form the skip-norm rules then fuse with the residual Add before it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern


class CenteredRmsNorm(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, axes, scale):
        centered = op.Sub(x, op.ReduceMean(x, axes, _allow_other_attributes=True, _outputs=["mean"]))
        return op.SimplifiedLayerNormalization(centered, scale, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, axes, scale, mean, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None:
            return result.fail("the input's rank is not known", x)
        rank = x.shape.rank()
        mean_node, norm = mean.producer(), out.producer()
        if mean_node.attributes.get_int("keepdims", 1) != 1:
            return result.fail("the mean drops the reduced axis", mean)
        if not _ir_utils.is_singleton_value(axes, lambda a: a in (-1, rank - 1)):
            return result.fail("the mean is not over the last axis", axes)
        if norm.attributes.get_int("axis", -1) not in (-1, rank - 1):
            return result.fail("the norm is not over the last axis", out)
        if any(o.uses() or o.is_graph_output() for o in norm.outputs[1:]):
            return result.fail("the norm's inverse std output is read", out)
        if scale.const_value is None or scale.shape is None or len(scale.shape) != 1:
            return result.fail("scale is not a constant vector", scale)
        return result

    def rewrite(self, op, x, scale, out, **_):
        norm = out.producer()
        value = scale.const_value.numpy()
        return op.LayerNormalization(x, scale, op.Constant(value=ir.tensor(np.zeros(value.shape, value.dtype))),
                                     axis=-1, epsilon=norm.attributes.get_float("epsilon", 1e-5))


rules = pattern.RewriteRuleSet([CenteredRmsNorm.rule()])

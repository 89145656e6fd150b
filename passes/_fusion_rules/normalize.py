"""Small canonicalizations that let the fusion rules see one graph shape for many.

``Where(IsNaN(p), 0[1], p)``: the legacy exporter writes the "fully masked row" guard after
the attention softmax with a 1-element tensor where the dynamo exporter and onnxscript's
SDPA pattern have a scalar. Broadcasting a 1-element tensor against a tensor of rank ≥ 1 is
the same as broadcasting the scalar, so the constant becomes a scalar.

``Add(bias, x)``: the legacy exporter's Linear bias comes first; the MHA-bias rule wants it second.

``Div(1, x)``: the legacy exporter's ``rsqrt`` where the RMSNorm rules expect ``Reciprocal``.

``LayerNormalization(x, scale)`` of an ``Add`` without a bias (ModernBERT): given a zero bias, which
onnxscript's SkipLayerNormalization rules want.

``Add(Add(scores, bias), mask)``: attention scores with a position bias added before the mask
(MPNet's relative position buckets) as one additive mask, which the SDPA rule takes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class ScalarNanGuard(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, fill):
        return op.Where(op.IsNaN(x), fill, x)

    def check(self, context, x, fill, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if fill.const_value is None or fill.const_value.size != 1:
            return result.fail("the NaN fill value is not a 1-element constant", fill)
        if fill.shape is None or len(fill.shape) == 0:
            return result.fail("the NaN fill value is already a scalar", fill)
        if x.shape is None or len(x.shape) < 1:
            return result.fail("guarded value of unknown or zero rank", x)
        return result

    def rewrite(self, op, x, fill, **_):
        scalar = fill.const_value.numpy().reshape(())
        return op.Where(op.IsNaN(x), op.Constant(value=ir.tensor(scalar)), x)


class DivToReciprocal(pattern.RewriteRuleClassBase):
    """``Div(1, x)`` → ``Reciprocal(x)`` (the legacy exporter's ``rsqrt``), as RMSNorm rules expect."""

    def pattern(self, op, one, x):
        return op.Div(one, x)

    def check(self, context, one, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if one.const_value is None or one.const_value.size != 1 or float(one.const_value.numpy().reshape(())) != 1.0:
            return result.fail("numerator is not the constant 1", one)
        if x.shape is None or one.shape is None or len(one.shape) > len(x.shape):
            return result.fail("the 1 would broadcast x to a higher rank", x)
        return result

    def rewrite(self, op, one, x, **_):
        return op.Reciprocal(x)


class StaticDimOfShape(pattern.RewriteRuleClassBase):
    """``Gather(Shape(x), i)`` → the constant ``x.shape[i]`` when that dimension is static
    (the legacy exporter reads the head size this way to slice rotary halves)."""

    def pattern(self, op, x, index):
        return op.Gather(op.Shape(x), index, axis=0)

    def check(self, context, x, index, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if index.const_value is None or index.const_value.size != 1:
            return result.fail("index is not a constant", index)
        if x.shape is None:
            return result.fail("shape unknown", x)
        i = int(index.const_value.numpy().reshape(()))
        if not -len(x.shape) <= i < len(x.shape) or not isinstance(x.shape[i], int):
            return result.fail(f"dimension {i} is not static", x)
        return result

    def rewrite(self, op, x, index, **_):
        dim = x.shape[int(index.const_value.numpy().reshape(()))]
        value = np.array(dim, np.int64).reshape(index.const_value.numpy().shape)
        return op.Constant(value=ir.tensor(value))


class ConstantSecondInAdd(pattern.RewriteRuleClassBase):
    """``Add(bias, x)`` → ``Add(x, bias)``: the legacy exporter puts a Linear's bias first,
    onnxscript's MHA-bias rule expects it second (Add is commutative, broadcasting too)."""

    def pattern(self, op, bias, x):
        return op.Add(bias, x)

    def check(self, context, bias, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if bias.const_value is None or x.const_value is not None:
            return result.fail("not a constant before a computed value", bias)
        return result

    def rewrite(self, op, bias, x, **_):
        return op.Add(x, bias)


class ScoreBiasThenMask(pattern.RewriteRuleClassBase):
    """``Add(Add(QKᵀ/scale, bias), mask)`` → ``Add(QKᵀ/scale, Add(bias, mask))``: MPNet adds its
    relative position bias [B, H, S, S] and then the padding mask; onnxscript's SDPA rule takes one
    additive mask. The bias and the mask are computed once for every layer, so the sum is too (one
    node once common subexpressions merge). Float addition reassociated: the scores move by
    rounding only (~1 ulp of the larger term)."""

    def __init__(self, name: str, *, div: bool) -> None:
        super().__init__(name)
        self._div = div

    def pattern(self, op, q, k, scale, bias, mask):
        scores = op.MatMul(q, k)
        scores = op.Div(scores, scale) if self._div else op.Mul(scores, scale)
        return op.Add(op.Add(scores, bias), mask)

    def check(self, context, scale, bias, mask, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if scale.const_value is None or scale.const_value.size != 1:
            return result.fail("the scale is not a one-element constant", scale)
        for v in (bias, mask):
            if v.shape is None or len(v.shape) != 4:
                return result.fail("bias and mask are not 4-D", v)
        return result

    def rewrite(self, op, q, k, scale, bias, mask, **_):
        scores = op.MatMul(q, k)
        scores = op.Div(scores, scale) if self._div else op.Mul(scores, scale)
        return op.Add(scores, op.Add(bias, mask))


class ZeroBiasForSkipNorm(pattern.RewriteRuleClassBase):
    """``LayerNormalization(x = Add(a, b), scale)`` → the same with a zero bias: exact (the op adds
    0), and the form onnxscript's skip rules match (ModernBERT's norms have no bias)."""

    def pattern(self, op, x, scale):
        return op.LayerNormalization(x, scale, _outputs=["out"])

    def check(self, context, x, scale, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.producer() is None or x.producer().op_type != "Add" or x.producer().domain != "":
            return result.fail("the norm's input is not an Add (no skip to fuse)", x)
        if scale.const_value is None or scale.shape is None or len(scale.shape) != 1:
            return result.fail("scale is not a constant vector", scale)
        if len(out.producer().outputs) != 1:
            return result.fail("the norm's mean / inverse std outputs are read", out)
        return result

    def rewrite(self, op, x, scale, out, **_):
        attributes = {name: attr for name, attr in out.producer().attributes.items()}
        zero = np.zeros(scale.const_value.numpy().shape, scale.const_value.numpy().dtype)
        return op.LayerNormalization(x, scale, op.Constant(value=ir.tensor(zero)), **attributes)


rules = pattern.RewriteRuleSet([ScalarNanGuard.rule(), DivToReciprocal.rule(), StaticDimOfShape.rule(),
                                ConstantSecondInAdd.rule(), ScoreBiasThenMask.rule("ScoreBiasThenMask_div", div=True),
                                ScoreBiasThenMask.rule("ScoreBiasThenMask_mul", div=False), ZeroBiasForSkipNorm.rule()])

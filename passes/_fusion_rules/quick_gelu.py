"""``x * Sigmoid(alpha * x)`` → ``QuickGelu(x, alpha)`` (com.microsoft): CLIP's ``quick_gelu``
(alpha 1.702). onnxscript's Gelu rules cover the erf and tanh forms only."""

from __future__ import annotations

from onnxscript.rewriter import pattern


class QuickGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, alpha):
        return op.Mul(x, op.Sigmoid(op.Mul(x, alpha)))

    def check(self, context, x, alpha, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if alpha.const_value is None or alpha.const_value.size != 1:
            return result.fail("the sigmoid's scale is not a one-element constant", alpha)
        return result

    def rewrite(self, op, x, alpha, **_):
        value = float(alpha.const_value.numpy().reshape(()))
        return op.QuickGelu(x, alpha=value, _domain="com.microsoft")


rules = pattern.RewriteRuleSet(QuickGelu.rule().commute())

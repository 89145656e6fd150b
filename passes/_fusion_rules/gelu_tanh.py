"""GPT-2's ``gelu_new``, ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``, written
with ``0.5 * x`` first → ``FastGelu(x)`` (com.microsoft, the tanh approximation). onnxscript's
tanh-Gelu rule expects ``x * (0.5 * (tanh(...) + 1))``; products are matched in either order."""

from __future__ import annotations

import math

from onnxscript.rewriter import pattern

_SQRT_TWO_OVER_PI = math.sqrt(2.0 / math.pi)


class HalfXFirstGeluTanh(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        inner = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
        tanh = op.Tanh(op.Mul(inner, _SQRT_TWO_OVER_PI))
        return op.Mul(op.Mul(x, 0.5), op.Add(tanh, 1.0))

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


rules = pattern.RewriteRuleSet(HalfXFirstGeluTanh.rule().commute())

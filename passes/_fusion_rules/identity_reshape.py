"""``Reshape`` to the shape its input already has, dropped after the fusions.

The attention rules leave ``Reshape(out, [B, S, n, D]) → Transpose`` behind the fused op; where
the model's own graph then reshapes [B, n, S, D] to the same [B, n, S, D] by a shape it computes
at run time (Phi-3's attention output), nothing folds it, and the Transposes on either side
cannot cancel. With shape inference's dims on both sides equal (integers equal, symbolic dims
named alike, none unknown) the Reshape is the identity; removing it lets the optimizer cancel the
Transpose pair and merge the Reshapes around it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


def _known(shape: ir.Shape | None) -> list | None:
    if shape is None:
        return None
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        elif d.value is None or str(d.value).startswith("unk__"):
            return None
        else:
            dims.append(str(d.value))
    return dims


class IdentityReshape(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, shape, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if shape.const_value is not None:
            return result.fail("a constant target shape: the optimizer's own rules decide", shape)
        before, after = _known(x.shape), _known(out.shape)
        if before is None or after is None or before != after:
            return result.fail("input and output shapes are not known to be equal", out)
        if out.is_graph_output():
            return result.fail("a graph output keeps its name", out)
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


rules = pattern.RewriteRuleSet([IdentityReshape.rule()])


def apply(model: ir.Model) -> int:
    """The rule on ``model``, then its ``Identity`` nodes bypassed (so that the Reshapes around
    them meet); the number of Reshapes dropped."""
    count = rules.apply_to_model(model)
    if count:
        for node in [n for n in model.graph if n.op_type == "Identity" and n.domain == ""]:
            out, src = node.outputs[0], node.inputs[0]
            if out.is_graph_output() or src is None:
                continue
            ir.convenience.replace_all_uses_with(out, src)
            model.graph.remove(node, safe=True)
    return count

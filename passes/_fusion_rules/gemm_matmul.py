"""``Reshape(Gemm(Reshape(x, [-1, K]), W[, C]), out)`` → ``MatMul(x', W) [+ C]`` on symbolic shapes.

GPT-2's ``Conv1D`` (``addmm`` on a flattened input, then a view back) exports this way. onnxscript's
own Reshape-Gemm-Reshape rule needs static shapes, so with dynamic batch and sequence the Gemm
stays; the attention rules then read the flattening Reshape after the attention as the
"reshape back to (B, S, D)" and replace its 2-D value with their 3-D output, which ONNX
Runtime refuses to load. As a MatMul on the unflattened input the projection is what the
fusion (and quantization) rules expect. ``x'`` is ``x`` when its leading dims are the output's;
a rank-4 ``x`` (B, S, H, Dh) whose trailing dims multiply to K is first reshaped to (B, S, K).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class ReshapeGemmReshape(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, flat_shape, w, out_shape):
        flat = op.Reshape(x, flat_shape)
        gemm = op.Gemm(flat, w, _allow_other_inputs=True, _outputs=["gemm"])  # the bias C is optional
        return op.Reshape(gemm, out_shape, _outputs=["out"])

    def check(self, context, x, w, gemm, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = gemm.producer()
        c = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = {name: node.attributes[name].value for name in node.attributes}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            return result.fail("Gemm with alpha, beta or transA", node)
        if attrs.get("transB", 0) and w.const_value is None:
            return result.fail("transposed Gemm weight that is not a constant", w)
        if w.shape is None or len(w.shape) != 2 or not all(isinstance(d, int) for d in w.shape):
            return result.fail("Gemm weight is not a static 2-D tensor", w)
        if c is not None and (c.shape is None or len(c.shape) > 1):
            return result.fail("Gemm bias is not a vector", c)
        k, n = (w.shape[1], w.shape[0]) if attrs.get("transB", 0) else (w.shape[0], w.shape[1])
        if x.shape is None or out.shape is None or len(out.shape) < 2:
            return result.fail("input or output shape unknown", x)
        lead = len(out.shape) - 1
        if out.shape[-1] != n or list(x.shape[:lead]) != list(out.shape[:lead]):
            return result.fail("output is not the input's leading dims with the Gemm's width", out)
        tail = list(x.shape[lead:])
        if not all(isinstance(d, int) for d in tail) or math.prod(tail) != k:
            return result.fail("input's trailing dims do not flatten to the Gemm's depth", x)
        return result

    def rewrite(self, op, x, w, gemm, out, **_):
        lead = len(out.shape) - 1
        if len(x.shape) != lead + 1:
            shape = np.array([0] * lead + [int(math.prod(x.shape[lead:]))], dtype=np.int64)
            flat = op.Reshape(x, op.Constant(value=ir.tensor(shape)))
            flat.shape, flat.dtype = ir.Shape([*out.shape[:lead], int(shape[-1])]), x.dtype
            x = flat
        node = gemm.producer()
        if node.attributes.get("transB") is not None and node.attributes["transB"].value:
            w = op.Constant(value=ir.tensor(np.ascontiguousarray(w.const_value.numpy().T)))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        product = op.MatMul(x, w)
        return product if c is None else op.Add(product, c)


rules = pattern.RewriteRuleSet([ReshapeGemmReshape.rule()])

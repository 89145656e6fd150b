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


def apply(model: ir.Model) -> int:
    """Every such Reshape of the main graph bypassed and removed; how many."""
    graph = model.graph
    dropped = 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        x, shape, out = node.inputs[0], node.inputs[1], node.outputs[0]
        if x is None or shape.const_value is not None or out.is_graph_output():
            continue  # a constant target shape is the optimizer's own rules' to judge
        before, after = _known(x.shape), _known(out.shape)
        if before is None or before != after:
            continue
        ir.convenience.replace_all_uses_with(out, x)
        graph.remove(node, safe=True)
        dropped += 1
    return dropped

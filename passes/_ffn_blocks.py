"""Feed-forward blocks found in a graph (used by FFN pruning and the planner): up
projection(s) (float MatMul by constant weights, sharing one input) → element-wise activation
region → down projection, every value inside used only inside."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import PassStats
from graphc.passes import _prune
from graphc.passes._quant import const_array

_ELEMENTWISE = {
    (ops.ONNX_DOMAIN, t) for t in (
        "Gelu", "Erf", "Relu", "Sigmoid", "Tanh", "Mul", "Add", "Sub", "Div", "Pow", "Sqrt", "Neg", "Softplus",
        "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Elu", "Selu", "Mish", "Swish",
    )
} | {(ops.MS_DOMAIN, t) for t in (ops.BIAS_GELU, "FastGelu", "QuickGelu", "Gelu")}


@dataclass
class Ffn:
    ups: list[_prune.Linear]
    down: _prune.Linear
    region: list[ir.Node]  # the element-wise nodes between them

    @property
    def width(self) -> int:
        return self.down.weight.shape[0]


def find_ffns(graph: ir.Graph, stats: PassStats | None = None) -> list[Ffn]:
    """Every FFN of the graph, in graph order (see the module doc)."""
    found = []
    for node in graph:
        down = _prune.linear(node)
        if down is None:
            continue
        ffn, reason = _match(down)
        if ffn is not None:
            found.append(ffn)
        elif reason and stats is not None:
            stats.skip(node.name or "MatMul", reason)
    return found


def _match(down: _prune.Linear) -> tuple[Ffn | None, str | None]:
    width = down.weight.shape[0]
    ups: list[_prune.Linear] = []
    region: list[ir.Node] = []
    seen: set[int] = set()
    stack = [down.node.inputs[0]]
    while stack:
        value = stack.pop()
        up = _prune.producer_linear(value)
        if up is not None and up.weight.shape[1] == width:
            if all(u.node is not up.node for u in ups):
                ups.append(up)
            continue
        node = value.producer()
        if node is None or const_array(value) is not None:
            return None, None  # not an FFN (a graph input or a constant feeds it)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if (node.domain, node.op_type) not in _ELEMENTWISE:
            return None, None
        region.append(node)
        for x in node.inputs:
            if x is None:
                continue
            c = const_array(x)
            if c is not None:
                if c.size != 1 and (c.ndim == 0 or c.shape[-1] != width):
                    return None, f"constant {x.name} of shape {list(c.shape)} in the FFN is not per-neuron"
                continue
            stack.append(x)
    if not ups or not region:
        return None, None
    if len({id(u.node.inputs[0]) for u in ups}) != 1:
        return None, "up projections do not share one input"
    inside = {id(n) for n in region} | {id(down.node)} | {id(u.bias_node) for u in ups if u.bias_node is not None}
    for n in region + [u.bias_node or u.node for u in ups]:
        for out in n.outputs:
            if any(id(user) not in inside for user, _ in out.uses()):
                return None, f"{n.name}: an FFN value is also used outside the FFN"
    return Ffn(ups, down, region), None

"""Key-padding masks behind the exporters' attention biases.

The exporters turn the ``attention_mask`` input into an additive attention bias with a few
dozen shape ops whose form changes between exporters and versions. Rather than match that
form, :func:`padding_bias_problem` *evaluates* the bias subgraph with ONNX Runtime on probe
inputs (several batch/sequence sizes and padding patterns, random other inputs) and accepts it
only if it is the padding mask it claims to be: 0 for real keys, ≤ -1e4 for padded ones, the
same for every query and head. ORT's fused attention kernels then take the mask itself
(``mask_index``) instead of a [batch, 1, seq, seq] float bias.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graphc.core import ops
from graphc.checks.synth import synthesize_inputs
from graphc.core.session import make_session

_PROBE_SHAPES = ((3, 7), (2, 12))


def padding_bias_problem(model: ir.Model, bias: ir.Value, mask_name: str = "attention_mask") -> str | None:
    """None if ``bias`` evaluates to the key-padding bias of the graph input ``mask_name``,
    else why not."""
    mask = next((v for v in model.graph.inputs if v.name == mask_name), None)
    if mask is None:
        return f"attention_bias present but no graph input {mask_name!r} to take a mask from"
    if bias.producer() is None:
        return "attention_bias is a constant or an input, not a key-padding mask of the mask input"
    proto = _subgraph_proto(model, bias)
    try:
        session = make_session(proto, what="attention-mask probe")
    except Exception as e:  # noqa: BLE001
        return f"cannot evaluate the attention_bias subgraph: {e}"
    names = {i.name for i in session.get_inputs()}
    if mask_name not in names:
        return f"attention_bias does not depend on {mask_name!r}"
    rng = np.random.default_rng(0)
    for batch, seq in _PROBE_SHAPES:
        feed = _probe_feed(model, batch, seq, rng)
        lengths = [seq, max(1, seq // 2), 1][:batch]
        m = np.zeros((batch, seq), dtype=feed[mask_name].dtype)
        for b, n in enumerate(lengths):
            m[b, :n] = 1
        feed[mask_name] = m
        try:
            (got,) = session.run(None, {k: v for k, v in feed.items() if k in names})
        except Exception as e:  # noqa: BLE001
            return f"attention_bias subgraph fails on probe inputs: {str(e).splitlines()[0]}"
        try:
            got = np.broadcast_to(got, (batch, 1, seq, seq))
        except ValueError:
            return f"attention_bias has shape {got.shape}, not broadcastable to [batch, 1, seq, seq]"
        keep = np.broadcast_to(m.astype(bool)[:, None, None, :], got.shape)
        if not np.all(got[keep] == 0) or not np.all(got[~keep] <= -1e4):
            return "attention_bias is not a key-padding mask of the mask input (causal or other bias)"
    return None


def mask_index(graph: ir.Graph, mask_name: str = "attention_mask") -> ir.Value:
    """The mask input as int32 (what ORT's attention kernels take), one Cast per graph."""
    mask = next(v for v in graph.inputs if v.name == mask_name)
    for use in mask.uses():
        node = use.node
        if node.op_type == ops.CAST and node.attributes.get_int("to", 0) == ir.DataType.INT32 and node.graph is graph:
            return node.outputs[0]
    cast = ir.node(ops.CAST, [mask], attributes={"to": ir.DataType.INT32}, name="mask_index_int32")
    graph.insert_before(next(iter(graph)), cast)
    return cast.outputs[0]


def _probe_feed(model: ir.Model, batch: int, seq: int, rng) -> dict[str, np.ndarray]:
    feed = synthesize_inputs(model, count=1, seed=int(rng.integers(1 << 30)))[0]
    out = {}
    for value in model.graph.inputs:
        arr = feed[value.name]
        shape = [batch if i == 0 else seq if i == 1 else d for i, d in enumerate(arr.shape)]
        if np.issubdtype(arr.dtype, np.integer):
            high = max(int(arr.max()) + 1, 2)
            out[value.name] = rng.integers(0, high, size=shape).astype(arr.dtype)
        else:
            out[value.name] = rng.standard_normal(shape).astype(arr.dtype)
    return out


def _subgraph_proto(model: ir.Model, output: ir.Value) -> onnx.ModelProto:
    """A model computing only ``output`` from the graph inputs (the nodes it depends on)."""
    needed: list[ir.Node] = []
    seen: set[int] = set()
    stack = [output]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(v for v in node.inputs if v is not None)
    order = {id(n): i for i, n in enumerate(model.graph)}
    needed.sort(key=lambda n: order[id(n)])
    names = {v.name for n in needed for v in n.inputs if v is not None}
    inputs = [v for v in model.graph.inputs if v.name in names]
    nodes = [ir.serde.serialize_node(n) for n in needed]
    inits = [
        ir.serde.serialize_tensor(v.const_value)
        for name, v in model.graph.initializers.items()
        if name in names and v.const_value is not None
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "attention_bias_probe",
        [ir.serde.serialize_value(v) for v in inputs],
        [onnx.helper.make_value_info(output.name, onnx.TypeProto())],
        inits,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=min(model.ir_version, 10))

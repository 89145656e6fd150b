"""Static int8 QDQ, the rewriting half: Q/DQ pairs inserted on chosen activations, int8 weights
behind DequantizeLinear (in the target's exact form), and SmoothQuant's migration of activation
range into the weights. The choosing and calibrating half is ``quantize_activations``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import PassStats, copy_scope
from graphc.passes._quant import const_array, constant, drop_unused_initializers, ensure_opset, int8_weight

QUANTIZE_LINEAR = "QuantizeLinear"
DEQUANTIZE_LINEAR = "DequantizeLinear"
PER_AXIS_OPSET = 13  # DequantizeLinear's axis attribute


def weight_candidates(graph: ir.Graph, stats: PassStats) -> list[ir.Node]:
    out = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type != ops.MATMUL or len(node.inputs) != 2:
            continue
        w = const_array(node.inputs[1])
        if w is None:
            continue
        label = node.name or node.op_type
        if w.dtype != np.float32:
            stats.skip(label, f"weight dtype {w.dtype} is not float32")
        elif w.ndim != 2:
            stats.skip(label, f"weight is {w.ndim}-D, not 2-D")
        else:
            out.append(node)
    return out


# --------------------------------------------------------------------------- smoothing


def smooth(model: ir.Model, names: Sequence[str], alpha: float, feeds, pass_name: str) -> int:
    """SmoothQuant: x → x / s before the MatMuls that read x, their weight rows × s, with
    s_j = max|x_j|^alpha / max|W_j|^(1-alpha) (calibrated): the activation's outlier channels
    move into the weights, which are quantized per output channel. Returns how many inputs."""
    from graphc.core.calibrate import channel_absmax

    graph = model.graph
    values = _values_by_name(graph)
    plans = []
    for name in names:
        x = values.get(name)
        # only the MatMuls read the smoothed value; other readers (a residual) keep x
        users = [u for u in x.uses() if u.node.op_type == ops.MATMUL and u.idx == 0] if x is not None else []
        if not users:
            continue
        weights = [const_array(u.node.inputs[1]) for u in users]
        if any(w is None or w.ndim != 2 or w.dtype != np.float32 for w in weights):
            continue
        plans.append((x, users, weights))
    if not plans:
        return 0
    absmax = channel_absmax(model, [p[0] for p in plans], feeds, pass_name=pass_name)
    for x, users, weights in plans:
        a = np.maximum(absmax[x.name].astype(np.float64), 1e-5)
        wmax = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64), 1e-5)
        factor = np.clip(a**alpha / wmax ** (1 - alpha), 1e-4, 1e4)
        factor = (factor / np.exp(np.mean(np.log(factor)))).astype(np.float32)  # geometric mean 1
        inv = constant(graph, f"{x.name}_smooth", (1.0 / factor).astype(np.float32))
        mul = ir.node(ops.MUL, [x, inv])
        mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, x.shape
        graph.insert_before(users[0].node, mul)
        copy_scope(users[0].node, mul)
        for u, w in zip(users, weights):
            wv = constant(graph, f"{u.node.inputs[1].name or 'w'}_smoothed", (w * factor[:, None]).astype(np.float32))
            u.node.replace_input_with(0, mul.outputs[0])
            u.node.replace_input_with(1, wv)
    drop_unused_initializers(graph)
    return len(plans)


# --------------------------------------------------------------------------- rewriting


def apply(model: ir.Model, acts: dict[str, tuple[tuple[np.float32, np.integer], bool]],
          weights_per_channel: bool | None, stats: PassStats, weight_form: str = "u8s8") -> None:
    """Insert Q/DQ on the named tensors ({name: ((scale, zero point), matmul_only)}) and,
    unless ``weights_per_channel`` is None, int8 DQ weights (in ``weight_form``, see
    graphc.target) on every float32 2-D MatMul weight."""
    graph = model.graph
    values = _values_by_name(graph)
    ensure_opset(model, "", 10)
    for name, ((scale, zp), matmul_only) in acts.items():
        x = values.get(name)
        if x is None:
            continue
        uses = [(u.node, u.idx) for u in x.uses()
                if not matmul_only or (u.node.op_type == ops.MATMUL and u.node.domain in ("", "ai.onnx"))]
        s = constant(graph, f"{name}_act_scale", np.asarray(scale, np.float32))
        z = constant(graph, f"{name}_act_zero_point", np.asarray(zp))
        q = ir.node(QUANTIZE_LINEAR, [x, s, z])
        dq = ir.node(DEQUANTIZE_LINEAR, [q.outputs[0], s, z])
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, x.shape
        producer = x.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
            copy_scope(producer, q)
            copy_scope(producer, dq)
        else:
            first = next(iter(graph))
            graph.insert_before(first, [q, dq])
        for user, idx in uses:
            user.replace_input_with(idx, dq.outputs[0])
        stats.add("activations_quantized")
    if weights_per_channel is None:
        return
    done: dict[int, ir.Value] = {}
    for node in weight_candidates(graph, PassStats()):
        wv = node.inputs[1]
        key = id(wv)
        if key not in done:
            w = const_array(wv).astype(np.float32)
            q, scale, zp = int8_weight(w, 1 if weights_per_channel else None, weight_form)
            base = wv.name or "w"
            qv = constant(graph, f"{base}_{q.dtype.name}", q)
            sv = constant(graph, f"{base}_scale", scale.reshape(-1) if weights_per_channel else scale.reshape(()))
            dq_inputs = [qv, sv]
            if zp is not None:  # per-axis DequantizeLinear wants a zero point shaped like its scale
                zv = np.full(q.shape[1], zp, zp.dtype) if weights_per_channel else zp
                dq_inputs.append(constant(graph, f"{base}_zero_point", zv))
            # int8 codes need no zero point: 0 of their type (ORT fuses this form the same; saves N bytes)
            attrs = {"axis": 1} if weights_per_channel else {}
            dq = ir.node(DEQUANTIZE_LINEAR, dq_inputs, attributes=attrs)
            graph.insert_before(node, dq)
            copy_scope(node, dq)
            done[key] = dq.outputs[0]
            stats.add("weight_bytes_before", int(w.nbytes))
            stats.add("weight_bytes_after", int(q.nbytes + scale.nbytes))
            stats.add("weights_quantized")
        node.replace_input_with(1, done[key])
    if weights_per_channel:
        ensure_opset(model, "", PER_AXIS_OPSET)
    drop_unused_initializers(graph)


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    out = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for v in node.outputs:
            if v.name:
                out[v.name] = v
    return out

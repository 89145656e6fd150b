"""What a target means for validation: which int8 GEMMs a saturating CPU gets wrong, an exact
copy to validate a model compiled for another target, and the one-line notices that say so."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from graphc.core.errors import GraphcError
from graphc.core.target import cpu_name, host, resolve, runs_here


_INT_GEMMS = {"MatMulIntegerToFloat": (1, 5), "MatMulInteger": (1, 3), "DynamicQuantizeMatMul": (1, 4),
              "QAttention": (1, 7), "DequantizeLinear": (0, 2)}  # op → (weight input, weight zero-point input)
# (a constant int8 DequantizeLinear feeding a MatMul becomes ORT's integer GEMM at load)


def _initializer(graph, name: str, array: np.ndarray):
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def exact_when_saturating(w: np.ndarray) -> bool:
    """Whether int8 GEMM weights give exact results on a saturating u8×s8 kernel: each pair of
    adjacent codes along K (a [K, N] weight's rows 2i and 2i+1, the pair ``vpmaddubsw`` adds in
    int16) sums to at most PAIR_LIMIT in magnitude (the ``u8s8p`` form, and every 7-bit weight);
    a weight of another rank, at most 7 bits."""
    from graphc.passes._quant import PAIR_LIMIT, pair_sums

    a = w.astype(np.int16)
    if a.ndim != 2:
        return int(np.abs(a).max(initial=0)) <= 63
    return int(pair_sums(a).max(initial=0)) <= PAIR_LIMIT


def _inexact_gemms(model):
    """(node, its weight and zero-point input slots, int8 weights) of each integer GEMM a
    saturating u8×s8 kernel can get wrong (:func:`exact_when_saturating` says no)."""
    from graphc.passes._quant import const_array

    for node in list(model.graph.all_nodes()):
        slots = _INT_GEMMS.get(node.op_type)
        if slots is None or len(node.inputs) <= slots[0]:
            continue
        if node.op_type == "DequantizeLinear" and not any(u.node.op_type in ("MatMul", "Gemm") for u in node.outputs[0].uses()):
            continue  # a table or other constant, not a GEMM weight
        w = const_array(node.inputs[slots[0]])
        if w is not None and w.dtype == np.int8 and not exact_when_saturating(w):
            yield node, slots, w


def saturating_gemms(model) -> list[str]:
    """Names of the integer GEMMs whose int8 weights a saturating u8×s8 kernel can get wrong."""
    return [node.name or node.op_type for node, _, _ in _inexact_gemms(model)]


def exact_on_host(model) -> bool:
    """Rewrite, in place, every integer GEMM whose int8 weights a saturating kernel can get wrong
    (:func:`exact_when_saturating`) into the u8u8 form (codes + 128, zero point + 128): the same
    arithmetic, which the u8u8 kernel computes exactly on any CPU. Validation uses it on a machine
    whose u8×s8 kernel saturates for a model compiled for a target whose kernel does not (e.g.
    VNNI), so that it measures the target's numbers, not this machine's. Returns whether anything
    changed."""
    from graphc.passes._quant import const_array

    changed = False
    for node, slots, w in list(_inexact_gemms(model)):
        zp_value = node.inputs[slots[1]] if len(node.inputs) > slots[1] else None
        if zp_value is not None:
            zp = const_array(zp_value)
        elif node.op_type == "DequantizeLinear":  # a per-axis scale wants a zero point of its shape
            scale = const_array(node.inputs[1])
            zp = np.zeros(scale.shape if scale is not None else (), np.int8)
        else:
            zp = np.zeros((), np.int8)
        if zp is None:
            continue
        if len(node.inputs) <= slots[1]:
            node.resize_inputs(slots[1] + 1)
        base = node.inputs[slots[0]].name or "w"
        node.replace_input_with(slots[0], _initializer(model.graph, f"{base}_u8", (w.astype(np.int16) + 128).astype(np.uint8)))
        node.replace_input_with(slots[1], _initializer(model.graph, f"{base}_u8_zp", (zp.astype(np.int16) + 128).astype(np.uint8)))
        changed = True
    return changed


def target_notices(info, validating: bool) -> list[str]:
    """One line when the target is not the machine graphc runs on: what was not measured there."""
    if runs_here(info):
        return []
    here = host()
    what = "validation ran on this machine's kernels" if validating else "nothing was run"
    if here.arch != info.arch:
        what = ("validation ran here on ONNX Runtime's x86 kernels, not on the target" if validating
                else "nothing was run")
    return [f"target {info.name} is not this machine ({here.name}, {cpu_name()}): {what}; "
            "timings and latency-based choices do not apply to the target"]


def validation_model(model: ir.Model, notices: list[str]) -> ir.Model:
    """The model validation runs: itself, or, on a machine whose u8×s8 kernel saturates, a copy
    whose int8 GEMM weights are in the u8u8 form (the same arithmetic, exact here), so that a
    model compiled for a VNNI/ARM target is judged on the target's numbers (graphc.target)."""
    if not host().saturates or not saturating_gemms(model):
        return model
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    exact_on_host(copy)
    notices.append("this machine's u8×s8 kernel saturates: validated the int8 GEMMs in their exact u8u8 form "
                   "(the target's arithmetic)")
    return copy


def target_check_notices(model: ir.Model) -> list[str]:
    """What validating ``model`` on this machine says about the CPU it was compiled for."""
    notices = []
    raw = model.metadata_props.get("graphc.target")
    if raw:
        try:
            info = resolve(json.loads(raw).get("target"))
        except (ValueError, GraphcError, AttributeError):
            info = None
        if info is not None and not runs_here(info):
            notices.append(f"compiled for {info.name}; this machine is {host().name} ({cpu_name()}): "
                           "these figures were not measured on the target")
    wide = saturating_gemms(model) if host().saturates else []
    if wide:
        notices.append(f"this machine's u8×s8 kernel saturates, and {len(wide)} int8 GEMM(s) use 8-bit weights "
                       f"(e.g. {wide[0]}): their results here can be off; recompile with --target auto")
    return notices

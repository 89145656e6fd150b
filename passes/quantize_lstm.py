"""int8 weights for ``LSTM``: ONNX Runtime's ``DynamicQuantizeLSTM`` (com.microsoft).

    LSTM(X, W [D, 4H, I], R [D, 4H, H], B, ...)  →  DynamicQuantizeLSTM(X, Wq [D, I, 4H], Rq [D, H, 4H], B, ...,
                                                                        W_scale, W_zero_point, R_scale, R_zero_point)

The kernel keeps ONNX's LSTM semantics (gates, activations, clip, peepholes, sequence lengths)
and quantizes the input and the hidden state to uint8 at every step, multiplying them by the
stored int8 weights with ONNX Runtime's integer GEMM. Weights are stored transposed (the
GEMM's [K, N] layout) with one scale per gate row (``[D, 4H]``).

That GEMM is the same u8×s8 kernel as ``MatMulInteger``'s, so the weights follow the target's
int8 formulation (``graphc.core.target``): ``u8s8`` where it is exact, ``u8u8`` (codes + 128
as uint8, zero point 128) where the u8×s8 pair sums saturate (AVX2, AVX-512 without VNNI).

Left alone, with the reason: ``layout = 1`` (batch-first; the contrib op has no such
attribute), weights that are not float32 constants, and ``GRU``/``RNN`` (ONNX Runtime has no
integer kernel for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core.errors import UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, choice, copy_scope
from graphc.core.registry import register
from graphc.core.target import Int8Form, exact_forms
from graphc.passes._quant import (
    const_array,
    constant,
    drop_unused_initializers,
    ensure_opset,
    int8_weight,
    subgraphs,
    weight_problem,
)

_MS = "com.microsoft"
_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


@dataclass(frozen=True)
class LstmInt8Options:
    min_elements: int = 1024  # smaller W/R pairs stay float: the op's per-step quantization costs more
    exclude: tuple[str, ...] = ()  # substrings of node names to leave in float
    form: str = "auto"  # u8s8 | u8u8 | u8s7 | auto (the target's form)


@register
class QuantizeLstm(GraphcPass):
    name = "quantize-lstm"
    summary = "int8 LSTM weights per gate row (ONNX Runtime's DynamicQuantizeLSTM, the target's int8 form)"
    Options = LstmInt8Options

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        form = self._form(stats)
        changed = False
        for graph in [model.graph, *subgraphs(model.graph)]:
            touched = False
            for node in list(graph):
                weights = self._weights(node, stats)
                if weights is None:
                    continue
                self._replace(graph, node, *weights, form, stats)
                touched = True
            if touched:
                drop_unused_initializers(graph)
                changed = True
        if changed:
            ensure_opset(model, _MS, 1)
        elif not stats.skipped:
            stats.notes.append("no LSTM with constant weights found")
        return changed

    def _form(self, stats: PassStats) -> Int8Form:
        target = self.context.target_info()
        form = target.int8_form if self.options.form == "auto" else choice(Int8Form, self.options.form, "form", self.name)
        if form not in exact_forms(target):
            raise UnsupportedError(f"form={form.value!r} saturates on target {target.name}", pass_name=self.name)
        stats.details["int8_form"] = form.value
        return form

    def _weights(self, node: ir.Node, stats: PassStats) -> tuple[np.ndarray, np.ndarray] | None:
        """(W, R) float32 of an LSTM this pass can replace, else None (the reason in ``stats``)."""
        if node.op_type != "LSTM" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            return None
        label = node.name or node.op_type
        w, r = const_array(node.inputs[1]), const_array(node.inputs[2])
        reason = None
        if any(s in label for s in self.options.exclude):
            reason = "excluded by option"
        elif node.attributes.get_int("layout", 0) != 0:
            reason = ("layout=1 (batch first): DynamicQuantizeLSTM takes sequence-first inputs only "
                      "(ONNX Runtime runs no batch-first LSTM at all)")
        elif w is None or r is None:
            reason = "W or R is not a constant"
        elif w.dtype != np.float32 or r.dtype != np.float32:
            reason = f"weights are {w.dtype}/{r.dtype}, not float32"
        elif w.ndim != 3 or r.ndim != 3:
            reason = "W or R is not 3-D"
        else:
            reason = weight_problem(w, 0) or weight_problem(r, 0)
            if reason is None and w.size + r.size < self.options.min_elements:
                reason = f"W and R have {w.size + r.size} elements < min_elements={self.options.min_elements}"
        if reason is not None:
            stats.skip(label, reason)
            return None
        return w, r

    def _replace(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, r: np.ndarray, form: Int8Form,
                 stats: PassStats) -> None:
        base = node.name or "lstm"
        quantized: list[ir.Value] = []
        extra: list[ir.Value] = []
        for tag, weight in (("W", w), ("R", r)):
            q, s, z = _per_row(weight, form)
            quantized.append(constant(graph, f"{base}_{tag}_quantized", np.ascontiguousarray(np.transpose(q, (0, 2, 1)))))
            extra.append(constant(graph, f"{base}_{tag}_scale", s))
            extra.append(constant(graph, f"{base}_{tag}_zero_point", z))
            stats.add("weight_bytes_before", int(weight.nbytes))
            stats.add("weight_bytes_after", int(q.nbytes + s.nbytes + z.nbytes))
        optional = list(node.inputs[3:_INPUTS]) + [None] * (_INPUTS - max(len(node.inputs), 3))
        inputs = [node.inputs[0], *quantized, *optional, *extra]
        attributes = {name: a for name, a in node.attributes.items() if name != "layout"}
        new = ir.node("DynamicQuantizeLSTM", inputs, attributes=attributes, domain=_MS,
                      num_outputs=len(node.outputs), name=f"{base}_quant")
        copy_scope(node, new)
        for old, out in zip(node.outputs, new.outputs):
            out.name, out.shape, out.type = old.name, old.shape, old.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        stats.add("lstms_quantized")


def _per_row(weight: np.ndarray, form: Int8Form) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [D, 4H, K], scale [D, 4H] float32 and zero point [D, 4H] (int8 zeros, or uint8
    128s for ``u8u8``): symmetric per gate row, in the target's form."""
    d, rows, k = weight.shape
    q, scale, zp = int8_weight(weight.reshape(d * rows, k), 0, form.value)
    q = q.reshape(d, rows, k)
    scale = np.ascontiguousarray(scale.reshape(d, rows), dtype=np.float32)
    if zp is None:
        zero = np.zeros(scale.shape, np.int8)
    else:
        zero = np.full(scale.shape, int(zp), np.uint8)
    return q, scale, zero

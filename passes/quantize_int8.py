"""int8 weight quantization with dynamic int8 activations for constant-weight MatMul/Gemm.

Weights: symmetric int8 on [-127, 127], one scale per output channel (or per tensor).
Activations: quantized at run time to uint8 by ``DynamicQuantizeLinear``, once per distinct
input value, so Q, K and V (or any MatMuls sharing an input) share one quantization.

Outlier channels (``outlier_ratio`` > 0, needs calibration data): a few input channels of
transformer activations (after LayerNorm, after GELU; the tokens [CLS]/[SEP] light them up)
are 10-20x larger than the rest and alone set the per-tensor activation range, wasting most of
the 256 levels on the others. For an input whose largest calibrated channel exceeds
``outlier_ratio`` x the median channel, the top ``outlier_channels`` channels are handled by
``outlier_mode``:

- ``smooth`` (default): those channels only are divided by a factor that brings them to
  ``smooth_target`` x the median, and the matching weight rows multiplied by it (SmoothQuant's
  migration, restricted to the outliers so the other weight rows keep their precision). One
  ``Mul`` on the input, no other cost.
- ``split``: those channels are masked out of the int8 path and multiplied in float and added
  back (LLM.int8()'s decomposition). Most accurate; costs an outer product and an ``Add`` on the
  output. The float rows are rebuilt from the int8 weights (a constant subgraph ORT folds at
  load), so the file grows by a few bytes per input.

The weights' formulation (``form`` option) follows the target CPU (:mod:`graphc.target`):
``u8s8`` (int8 weights, VNNI and ARM), ``u8s8p`` (int8 weights bounded in adjacent K pairs:
exact with the fast u8×s8 kernel of AVX2 and AVX-512 without VNNI, which saturates an int16
pair sum), ``u8u8`` (the ``u8s8`` codes as uint8 around 128: exact everywhere, ORT's slower
u8u8 kernel) or ``u8s7`` (7-bit weights, exact everywhere). ``auto`` (default) takes the
target's MatMul form in ``graphc.target.TABLE``; a form that saturates on the target is refused.

Emitted as (``emit`` option):

- ``ms`` (default): com.microsoft ``MatMulIntegerToFloat`` (bias folded in for Gemm). ORT runs
  it with its u8s8 integer GEMM (VNNI where available).
- ``onnx``: standard ops only (``MatMulInteger`` → ``Cast`` → ``Mul`` [→ ``Add``]) for
  runtimes without contrib ops.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, UnsupportedError, ValidationError
from graphc.core.pass_base import GraphcPass, PassStats, choice, copy_scope
from graphc.core.registry import register
from graphc.passes._quant import const_array, constant, drop_unused_initializers, ensure_opset, gemm_weight, int8_weight, outer_product_reason, subgraphs, weight_problem
from graphc.core.target import Int8Form, exact_forms


class Emit(str, enum.Enum):
    MS = "ms"
    ONNX = "onnx"


class OutlierMode(str, enum.Enum):
    SMOOTH = "smooth"  # scale outlier channels down, their weight rows up (one Mul, no extra path)
    SPLIT = "split"  # outlier channels in a float side path (most accurate, costs an Add)


@dataclass(frozen=True)
class Int8Options:
    per_channel: bool = True
    emit: str = Emit.MS.value
    exclude: tuple[str, ...] = ()  # substrings of node names or scopes to leave in float
    min_elements: int = 0  # weights with fewer elements stay float
    scale_dtype: str = "float32"  # "float16": half the scale bytes, expanded at load by ORT
    outlier_ratio: float = 0.0  # 0 disables outlier decomposition
    outlier_channels: int = 1  # at most this many float channels per input
    outlier_max_consumers: int = 1  # inputs shared by more MatMuls (Q/K/V) are not decomposed
    outlier_mode: str = OutlierMode.SMOOTH.value
    smooth_target: float = 4.0  # "smooth": outlier channels are scaled down to this x the median
    smooth_min_factor: float = 1.5  # "smooth": an input whose largest factor is below this is left alone
    form: str = "auto"  # u8s8 | u8u8 | u8s7 | u8s8p | auto (the target's exact, faster form)


@dataclass
class _Candidate:
    node: ir.Node
    weight: np.ndarray  # [K, N] float32, transposes and Gemm alpha applied
    bias: np.ndarray | None  # [N] float32 (Gemm C * beta)
    weight_value: ir.Value


_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


@register
class QuantizeInt8(GraphcPass):
    name = "quantize-int8"
    summary = "int8 per-channel weights + dynamic int8 activations on constant-weight MatMul/Gemm"
    Options = Int8Options

    @property
    def needs_calibration(self) -> bool:
        return self.options.outlier_ratio > 0

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        emit = choice(Emit, self.options.emit, "emit", self.name)
        mode = choice(OutlierMode, self.options.outlier_mode, "outlier_mode", self.name)
        graph = model.graph
        groups: dict[ir.Value, list[_Candidate]] = {}
        for node in list(graph):
            cand = self._candidate(node, stats)
            if cand is not None:
                groups.setdefault(node.inputs[0], []).append(cand)
        sub_groups = []  # If/Loop/Scan bodies: quantized the same way, without outlier calibration
        for sub in subgraphs(graph):
            found: dict[ir.Value, list[_Candidate]] = {}
            for node in list(sub):
                cand = self._candidate(node, stats)
                if cand is not None:
                    found.setdefault(node.inputs[0], []).append(cand)
            if found:
                sub_groups.append((sub, found))
        if not groups and not sub_groups:
            stats.notes.append("no constant-weight MatMul/Gemm found")
            return False
        ensure_opset(model, "", 11)
        if emit is Emit.MS:
            ensure_opset(model, ops.MS_DOMAIN, ops.MS_OPSET)
        self._form = self._resolve_form(stats)
        if self.options.scale_dtype not in _SCALE_DTYPES:
            raise UnsupportedError(
                f"scale_dtype={self.options.scale_dtype!r}; supported: {', '.join(_SCALE_DTYPES)}",
                pass_name=self.name,
            )
        outliers = self._find_outliers(model, groups, stats) if self.options.outlier_ratio > 0 and groups else {}
        self._quantize_groups(graph, groups, outliers, emit, mode, stats)
        for sub, found in sub_groups:
            before = stats.counts.get("matmuls_quantized", 0) + stats.counts.get("gemms_quantized", 0)
            self._quantize_groups(sub, found, {}, emit, mode, stats)
            stats.add("subgraph_gemms_quantized",
                      stats.counts.get("matmuls_quantized", 0) + stats.counts.get("gemms_quantized", 0) - before)
        return True

    def _quantize_groups(self, graph: ir.Graph, groups, outliers, emit, mode, stats: PassStats) -> None:
        quantized: dict[tuple[int, int, str], tuple[ir.Value, ir.Value]] = {}
        for key_x, cands in groups.items():
            first = cands[0].node
            # the input as it is now: an earlier group's rewrite replaces a quantized MatMul's
            # output, which may be this group's input (MatMul feeding MatMul: SVD factors)
            x = first.inputs[0]
            found = outliers.get(key_x)
            split = smooth = None
            quant_input = x
            if found is not None and mode is OutlierMode.SPLIT:
                split = _OutlierSplit.insert(graph, x, found.channels, found.width, first)
                quant_input = split.kept
            elif found is not None:
                smooth = found.smoothing()
                inv = constant(graph, f"{x.name}_smooth", (1.0 / smooth).astype(np.float32))
                scaled = ir.node(ops.MUL, [x, inv])
                graph.insert_before(first, scaled)
                copy_scope(first, scaled)
                quant_input = scaled.outputs[0]
            dql = ir.node(ops.DYNAMIC_QUANTIZE_LINEAR, [quant_input], num_outputs=3)
            dql.name = f"{first.name or 'matmul'}_dql"
            graph.insert_before(first, dql)
            for n in [dql, *(split.nodes if split else [])]:
                copy_scope(first, n)
            xq, xs, xzp = dql.outputs
            stats.add("activations_quantized")
            for cand in cands:
                # a smoothed weight belongs to its input; a plain one may be shared
                key = id(cand.weight_value), id(x) if smooth is not None else 0, cand.node.op_type
                if key not in quantized:
                    weight = cand.weight * smooth[:, None] if smooth is not None else cand.weight
                    quantized[key] = self._quantize_weight(graph, cand, weight, stats)
                wq, ws, wzp = quantized[key]
                new_nodes = self._emit(graph, emit, cand, xq, xs, xzp, wq, ws, wzp)
                if split is not None:
                    new_nodes += split.float_path(new_nodes[-1].outputs[0], wq, ws, wzp)
                for n in new_nodes:
                    copy_scope(cand.node, n)
                ir.convenience.replace_nodes_and_values(
                    graph, cand.node, [cand.node], new_nodes, cand.node.outputs, [new_nodes[-1].outputs[0]]
                )
                stats.add("gemms_quantized" if cand.node.op_type == ops.GEMM else "matmuls_quantized")
        drop_unused_initializers(graph)

    def _resolve_form(self, stats: PassStats) -> Int8Form:
        target = self.context.target_info()
        if self.options.form == "auto":
            form = target.matmul_form
        else:
            form = choice(Int8Form, self.options.form, "form", self.name)
            if form not in exact_forms(target):
                raise UnsupportedError(
                    f"form={form.value!r} saturates on target {target.name} (its u8×s8 kernel sums product pairs "
                    f"in int16); exact there: {', '.join(f.value for f in exact_forms(target))}",
                    pass_name=self.name,
                )
        stats.details["target"] = target.name
        stats.details["int8_form"] = form.value
        return form

    def _quantize_weight(
        self, graph: ir.Graph, cand: _Candidate, weight: np.ndarray, stats: PassStats
    ) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        axis = 1 if self.options.per_channel else None
        q, s, zp = int8_weight(weight, axis, self._form.value, _SCALE_DTYPES[self.options.scale_dtype])
        base = cand.weight_value.name or "w"
        wq = constant(graph, f"{base}_{q.dtype.name}", q)
        ws = constant(graph, f"{base}_scale", s.reshape(-1))
        wzp = constant(graph, f"{base}_zero_point", zp) if zp is not None else None
        stats.add("weight_bytes_before", int(cand.weight.nbytes))
        stats.add("weight_bytes_after", int(q.nbytes + s.nbytes + (zp.nbytes if zp is not None else 0)))
        if s.dtype != np.float32:  # ORT folds this Cast of a constant at session creation
            cast = ir.node(ops.CAST, [ws], attributes={"to": ir.DataType.FLOAT})
            graph.insert_before(cand.node, cast)
            ws = cast.outputs[0]
        return wq, ws, wzp

    def _find_outliers(self, model: ir.Model, groups, stats: PassStats) -> dict[ir.Value, _Outliers]:
        from graphc.core.calibrate import channel_absmax

        if not self.context.calibration:
            raise PassError(
                "outlier_ratio > 0 needs calibration data, and none was given (use a model spec or pass feeds)",
                pass_name=self.name,
            )
        eligible = [x for x, cands in groups.items() if len(cands) <= self.options.outlier_max_consumers and x.name]
        if not eligible:
            return {}
        try:
            absmax = channel_absmax(model, eligible, self.context.calibration, pass_name=self.name)
        except ValidationError as e:  # e.g. a custom op without a kernel here: quantize without it
            stats.notes.append(f"outlier channels not smoothed: {e.message}")
            return {}
        stats.notes.append(f"outlier channels calibrated on {self.context.calibration_source}")
        found = {}
        for x in eligible:
            amax = absmax[x.name]
            median = float(np.median(amax))
            if not np.all(np.isfinite(amax)):
                stats.notes.append(f"outliers: input {x.name!r} not smoothed: its calibrated range is not finite")
                continue
            if median <= 0.0:
                # most channels were zero on the calibration data (one-hot inputs, ids out of
                # range): no ratio to the median means anything, and dividing by it would not
                stats.notes.append(f"outliers: input {x.name!r} not smoothed: median channel range is 0 on "
                                   f"{self.context.calibration_source}")
                continue
            top = np.argsort(-amax, kind="stable")[: self.options.outlier_channels]
            top = np.sort(top[amax[top] > self.options.outlier_ratio * max(median, 1e-12)])
            if not len(top):
                continue
            factors = np.maximum(amax[top] / (self.options.smooth_target * median), 1.0)
            if self.options.outlier_mode == OutlierMode.SMOOTH.value and factors.max() < self.options.smooth_min_factor:
                continue  # a Mul on the whole input for a negligible range gain: not worth it
            found[x] = _Outliers(top.astype(np.int64), len(amax), factors.astype(np.float32))
            stats.add("outlier_channels", len(top))
        return found

    # ------------------------------------------------------------------ matching
    def _candidate(self, node: ir.Node, stats: PassStats) -> _Candidate | None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in (ops.MATMUL, ops.GEMM):
            return None
        label = node.name or node.op_type
        if any(s in label or s in node.metadata_props.get("graphc.scope", "") for s in self.options.exclude):
            stats.skip(label, "excluded by option")
            return None
        if node.inputs[0] is None or len(node.inputs) < 2:
            return None
        w = const_array(node.inputs[1])
        if w is None:
            stats.skip(label, "weight is not a constant (activation x activation MatMul)")
            return None
        if w.dtype != np.float32:
            # MatMul/Gemm take both operands in one type: a float16 weight means float16
            # activations, which DynamicQuantizeLinear does not take (float32 only)
            stats.skip(label, f"weight dtype {w.dtype} is not float32 (float16 models are not quantized)")
            return None
        if w.ndim != 2:
            stats.skip(label, f"weight is {w.ndim}-D, not 2-D")
            return None
        if (reason := weight_problem(w, self.options.min_elements) or outer_product_reason(node, w)) is not None:
            stats.skip(label, reason)
            return None
        in_dtype = node.inputs[0].dtype
        if in_dtype is not None and in_dtype != ir.DataType.FLOAT:
            stats.skip(label, f"activation dtype {in_dtype} is not float32")
            return None
        found = gemm_weight(node, w.astype(np.float32), stats, label)
        if found is None:
            return None
        return _Candidate(node, found[0], found[1], node.inputs[1])

    # ------------------------------------------------------------------ emitting
    def _emit(self, graph, emit, cand, xq, xs, xzp, wq, ws, wzp) -> list[ir.Node]:
        bias = constant(graph, f"{cand.weight_value.name or 'w'}_bias", cand.bias) if cand.bias is not None else None
        if emit is Emit.MS:
            inputs = [xq, wq, xs, ws, xzp, wzp, bias]
            while inputs[-1] is None:
                inputs.pop()
            node = ir.node(ops.MATMUL_INTEGER_TO_FLOAT, inputs, domain=ops.MS_DOMAIN)
            node.name = f"{cand.node.name}_int8" if cand.node.name else ""
            return [node]
        mm = ir.node(ops.MATMUL_INTEGER, [xq, wq, xzp, *([wzp] if wzp is not None else [])])
        cast = ir.node(ops.CAST, [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        scale = ir.node(ops.MUL, [xs, ws])
        out = ir.node(ops.MUL, [cast.outputs[0], scale.outputs[0]])
        nodes = [mm, cast, scale, out]
        if bias is not None:
            nodes.append(ir.node(ops.ADD, [out.outputs[0], bias]))
        return nodes


@dataclass
class _Outliers:
    channels: np.ndarray  # int64 channel indices
    width: int  # channels in the input
    factors: np.ndarray  # how much larger than smooth_target x median each one is (>= 1)

    def smoothing(self) -> np.ndarray:
        vector = np.ones(self.width, np.float32)
        vector[self.channels] = self.factors
        return vector


@dataclass
class _OutlierSplit:
    """x → (x with outlier channels zeroed, for the int8 path) and x[..., idx] (float path)."""

    idx: ir.Value
    kept: ir.Value
    outliers: ir.Value
    nodes: list[ir.Node]

    @classmethod
    def insert(cls, graph: ir.Graph, x: ir.Value, idx: np.ndarray, k: int, before: ir.Node) -> _OutlierSplit:
        idx_v = constant(graph, f"{x.name}_outlier_idx", idx)
        size = constant(graph, f"{x.name}_channels", np.array([k], np.int64))
        zeros = constant(graph, f"{x.name}_outlier_zeros", np.zeros(len(idx), np.float32))
        # keep-mask = scatter zeros into ones: constant, folded by ORT at load (a few bytes on disk)
        ones = ir.node("ConstantOfShape", [size], attributes={"value": ir.tensor(np.ones(1, np.float32))})
        mask = ir.node("ScatterElements", [ones.outputs[0], idx_v, zeros], attributes={"axis": 0})
        kept = ir.node(ops.MUL, [x, mask.outputs[0]])
        picked = ir.node(ops.GATHER, [x, idx_v], attributes={"axis": -1})
        nodes = [ones, mask, kept, picked]
        for n in nodes:
            graph.insert_before(before, n)
        return cls(idx_v, kept.outputs[0], picked.outputs[0], nodes)

    def float_path(self, int8_out: ir.Value, wq: ir.Value, ws: ir.Value, wzp: ir.Value | None) -> list[ir.Node]:
        """y = int8_out + x[..., idx] @ ((wq[idx] - wzp) * ws): the weight rows are rebuilt
        from the int8 weights (a constant subgraph), so they cost no extra bytes on disk."""
        rows = ir.node(ops.GATHER, [wq, self.idx], attributes={"axis": 0})
        rows_f = ir.node(ops.CAST, [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        nodes = [rows, rows_f]
        codes = rows_f.outputs[0]
        if wzp is not None:
            zp_f = ir.node(ops.CAST, [wzp], attributes={"to": ir.DataType.FLOAT})
            centred = ir.node("Sub", [codes, zp_f.outputs[0]])
            nodes += [zp_f, centred]
            codes = centred.outputs[0]
        w_rows = ir.node(ops.MUL, [codes, ws])
        mm = ir.node(ops.MATMUL, [self.outliers, w_rows.outputs[0]])
        add = ir.node(ops.ADD, [int8_out, mm.outputs[0]])
        return [*nodes, w_rows, mm, add]

"""Static int8 activation quantization of the whole block (BBCT), as QDQ.

Each chosen activation tensor x gets ``QuantizeLinear → DequantizeLinear`` with one static
scale and zero point (uint8 asymmetric by default, or int8), from ranges calibrated on the
context's calibration feeds by ``method`` (``minmax``, ``percentile``, ``entropy`` (KL) or
``mse``; see ``_actcalib``). Which tensors (``targets``):

- ``matmul_in``: the activation input of each constant-weight MatMul; the DequantizeLinear
  feeds only the MatMuls (other readers of the value, a residual, stay float).
- ``matmul_out``: MatMul outputs (the Q/K/V projections before fused attention, ...).
- ``gelu``: outputs of Gelu, FastGelu, BiasGelu, QuickGelu and of decomposed erf/tanh GELU.
- ``softmax``: Softmax outputs (none left once attention is fused into MultiHeadAttention).
- ``layernorm``: outputs of (Skip)(Simplified)LayerNormalization and RMSNormalization.
- ``embedding``: outputs of Gather from a constant float table.
- ``attention``: inputs of fused Attention/MultiHeadAttention and of activation x activation
  MatMuls (Q·Kᵀ, P·V).

Every reader of a tensor chosen by a target other than ``matmul_in`` sees the quantized
value. Graph outputs and tensors that are not float32 are left float with the reason. Ranges
leave out padded positions ([batch, seq, ...] tensors under the feed's ``attention_mask``).

Weights (``weights=True``): each constant float32 2-D MatMul weight becomes symmetric int8
(per output channel, or per tensor) behind a ``DequantizeLinear``. ONNX Runtime fuses
``DQ(x) → MatMul ← DQ(W)`` into ``MatMulIntegerToFloat`` (u8s8 integer GEMM) and, when the
output is quantized too (``matmul_out``), ``DQ → MatMul → Q`` into ``QLinearMatMul``; every
other Q/DQ pair runs as two elementwise kernels (measured, bench/bench_static.py).

Outlier channels (``smooth_alpha`` > 0, SmoothQuant): before the ranges are calibrated, each
``matmul_in`` tensor x read only through that target is divided per channel by
s_j = max|x_j|^alpha / max|W_j|^(1-alpha) (one ``Mul`` in front of its MatMuls; other readers
keep x) and the MatMuls' weight rows multiplied by s, so the few 10-50x channels of
transformer activations stop setting the per-tensor grid (MiniLM: matmul_in cost 0.010 → 0.002
at alpha 0.8, worse at 0.5).

Cost per target (``cost=True``): the output cosine error (1 - cosine of the flattened outputs
vs the float model, padding rows left out) when only that target's tensors are quantized
(weights float), and when only the weights are (``weights``), on the first ``cost_feeds``
calibration feeds; in the stats as ``cost_by_op_type``.

Error budget (``max_error`` > 0): static grids on many tensors have no accuracy bound of their
own (per-tensor ranges on a LayerNorm output with outlier channels lose most; costs add up, and
more than add up, over targets). When the whole result's measured error (``all``) is over the
budget, the target that cost most alone is given up (its tensors stay float, unless another kept
target chose them) and the pass tried again on a copy (smoothing and ranges redone for the
targets left: a tensor another target no longer shares can be smoothed), until it fits; if the
int8 weights alone are over it, nothing is quantized. A note names what was given up.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError
from graphc.core.pass_base import GraphcPass, PassStats, choice
from graphc.passes._actcalib import ActType, Collector, Method, qparams
from graphc.passes._qdq import PER_AXIS_OPSET, apply, smooth, weight_candidates
from graphc.passes._quant import const_array
from graphc.core.target import Int8Form, exact_forms
from graphc.core.registry import register

_GELU_OPS = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})
_NORM_OPS = frozenset(
    {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
     "SkipSimplifiedLayerNormalization", "RMSNormalization"}
)
_ATTENTION_OPS = frozenset({ops.ATTENTION, ops.MULTI_HEAD_ATTENTION, "GroupQueryAttention"})


class Target(str, enum.Enum):
    MATMUL_IN = "matmul_in"
    MATMUL_OUT = "matmul_out"
    GELU = "gelu"
    SOFTMAX = "softmax"
    LAYERNORM = "layernorm"
    EMBEDDING = "embedding"
    ATTENTION = "attention"


ALL_TARGETS = tuple(t.value for t in Target)


@dataclass(frozen=True)
class ActQuantOptions:
    targets: tuple[str, ...] = ALL_TARGETS
    method: str = Method.MSE.value
    percentile: float = 99.99  # method="percentile": keep this share of the values inside the range
    activation_type: str = ActType.UINT8.value
    symmetric: bool = False
    weights: bool = True  # int8 symmetric weights behind DequantizeLinear on constant MatMul weights
    per_channel: bool = True
    bins: int = 2048  # histogram bins on each side of zero (percentile, entropy, mse)
    cost: bool = True  # measure each target's cost alone (stats: cost_by_op_type)
    cost_feeds: int = 4
    smooth_alpha: float = 0.0  # > 0: SmoothQuant migration on matmul_in tensors (0.5 is SmoothQuant's)
    exclude: tuple[str, ...] = ()  # substrings of node names or scopes whose tensors stay float
    form: str = "auto"  # weights: u8s8 | u8u8 | u8s7 | u8s8p | auto (exact on the target CPU; see graphc.target)
    # > 0: the output error (1 - cosine, on the first cost_feeds calibration feeds) the result may
    # have; while it is over, the costliest remaining target (measured alone) is given up
    max_error: float = 0.0


@dataclass
class _Choice:
    targets: set[str]
    matmul_only: bool  # only matmul_in chose it: the DQ feeds the MatMuls alone


@register
class QuantizeActivations(GraphcPass):
    name = "quantize-activations"
    summary = "static int8 QDQ on activations (matmul in/out, GELU, softmax, LayerNorm, embeddings) + int8 QDQ weights"
    Options = ActQuantOptions
    needs_calibration = True
    calibration_texts = 128  # ranges from 8 feeds of 16 tweets on MiniLM (compress sizes the data by this)

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        o = self.options
        method = choice(Method, o.method, "method", self.name)
        act = choice(ActType, o.activation_type, "activation_type", self.name)
        targets = [choice(Target, t, "targets", self.name) for t in o.targets]
        if not 0 < o.percentile <= 100 or o.bins < 16 or o.cost_feeds < 1:
            raise PassError(
                f"percentile must be in (0, 100], bins >= 16, cost_feeds >= 1 (got {o.percentile}, {o.bins}, {o.cost_feeds})",
                pass_name=self.name,
            )
        feeds = self.context.calibration
        if not feeds:
            raise PassError(
                "needs calibration data (static activation ranges), and none was given: use a model exported "
                "by graphc (its recipe's texts) or pass calibration feeds in the PassContext",
                pass_name=self.name,
            )
        self._form = self._weight_form(act, stats)
        if o.max_error < 0:
            raise PassError(f"max_error must be >= 0 (got {o.max_error})", pass_name=self.name)
        if o.max_error > 0:
            targets = self._targets_within_budget(model, targets, method, act, stats)
            if targets is None:
                return False
        return self._quantize(model, targets, method, act, stats)

    def _quantize(self, model: ir.Model, targets: list[Target], method: Method, act: ActType, stats: PassStats) -> bool:
        o = self.options
        prepared = self._prepare(model, targets, method, act, stats)
        if prepared is None:
            stats.notes.append("nothing to quantize: no chosen activation tensor and no constant float32 MatMul weight")
            return False
        chosen, weights, params, per_channel = prepared
        if o.per_channel and not per_channel:
            stats.notes.append(f"opset < {PER_AXIS_OPSET}: per-tensor weight scales (per-axis DequantizeLinear needs 13)")
        if o.cost and (params or weights):
            stats.counts["cost_by_op_type"] = self._costs(model, chosen, params, per_channel, bool(weights))  # type: ignore[assignment]
        apply(model, {n: (params[n], c.matmul_only) for n, c in chosen.items() if n in params},
              per_channel if weights else None, stats, self._form.value)
        for target in targets:
            n = sum(1 for name, c in chosen.items() if name in params and target.value in c.targets)
            stats.add(f"tensors_{target.value}", n)
        stats.notes.append(f"ranges: {method.value} on {self.context.calibration_source}, {act.value}"
                           f"{' symmetric' if self.options.symmetric else ''}")
        return bool(params) or bool(weights)

    def _prepare(self, model: ir.Model, targets: list[Target], method: Method, act: ActType, stats: PassStats):
        """What quantizing ``targets`` takes, the model smoothed in place first: (chosen tensors,
        weight candidates, their ranges, per-channel weights?), or None when there is nothing."""
        o = self.options
        chosen = select(model.graph, targets, o.exclude, stats)
        if o.smooth_alpha > 0 and chosen:
            smoothed = smooth(model, [n for n, c in chosen.items() if c.matmul_only], o.smooth_alpha,
                              self.context.calibration, self.name)
            if smoothed:
                stats.add("inputs_smoothed", smoothed)
                chosen = select(model.graph, targets, o.exclude, PassStats())
        weights = weight_candidates(model.graph, stats) if o.weights else []
        if not chosen and not weights:
            return None
        params = self._calibrate(model, chosen, method, act, stats) if chosen else {}
        per_channel = o.per_channel and model.opset_imports.get("", 1) >= PER_AXIS_OPSET
        return chosen, weights, params, per_channel

    def _weight_form(self, act: ActType, stats: PassStats) -> Int8Form:
        """The weights' int8 form for the target (graphc.target): its MatMul form (on a CPU whose
        u8×s8 kernel saturates, pair-bounded ``u8s8p``, exact with any 8-bit activation: ORT
        shifts int8 activations to uint8 for that kernel)."""
        target = self.context.target_info()
        if self.options.form == "auto":
            form = target.matmul_form
        else:
            form = choice(Int8Form, self.options.form, "form", self.name)
            if form not in exact_forms(target) or (target.saturates and form is Int8Form.U8U8 and act is not ActType.UINT8):
                raise PassError(f"form={form.value!r} with {act.value} activations is not exact on target {target.name}",
                                pass_name=self.name)
        stats.details["target"] = target.name
        stats.details["int8_form"] = form.value
        return form

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, model: ir.Model, chosen: dict[str, _Choice], method: Method, act: ActType,
                   stats: PassStats) -> dict[str, tuple[np.float32, np.integer]]:
        o = self.options
        feeds = list(self.context.calibration or [])
        probe = ValueProbe(model, list(chosen))
        collector = Collector(bins=o.bins)
        sweeps = 1 if method is Method.MINMAX else 2
        skipped: dict[str, str] = {}
        total = sweeps * len(feeds)
        for sweep in range(sweeps):
            for i, feed in enumerate(feeds):
                self.context.report(f"{self.name}: calibration sweep {sweep + 1}/{sweeps}", sweep * len(feeds) + i, total)
                for name, x in probe.run(feed).items():
                    if x.dtype != np.float32:
                        skipped.setdefault(name, f"not float32 ({x.dtype})")
                        continue
                    x = _real_rows(x, feed)
                    if sweep == 0:
                        collector.observe_range(name, x)
                    else:
                        collector.observe_hist(name, x)
        self.context.report(f"{self.name}: calibration", total, total)
        params = {}
        for name in chosen:
            if name in skipped:
                stats.skip(name, skipped[name])
            elif name not in collector.tensors or not np.isfinite(collector.tensors[name].lo):
                stats.skip(name, "no values seen in calibration (empty tensor)")
            else:
                lo, hi = collector.range(name, method, act, o.symmetric, o.percentile)
                params[name] = qparams(lo, hi, act, o.symmetric)
        return params

    def _targets_within_budget(self, model: ir.Model, targets: list[Target], method: Method, act: ActType,
                               stats: PassStats) -> list[Target] | None:
        """The targets whose result fits ``max_error``: each trial on a copy of the model, as the
        pass would run (smoothing and ranges redone for the targets left); the target that cost
        most alone (measured with every target) given up first. None: the weights alone miss it."""
        budget = self.options.max_error
        alone = self._trial(model, targets, method, act, every=True)
        cost, current, dropped = alone["all"], list(targets), []
        while cost > budget:
            live = [t for t in current if t.value in alone]
            if not live:
                break
            worst = max(live, key=lambda t: alone[t.value])
            current.remove(worst)
            dropped.append(worst.value)
            cost = self._trial(model, current, method, act, every=False)["all"]
        if dropped:
            stats.notes.append(f"max_error {budget:g}: left float the tensors of {', '.join(dropped)} "
                               f"(alone each cost {', '.join(f'{alone[t]:.3g}' for t in dropped)})")
            stats.add("targets_dropped", len(dropped))
        if cost > budget:
            stats.notes.append(f"max_error {budget:g}: the int8 weights alone cost {cost:.3g}: nothing quantized")
            return None
        return current

    def _trial(self, model: ir.Model, targets: list[Target], method: Method, act: ActType, *, every: bool) -> dict[str, float]:
        """The costs (each target alone, the weights, ``all``; only ``all`` unless ``every``) of
        quantizing ``targets`` as :meth:`_quantize` would, measured on a copy of the model."""
        trial = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        prepared = self._prepare(trial, targets, method, act, PassStats())
        if prepared is None:
            return {"all": 0.0}
        chosen, weights, params, per_channel = prepared
        if every:
            return self._costs(trial, chosen, params, per_channel, bool(weights))
        group = {n: (params[n], c.matmul_only) for n, c in chosen.items() if n in params}
        return self._costs_of(trial, [("all", group, per_channel if weights else None)])

    def _costs(self, model: ir.Model, chosen: dict[str, _Choice], params, per_channel: bool, weights: bool) -> dict[str, float]:
        groups: dict[str, dict[str, tuple]] = {}
        for target in self.options.targets:
            group = {n: (params[n], target == Target.MATMUL_IN.value)
                     for n, c in chosen.items() if n in params and target in c.targets}
            if group:
                groups[target] = group
        variants = [(t, g, None) for t, g in groups.items()]
        if weights:
            variants.append(("weights", {}, per_channel))
        variants.append(("all", {n: (params[n], chosen[n].matmul_only) for n in params}, per_channel if weights else None))
        return self._costs_of(model, variants)

    def _costs_of(self, model: ir.Model, variants: list[tuple[str, dict, bool | None]]) -> dict[str, float]:
        """1 - the worst output cosine of the model with each variant's tensors (and the weights,
        unless None) quantized, on the first cost_feeds calibration feeds."""
        from graphc.checks.validate import _row_mask, make_session, output_metrics, run_feeds

        feeds = list(self.context.calibration or [])[: self.options.cost_feeds]
        with _inline(model) as proto:
            reference = run_feeds(make_session(proto, what="model before quantization"), feeds, "model")
            costs: dict[str, float] = {}
            for i, (label, group, w) in enumerate(variants):
                self.context.report(f"{self.name}: cost of {label}", i, len(variants))
                copy = ir.serde.deserialize_model(proto)
                apply(copy, group, w, PassStats(), self._form.value)
                got = run_feeds(make_session(copy, what=f"model with {label} quantized"), feeds, "model")
                worst = 1.0
                for j in range(len(reference[0])):
                    refs = [r[j] for r in reference]
                    if refs[0].dtype != np.float32:
                        continue
                    masks = [_row_mask(f, r) for f, r in zip(feeds, refs)]
                    worst = min(worst, output_metrics("", refs, [g[j] for g in got], masks).cosine)
                costs[label] = round(1.0 - worst, 7)
        return costs


# --------------------------------------------------------------------------- selection


def select(graph: ir.Graph, targets: Sequence[Target], exclude: Sequence[str], stats: PassStats) -> dict[str, _Choice]:
    """Names of the activation tensors the targets choose, with who chose them."""
    chosen: dict[str, _Choice] = {}
    outputs = set(graph.outputs)

    def take(value: ir.Value | None, target: Target, node: ir.Node) -> None:
        if value is None or const_array(value) is not None:
            return
        if not value.name:
            stats.skip(node.name or node.op_type, "unnamed tensor")
            return
        if value in outputs:
            stats.skip(value.name, f"{target.value}: graph output (left float)")
            return
        if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
            stats.skip(value.name, f"{target.value}: not float32 ({value.dtype.name})")
            return
        label = node.name or ""
        if any(s in label or s in node.metadata_props.get("graphc.scope", "") for s in exclude):
            stats.skip(value.name, f"{target.value}: excluded by option")
            return
        c = chosen.setdefault(value.name, _Choice(set(), True))
        c.targets.add(target.value)
        c.matmul_only &= target is Target.MATMUL_IN

    wanted = set(targets)
    for node in graph:
        standard = node.domain in ("", "ai.onnx")
        op = node.op_type
        if standard and op == ops.MATMUL and len(node.inputs) == 2:
            weight = const_array(node.inputs[1])
            if weight is not None and Target.MATMUL_IN in wanted:
                take(node.inputs[0], Target.MATMUL_IN, node)
            if weight is None and Target.ATTENTION in wanted:
                take(node.inputs[0], Target.ATTENTION, node)
                take(node.inputs[1], Target.ATTENTION, node)
            if Target.MATMUL_OUT in wanted:
                take(node.outputs[0], Target.MATMUL_OUT, node)
        elif op in _ATTENTION_OPS and Target.ATTENTION in wanted:
            for v in node.inputs[:3]:
                take(v, Target.ATTENTION, node)
        elif op in _GELU_OPS and Target.GELU in wanted:
            take(node.outputs[0], Target.GELU, node)
        elif standard and op in ("Erf", "Tanh") and Target.GELU in wanted:
            end = _gelu_end(node)
            if end is not None:
                take(end, Target.GELU, node)
        elif standard and op == "Softmax" and Target.SOFTMAX in wanted:
            take(node.outputs[0], Target.SOFTMAX, node)
        elif op in _NORM_OPS and Target.LAYERNORM in wanted:
            take(node.outputs[0], Target.LAYERNORM, node)
        elif standard and op == ops.GATHER and Target.EMBEDDING in wanted:
            table = const_array(node.inputs[0])
            if table is not None and table.ndim == 2 and table.dtype == np.float32:
                take(node.outputs[0], Target.EMBEDDING, node)
    return chosen


def _gelu_end(node: ir.Node) -> ir.Value | None:
    """The output of a decomposed GELU around this Erf/Tanh: x * 0.5 * (1 + erf(x / √2))
    (or the tanh form): follow single readers through Add/Mul until the chain has
    multiplied by the GELU's input again (a Mul whose other operand is not a constant)."""
    value = node.outputs[0]
    for _ in range(4):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        user = uses[0].node
        if user.domain not in ("", "ai.onnx") or user.op_type not in (ops.ADD, ops.MUL):
            return None
        value = user.outputs[0]
        other = user.inputs[1 - uses[0].idx] if len(user.inputs) == 2 else None
        if user.op_type == ops.MUL and const_array(other) is None:
            # x * (...): may still be followed by * 0.5
            nxt = list(value.uses())
            if len(nxt) == 1 and nxt[0].node.op_type == ops.MUL and const_array(
                    nxt[0].node.inputs[1 - nxt[0].idx]) is not None:
                return nxt[0].node.outputs[0]
            return value
    return None


def _real_rows(x: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    """x without its padded positions when it is [batch, seq, ...] under the feed's attention_mask."""
    mask = feed.get("attention_mask")
    if mask is not None and x.ndim >= 3 and x.shape[:2] == np.shape(mask):
        return x[np.asarray(mask) != 0]
    return x


class ValueProbe:
    """One ORT session over the model that also returns the named intermediate tensors, for
    calibration sweeps over the same feeds more than once."""

    def __init__(self, model: ir.Model, names: Sequence[str]) -> None:
        from graphc.core.session import make_session

        with _inline(model) as proto:
            existing = {o.name for o in proto.graph.output}
            for name in names:
                if name not in existing:
                    proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
            self.session = make_session(proto, what="model during calibration")
        self.names = list(names)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.names, {k: v for k, v in feed.items() if k in self._inputs})
        return dict(zip(self.names, outs))


class _inline:
    """``with _inline(model) as proto``: the model as a self-contained ModelProto."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model

    def __enter__(self) -> onnx.ModelProto:
        from graphc.core.io import inline_external_data, max_ir_version

        with inline_external_data(self.model):
            proto = ir.serde.serialize_model(self.model)
        proto.ir_version = min(proto.ir_version, max_ir_version())
        return proto

    def __exit__(self, *exc: object) -> None:
        return None

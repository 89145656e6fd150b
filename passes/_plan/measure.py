"""Measured output error of each planner action applied alone, on calibration data.

Every action is simulated by swapping constants (the weights of the priced linear layers and
tables are graph inputs, as in ``_sensitivity``), each run from the first cut of the model that
reads them (``_cut_evaluator``, as ``mixed-precision``'s probes: the float model's values kept
at each cut; one session over the whole model where it does not cut into enough segments):

- pruning heads of a block (or neurons of an FFN) with the least-squares correction is exactly
  a new output-projection (down-projection) weight whose rows of the removed units are zero and
  whose other rows are refitted, plus a bias shift: the removed heads' Q, K, V columns then
  contribute nothing. The bias shift goes through a zero ``Add`` inserted after that projection
  in the measuring copy only, so it works wherever the model keeps the bias (an ``Add``,
  SkipLayerNormalization, BiasGelu) or has none. The kept units and the refit are
  ``_prune.plan_layer``'s, on the same calibration tokens the pruning passes use;
- factorizing is the product A·B of ``_lowrank``'s whitened factors (SVD-LLM), at the rank the
  kept ratio gives;
- int8 is the weight rounded to symmetric per-output-channel int8 (tables: per row) and back;
  4-bit tables are blocked along the hidden size (``quantize-gather-block``; ``gptq`` → ``mse``,
  a lookup has no Hessian).
  The dynamic activation quantization of ``quantize-int8`` is not simulated (its error shows in
  the measured error after the plan);
- int4 is the weight quantized as ``quantize-nbits`` will (``_blockquant``: W^T blocked along K,
  the plan's block size, symmetry and quantizer, float16 scales; ``gptq`` on the Hessian of the
  layer's input over the calibration tokens, as the pass computes it) and dequantized. With
  ``accuracy_level=4`` MatMulNBits also quantizes activations; not simulated either.

The error is the one ``mixed-precision`` uses: the mean over output rows (padding left out) of
1 - cosine against the original model.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError
from graphc.core.session import make_session
from graphc.passes import _blockquant as bq
from graphc.passes import _cut_evaluator
from graphc.passes import _lowrank as lr
from graphc.passes import _prune
from graphc.passes import _probes
from graphc.passes import _sensitivity as sens
from graphc.passes._plan.units import Unit, Units
from graphc.passes._quant import constant, symmetric_int8


def measure_all(probe: Probe, units: Units, executor, report) -> tuple[dict[str, list[float]], list[dict]]:
    """Every unit's actions (levels above 0), each applied alone: errors[unit key] (0.0 first, for
    level 0) and one row per action. The replacements are computed here in turn; their output
    errors go through ``executor`` (``graphc.core.executor``: Ray workers when the run has them, fed as
    the replacements are computed) and are reduced in unit order, so the plan does not depend
    on where they ran. ``report(what, done, total)`` as results come back."""
    import uuid

    jobs = [(unit, level) for unit in units.units for level in range(1, len(unit.levels))]
    facts: list[dict] = []

    def replacements():
        for unit, level in jobs:
            replaced, f = probe.replacement(unit, level)
            facts.append(f)
            yield replaced

    what = "measurements" + (f" on {executor.workers} workers" if executor.workers > 1 else "")
    done = 0
    report(what, 0, len(jobs))

    def arrived(i: int, error: float) -> None:
        nonlocal done
        done += 1
        report(what, done, len(jobs))

    key = uuid.uuid4().hex
    shared = _probes.ProbeShared(key, probe.payload(), threads=executor.threads_per_item)
    _probes.register_local(key, probe.evaluator)
    try:
        errs = executor.map(_probes.output_error, replacements(), shared=shared, on_result=arrived,
                            labels=[f"measurement of {unit.label(level)} on {unit.key}" for unit, level in jobs])
    finally:
        _probes.forget(key)
    errors: dict[str, list[float]] = {unit.key: [0.0] for unit in units.units}
    rows = []
    for (unit, level), e, f in zip(jobs, errs, facts):
        errors[unit.key].append(e)
        rows.append({"unit": unit.key, "action": unit.label(level), "error": float(f"{e:.4g}"), **f})
    return errors, rows


# the pruning actions' refits read the inputs of every block's output projections as rows: on a
# decoder's calibration text (SmolLM2: ~50k tokens) those rows alone took 13 GB, and 21 GB at
# their concatenation. They stop at this many bytes, or at 8 rows per input channel of the widest
# value (a least-squares refit wants several times more rows than unknowns), whichever is more
ACTIVATION_BYTES = 2 << 30


def activation_rows(values) -> int:
    """Rows of calibration activations the pruning actions keep (see :data:`ACTIVATION_BYTES`)."""
    widths = [int(v.shape[-1]) if v.shape is not None and len(v.shape) and isinstance(v.shape[-1], int) else 4096
              for v in values]
    return max(8 * max(widths, default=1), ACTIVATION_BYTES // max(4 * sum(widths), 1))


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy (serialized and read back; external data inlined)."""
    from graphc.core.io import inline_external_data

    with inline_external_data(model):
        return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _add_delta(graph: ir.Graph, node: ir.Node, n: int) -> ir.Value:
    """A zero bias ``Add`` after ``node``'s output (its uses moved to the sum); its constant."""
    out = node.outputs[0]
    uses = list(out.uses())
    delta = constant(graph, f"{node.name}__plan_delta", np.zeros(n, np.float32))
    add = ir.node(ops.ADD, [out, delta], name=f"{node.name}__plan_delta_add")
    graph.insert_after(node, add)
    for user, idx in uses:
        user.replace_input_with(idx, add.outputs[0])
    if out in graph.outputs:
        graph.outputs[list(graph.outputs).index(out)] = add.outputs[0]
    return delta


def output_errors(session, feeds: Sequence[dict], reference: Sequence[list], extra: dict | None = None,
                  metric: str = "cosine") -> float:
    """Mean over every output row of every feed (padding rows, by the feed's ``attention_mask``,
    left out) of 1 - cosine against ``reference``, or with ``metric="kl"`` of the KL divergence
    of the rows' softmax from the reference's (nats; logits of a language model)."""
    outputs = sens.measured_outputs([o.name for o in session.get_outputs()], metric)
    inputs = {i.name for i in session.get_inputs()}
    errs = []
    for feed, ref in zip(feeds, reference):
        outs = session.run(outputs, {**{k: v for k, v in feed.items() if k in inputs}, **(extra or {})})
        mask = feed.get("attention_mask")
        if metric == "kl":
            errs += [sens.kl_rows(sens._rows(o, mask), sens.SoftmaxRef(sens._rows(r, mask))) for o, r in zip(outs, ref)]
        else:
            errs += [sens.row_errors(o, r, mask) for o, r in zip(outs, ref)]
    return float(np.concatenate(errs).mean()) if errs else 0.0


class Probe:
    """The measuring session and the simulated actions of :class:`Units`."""

    def __init__(self, model: ir.Model, units: Units, feeds: Sequence[dict], calibration: Sequence[dict], *,
                 pass_name: str, correct: bool = True, ridge: float = 1e-3, damp: float = 0.01,
                 metric: str = "cosine") -> None:
        self.metric = metric
        self.model, self.units, self.calibration = model, units, calibration
        self.pass_name, self.correct, self.ridge, self.damp = pass_name, correct, ridge, damp
        work = copy_model(model)
        nodes = {n.name: n for n in work.graph}
        self.deltas: dict[str, str] = {}  # linear name -> delta input name
        refit = [units.blocks[u.index].o.node.name for u in units.units if u.kind == "heads"]
        refit += [units.ffns[u.index].down.node.name for u in units.units if u.kind == "ffn"]
        for name in refit:
            self.deltas[name] = _add_delta(work.graph, nodes[name], units.linears[name].n).name
        swapped = {units.linears[n].weight.name for u in units.units for n in u.linears}
        swapped |= {t.name for t in units.tables}
        values = [work.graph.initializers[n] for n in sorted(swapped)]
        values += [work.graph.initializers[n] for n in sorted(self.deltas.values())]
        self.constants = {v.name: v.const_value.numpy() for v in values}
        self.proto = sens.weight_input_proto(work, [SimpleNamespace(value=v) for v in values])
        self.session = make_session(self.proto, what="model during sensitivity measurement")
        self.feeds = list(feeds)
        inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = sens.measured_outputs([o.name for o in self.session.get_outputs()], self.metric)
        self.inputs = [{k: v for k, v in f.items() if k in inputs} for f in self.feeds]
        self.reference = [self.session.run(self.outputs, {**f, **self.constants}) for f in self.inputs]
        # each action measured from the first cut that reads what it replaces, where the model cuts
        # (passes/_cut_evaluator.py, as mixed-precision's probes); else on the whole model
        self.evaluator = _cut_evaluator.evaluator(work, [SimpleNamespace(value=v) for v in values], self.inputs, metric)
        if isinstance(self.evaluator, _cut_evaluator.CutEvaluator):
            self.session = self.proto = None  # the whole model's session was for the reference alone
        else:
            self.evaluator = sens.Evaluator.from_payload(self._session_payload(serialized=False), session=self.session)
        self._acts: dict[str, np.ndarray] | None = None
        self._moments: dict | None = None

    def payload(self) -> dict:
        """What a worker needs to measure an action (``_probes.output_error``): the cut
        evaluator's payload where the model cuts, else the measuring session's."""
        if isinstance(self.evaluator, _cut_evaluator.CutEvaluator):
            return self.evaluator.payload()
        return self._session_payload()

    def _session_payload(self, serialized: bool = True) -> dict:
        """``sens.Evaluator.payload()`` of the whole-model measuring session (the same arithmetic
        as :func:`output_errors`)."""
        masks = [f.get("attention_mask") for f in self.feeds]
        reference = self.reference if self.metric != "kl" else [
            [sens.SoftmaxRef(sens._rows(r, mask)) for r in refs] for refs, mask in zip(self.reference, masks)]
        model = np.frombuffer(self.proto.SerializeToString(), np.uint8) if serialized else None
        return {"model": model, "metric": self.metric, "outputs": self.outputs, "weights": self.constants,
                "feeds": self.inputs, "masks": masks, "reference": reference}

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """Output error with the named constants replaced (the others as in the model)."""
        return self.evaluator.error(replaced)

    # ------------------------------------------------------------------ actions
    def replacement(self, unit: Unit, level: int) -> tuple[dict[str, np.ndarray], dict]:
        """The swapped constants of ``unit`` at ``level`` and facts about them."""
        if unit.kind in ("heads", "ffn"):
            return self._prune(unit, level)
        if unit.kind == "svd":
            return self._svd(unit, level)
        if unit.kind == "quant":
            rec = self.units.linears[unit.linears[0]]
            w = self.constants[rec.weight.name]
            if unit.bits(level) == 4:
                return {rec.weight.name: self._int4(rec, w)}, {}
            q, s = symmetric_int8(w, axis=1, scale_dtype=np.float16)
            return {rec.weight.name: q.astype(np.float32) * s.astype(np.float32)}, {}
        out = {}
        for t in self.units.tables:
            if unit.bits(level) == 4:
                spec = self.units.int4
                method = bq.Method.MSE.value if spec.method == bq.Method.GPTQ.value else spec.method
                quant = bq.quantize(self.constants[t.name], 4, spec.block_size, symmetric=spec.symmetric,
                                    method=method, scale_dtype=np.float16)
                out[t.name] = quant.dequantize()
                continue
            q, s = symmetric_int8(self.constants[t.name], axis=0, scale_dtype=np.float16)
            out[t.name] = q.astype(np.float32) * s.astype(np.float32)
        return out, {}

    def _prune(self, unit: Unit, level: int):
        if unit.kind == "heads":
            b = self.units.blocks[unit.index]
            lin, width = b.o, b.rep * b.v_head_dim
        else:
            lin, width = self.units.ffns[unit.index].down, 1
        if self._acts is None:
            values = [self.units.blocks[u.index].o.node.inputs[0] for u in self.units.units if u.kind == "heads"]
            values += [self.units.ffns[u.index].down.node.inputs[0] for u in self.units.units if u.kind == "ffn"]
            self._acts = _prune.activations(self.model, values, self.calibration, pass_name=self.pass_name,
                                            max_rows=activation_rows(values))
        x = self._acts[lin.node.inputs[0].name]
        bias = lin.bias if lin.bias is not None else np.zeros(lin.weight.shape[1], np.float32)
        y = x @ lin.weight + bias
        plan = _prune.plan_layer(x, y, lin, width, _prune.Budget(fraction=unit.levels[level]), correct=self.correct,
                                 ridge=self.ridge, min_keep=unit.min_keep)
        w = np.zeros_like(lin.weight)
        w[plan.channels] = plan.weight
        name = lin.node.name
        return ({self.units.linears[name].weight.name: w, self.deltas[name]: (plan.bias - bias).astype(np.float32)},
                {"kept": int(len(plan.keep)), "layer_relative_error": round(plan.error, 6)})

    def _moment(self, rec):
        """Input moments of a linear layer over the calibration tokens (computed once for every
        factorizable layer, and every quantizable one when int4 uses GPTQ)."""
        from graphc.core.calibrate import input_moments

        if self._moments is None:
            gptq = self.units.int4 is not None and self.units.int4.method == bq.Method.GPTQ.value
            kinds = ("svd", "quant") if gptq else ("svd",)
            recs = {u.linears[0]: self.units.linears[u.linears[0]] for u in self.units.units if u.kind in kinds}
            values = list({r.node.inputs[0].name: r.node.inputs[0] for r in recs.values()}.values())
            self._moments = input_moments(self.model, values, self.calibration, pass_name=self.pass_name)
        return self._moments.get(rec.node.inputs[0].name)

    def _int4(self, rec, w: np.ndarray) -> np.ndarray:
        """[K, N] weight through ``quantize-nbits``' 4-bit quantizer (on W^T [N, K]) and back."""
        spec = self.units.int4
        w_t = np.ascontiguousarray(np.asarray(w, np.float32).T)
        if spec.method == bq.Method.GPTQ.value:
            m = self._moment(rec)
            if m is None:
                raise PassError(f"no calibration statistics for the input of {rec.name} (int4 gptq)",
                                pass_name=self.pass_name)
            quant = bq.gptq(w_t, m.gram, 4, spec.block_size, symmetric=spec.symmetric, scale_dtype=np.float16,
                            damp=self.damp)
        else:
            quant = bq.quantize(w_t, 4, spec.block_size, symmetric=spec.symmetric, method=spec.method,
                                scale_dtype=np.float16)
        return np.ascontiguousarray(quant.dequantize().T)

    def _svd(self, unit: Unit, level: int):
        rec = self.units.linears[unit.linears[0]]
        w = self.constants[rec.weight.name].astype(np.float32)
        m = self._moment(rec)
        metric = lr.Metric.plain()
        if m is not None and m.tokens >= 2 * rec.k and np.isfinite(m.gram).all():
            metric = lr.Metric.whitened(m.gram, self.damp)
        rank = lr.ratio_rank(rec.k, rec.n, unit.levels[level])
        f = lr.factorize(w, metric, rank=max(rank, 1))
        return {rec.weight.name: (f.a @ f.b).astype(np.float32)}, {"rank": f.rank,
                                                                   "whitened": metric.kind is lr.Method.WHITENED}

"""The compression planner: per layer, how much to prune, factorize and quantize, chosen from
measured sensitivities to an error budget and size / latency targets.

1. Units (``_plan.units``): each attention block's heads and each FFN's neurons (prune 25% /
   50%, with the least-squares correction of ``prune-heads`` / ``prune-ffn``), each linear layer
   (whitened SVD keeping 80% / 60% of its parameters; int8 weights, or with ``int4`` 4-bit
   block-wise weights: float, int8 or int4, one per layer) and the embedding tables (int8; with
   ``int4`` also 4-bit, GatherBlockQuantized, all tables together).
   ``head_fractions``, ``ffn_fractions``, ``svd_ratios``, ``int8``, ``int4`` (``int4_block``,
   ``int4_method``, ``int4_symmetric``), ``embeddings`` set them.
2. Sensitivity (``_plan.measure``): the output error of every action applied alone on the first
   ``feeds`` calibration feeds (mean over output rows of 1 - cosine against the original, as
   ``mixed-precision`` measures it), one ONNX Runtime session with the weights as inputs.
3. Choice (``_plan.search``): errors are assumed to add; greedy by least added error per cost
   saved, within ``max_error`` and until ``max_bytes`` / ``max_params`` / ``max_flops`` are met.
   Bytes, parameters and MACs of a plan are computed from shapes.
4. Application, on a copy, by the existing passes: ``prune-heads`` and ``prune-ffn`` with
   per-layer ``fractions`` (sequential refits), ``svd-linear`` (whitened, ``rank_rule=ratio``,
   ``only`` the chosen layers), ``quantize-nbits`` on the int4 layers (MatMulNBits, 4 bits,
   ``int4_block``/``int4_method``/``int4_symmetric``, float16 scales, ``accuracy_level`` 4), then
   ``quantize-int8`` (the int8 recipe's options) on the int8 layers, each pass given only its
   layers (the others renamed out of its way for the call), and ``quantize-embedding`` (int8
   tables) or ``quantize-gather-block`` (int4 tables, block ``int4_block``; ``gptq`` → ``mse``).
   A factorized layer's two factors take the layer's precision.
5. Check: the error is measured again on the same feeds with everything applied, the bytes and
   parameters of the result are counted and its MACs recounted. Where the measured error
   exceeds ``max_error`` (the errors did not add: pruned layers interact, int8's dynamic
   activation quantization is not in the prediction) every predicted error is scaled by
   measured / predicted, and where bytes, parameters or MACs exceed a target that target is
   lowered by the excess; then it plans again, at most ``rounds`` times. A budget still missed
   after that, or targets no plan reaches within the error budget, raise a
   :class:`~graphc.core.errors.PassError` that says what the planner could reach.

So the guarantee is on the calibration feeds the errors are measured on: measured error ≤
``max_error`` and bytes ≤ ``max_bytes`` (initializer bytes after this pass; the recipe's later
passes only shrink them). Held-out data (validation) may differ.

Stats: ``stats.details["plan"]``: budgets, every measured action (``sensitivities``), the
decisions per unit, the greedy steps, and each round's predicted vs measured error, bytes and
MACs. MACs are per token at ``seq`` keys (the latency proxy): int8 and int4 change bytes, not
MACs (nor is their speed in the plan: ORT's MatMulNBits is not faster than dynamic int8 on every
CPU and batch).
``metric="kl"`` measures the mean KL divergence of the output rows' softmax instead (logits of a
causal LM); ``max_ppl_rise`` (e.g. 0.05) is that with ``max_error = ln(1 + rise)``: the mean KL
is, to first order, the rise of the log-perplexity on text like the calibration text (the
perplexity itself is not measured by the pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, UnsupportedError
from graphc.core.executor import resolve as resolve_executor
from graphc.core.manager import SizeFacts
from graphc.core.pass_base import GraphcPass, PassResult, PassStats, choice
from graphc.passes import _blockquant as bq
from graphc.passes._plan import measure as pm
from graphc.passes._plan import search as ps
from graphc.passes import _sensitivity as sens
from graphc.passes._plan.units import Int4, Units, cost_text, graph_macs, layer_name
from graphc.core.registry import register

_ORIGINAL = "graphc.plan.original"  # temporary node tag: "none" = the node had no pass mark before
_FLOAT = "graphc-plan-float:"  # temporary name prefix of layers a quantizing pass must leave alone
INT8_OPTIONS = {"outlier_ratio": 4.0, "outlier_channels": 4, "smooth_min_factor": 2.5, "scale_dtype": "float16"}


@dataclass(frozen=True)
class PlanOptions:
    max_error: float = 0.0  # mean 1 - cosine (metric="kl": mean KL, nats) of output rows on the calibration feeds; 0 = none
    max_ppl_rise: float = 0.0  # causal LMs: relative perplexity rise, e.g. 0.05 (metric kl, max_error = ln(1 + rise))
    metric: str = "cosine"  # "cosine" (1 - cosine of output rows) or "kl" (KL of the rows' softmax: logits)
    max_bytes: int = 0  # initializer bytes after this pass; 0 = none
    max_params: int = 0  # initializer elements after this pass; 0 = none
    max_flops: float = 0.0  # MACs per token relative to the original, in (0, 1]; 0 = none
    head_fractions: tuple[float, ...] = (0.25, 0.5)  # fractions of heads a block may lose
    ffn_fractions: tuple[float, ...] = (0.25, 0.5)  # fractions of neurons an FFN may lose
    svd_ratios: tuple[float, ...] = (0.8, 0.6)  # parameter ratios a factorized layer may keep
    int8: bool = True  # linear layers may become int8
    int4: bool = False  # linear layers may become 4-bit block-wise (MatMulNBits); a layer is int8 or int4
    int4_block: int = 32  # int4 block size along K: 16, 32, 64, 128 or 256
    int4_method: str = "mse"  # int4 quantizer: rtn, mse, hqq, gptq (gptq: calibration Hessians)
    int4_symmetric: bool = False  # int4 without zero points
    embeddings: bool = True  # embedding tables may become int8 (with int4: or 4-bit)
    seq: int = 128  # keys per query in the attention MACs of the latency proxy
    feeds: int = 2  # calibration feeds the errors are measured on
    rounds: int = 3  # plan → apply → measure rounds at most
    correct: bool = True  # pruning refits the next layer (STAT)
    ridge: float = 1e-3
    min_keep: int = 1  # heads (KV groups) or neurons a block keeps


@register
class PlanCompression(GraphcPass):
    name = "plan"
    summary = ("choose per layer how much to prune (heads, FFN neurons), factorize (SVD) and quantize (int8, or "
               "int4 with int4=true) from measured sensitivities, to an error budget and size / MAC targets; "
               "applies and checks it")
    Options = PlanOptions
    calibration_texts = 256
    uses_executor = True  # the action measurements, one work item an action

    @property
    def needs_calibration(self) -> bool:
        o = self.options
        return bool(o.max_error or o.max_bytes or o.max_params or o.max_flops or o.max_ppl_rise)

    def _validate(self) -> ps.Budgets | None:
        o = self.options
        if o.metric not in sens.METRICS:
            raise UnsupportedError(f"metric={o.metric!r}; supported: {', '.join(sens.METRICS)}", pass_name=self.name)
        if o.max_ppl_rise and o.max_error:
            raise UnsupportedError("give max_error or max_ppl_rise, not both", pass_name=self.name)
        for name in ("max_error", "max_bytes", "max_params", "max_flops", "max_ppl_rise"):
            if getattr(o, name) < 0:
                raise UnsupportedError(f"{name}={getattr(o, name)} is negative (0 = unset)", pass_name=self.name)
        if o.max_error >= 1 and self._metric() == "cosine":
            raise UnsupportedError(f"max_error={o.max_error} is not below 1 (it is 1 - cosine)", pass_name=self.name)
        if o.max_flops > 1:
            raise UnsupportedError(f"max_flops={o.max_flops} is a fraction of the original MACs, in (0, 1]",
                                   pass_name=self.name)
        for name, lo, hi in (("head_fractions", 0, 1), ("ffn_fractions", 0, 1), ("svd_ratios", 0, 1)):
            vals = getattr(o, name)
            if any(not lo < v < hi for v in vals) or list(vals) != sorted(vals, reverse=name == "svd_ratios"):
                raise UnsupportedError(f"{name}={list(vals)}: values in ({lo}, {hi}), from mildest to strongest",
                                       pass_name=self.name)
        method = choice(bq.Method, o.int4_method, "int4_method", self.name)
        if o.int4_block not in bq.BLOCK_SIZES:
            raise UnsupportedError(f"int4_block={o.int4_block}; supported: {', '.join(map(str, bq.BLOCK_SIZES))}",
                                   pass_name=self.name)
        if method is bq.Method.HQQ and o.int4_symmetric:
            raise UnsupportedError("int4_method='hqq' optimises zero points: needs int4_symmetric=false; "
                                   "supported with int4_symmetric=true: rtn, mse, gptq", pass_name=self.name)
        if o.feeds < 1 or o.rounds < 1 or o.seq < 1:
            raise UnsupportedError("feeds, rounds and seq must be ≥ 1", pass_name=self.name)
        if not self.needs_calibration:
            return None
        max_error = float(np.log1p(o.max_ppl_rise)) if o.max_ppl_rise else o.max_error
        return ps.Budgets(max_error or None, o.max_bytes or None, o.max_params or None, None)

    def _metric(self) -> str:
        return "kl" if self.options.max_ppl_rise else self.options.metric

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        for node in model.graph.all_nodes():  # nodes of the accepted copy that were there before
            if node.metadata_props.pop(_ORIGINAL, None) == "none":
                node.metadata_props.pop(ops.META_PASS, None)
        return result

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        budgets = self._validate()
        o = self.options
        if budgets is None:
            stats.notes.append("nothing requested (give max_error, max_ppl_rise, max_bytes, max_params or max_flops)")
            return False
        calibration = list(self.context.calibration or [])
        if not calibration:
            raise PassError("needs calibration data (each action's output error is measured on it), and none was "
                            "given: use a model exported by graphc (its recipe's texts) or pass calibration feeds",
                            pass_name=self.name)
        feeds = calibration[: o.feeds]
        units = Units(model, head_levels=o.head_fractions, ffn_levels=o.ffn_fractions, svd_levels=o.svd_ratios,
                      int8=o.int8, embeddings=o.embeddings, seq=o.seq, min_keep=o.min_keep,
                      correct=o.correct, int4=self._int4(), int8_form=self.context.target_info().matmul_form.value)
        for what, why in units.skipped:
            stats.skip(what, why)
        if not units.units:
            stats.notes.append("nothing to plan: no attention block, FFN, linear layer or table found")
            return False
        original = units.cost({})
        if o.max_flops:
            budgets = ps.Budgets(budgets.max_error, budgets.max_bytes, budgets.max_params,
                                 int(np.floor(o.max_flops * original.macs)))
        start = time.perf_counter()
        probe = pm.Probe(model, units, feeds, calibration, pass_name=self.name, correct=o.correct, ridge=o.ridge,
                         metric=self._metric())
        errors, sensitivities = pm.measure_all(probe, units, resolve_executor(self.context.executor),
                                               self.context.report)
        factors = self._quant_factors(model, units, errors, probe)
        stats.counts["measurement_runs"] = len(sensitivities)
        stats.counts["measure_s"] = round(time.perf_counter() - start, 1)

        for node in model.graph.all_nodes():
            node.metadata_props[_ORIGINAL] = "kept" if ops.META_PASS in node.metadata_props else "none"
        try:
            accepted, plan, rounds = self._rounds(model, units, errors, budgets, probe, stats)
        finally:
            for node in model.graph.all_nodes():
                node.metadata_props.pop(_ORIGINAL, None)
        details = self._details(units, errors, budgets, original, plan, rounds, sensitivities, len(feeds))
        details["int8_factor"] = factors.get(8)
        if o.int4:
            details["int4_factor"] = factors.get(4)
        stats.details["plan"] = details
        last = rounds[-1]
        stats.counts.update({
            "units": len(units.units), "actions": len(details["decisions"]), "rounds": len(rounds),
            "predicted_error": last["predicted_error"], "measured_error": last["measured_error"],
            "predicted_bytes": last["predicted"]["bytes"], "measured_bytes": last["measured"]["bytes"],
            "predicted_macs": last["predicted"]["macs"], "measured_macs": last["measured"]["macs"],
            "original_macs": original.macs,
        })
        if accepted is None:
            stats.notes.append("the plan chose no action")
            return False
        model.graph = accepted.graph
        model.metadata_props.update(accepted.metadata_props)
        return True

    # ------------------------------------------------------------------ steps
    def _int4(self) -> Int4 | None:
        o = self.options
        return Int4(o.int4_block, o.int4_symmetric, o.int4_method) if o.int4 else None

    def _quant_factors(self, model: ir.Model, units: Units, errors: dict[str, list[float]],
                       probe: pm.Probe) -> dict[int, float | None]:
        """int8's error is measured with weights rounded only; ``quantize-int8`` also quantizes
        activations at run time (and MatMulNBits at ``accuracy_level`` 4 too). Per precision,
        every layer that can take it at once through the pass itself gives the real total:
        each layer's predicted error at that precision is scaled by real / sum of the alone
        ones (where larger); returns those factors (bits → factor, None: nothing to scale)."""
        factors: dict[int, float | None] = {}
        for bits in (8, 4):
            at = {u.linears[0]: (u.key, u.levels.index(float(bits))) for u in units.units
                  if u.kind == "quant" and float(bits) in u.levels}
            alone = sum(errors[key][level] for key, level in at.values())
            if not at or alone <= 0:
                factors[bits] = None
                continue
            work = pm.copy_model(model)
            (self._quantize_int8 if bits == 8 else self._quantize_int4)(work, set(at), [])
            real = pm.output_errors(_session(work), probe.feeds, probe.reference, metric=probe.metric)
            factor = max(real / alone, 1.0)
            for key, level in at.values():
                errors[key][level] *= factor
            factors[bits] = round(factor, 4)
        return factors

    def _only(self, work: ir.Model, chosen: set[str], pass_cls, options: dict, sub: list[dict]) -> None:
        """``pass_cls`` with ``options`` on the named MatMuls only: the others are renamed out of
        its way (its ``exclude``) for the call."""
        linear = [n for n in work.graph.all_nodes() if n.op_type in (ops.MATMUL, ops.GEMM)]
        if not any(n.name in chosen for n in linear):
            return
        renamed = [(n, n.name) for n in linear if n.name not in chosen]
        for node, name in renamed:
            node.name = f"{_FLOAT}{name}"
        options = {**options, "exclude": (_FLOAT,)}
        try:
            result = pass_cls.from_dict(options, self.context)(work)
        finally:
            for node, name in renamed:
                node.name = name
        sub.append({"pass": pass_cls.name, "options": {**options, "exclude": [_FLOAT]},
                    "modified": result.modified, "counts": dict(result.stats.counts)})

    def _quantize_int8(self, work: ir.Model, names: set[str], sub: list[dict]) -> None:
        """``quantize-int8`` (the int8 recipe's options) on the named MatMuls (and their factors)
        only."""
        from graphc.passes.quantize_int8 import QuantizeInt8

        # a factorized layer's second factor reads the first's output; it goes in a second call
        # (written around a quantize-int8 defect since fixed; the result is the same either way)
        for chosen in ((names | {f"{n}_svd_a" for n in names}), {f"{n}_svd_b" for n in names}):
            self._only(work, chosen, QuantizeInt8, INT8_OPTIONS, sub)

    def _quantize_int4(self, work: ir.Model, names: set[str], sub: list[dict]) -> None:
        """``quantize-nbits`` at 4 bits (the plan's block, quantizer, symmetry; float16 scales) on
        the named MatMuls (and both factors of a factorized one) only."""
        from graphc.passes.quantize_nbits import QuantizeNBits

        o = self.options
        chosen = names | {f"{n}_svd_{f}" for n in names for f in "ab"}
        options = {"bits": 4, "block_size": o.int4_block, "symmetric": o.int4_symmetric, "method": o.int4_method,
                   "scale_dtype": "float16"}
        self._only(work, chosen, QuantizeNBits, options, sub)

    def _rounds(self, model, units, errors, budgets, probe, stats):
        o = self.options
        scale = 1.0
        round_budgets = budgets
        rounds: list[dict] = []
        for r in range(o.rounds):
            scaled = {k: [e * scale for e in v] for k, v in errors.items()}
            try:
                plan = ps.search(units, scaled, round_budgets)
            except ps.Infeasible as e:
                raise PassError(self._infeasible(units, errors, budgets, e, r), pass_name=self.name) from None
            chosen = {k: v for k, v in plan.state.items() if v}
            if not chosen:
                rounds.append({"round": r + 1, "scale": round(scale, 4), "predicted_error": 0.0, "measured_error": 0.0,
                               "predicted": plan.cost.as_dict(), "measured": units.cost({}).as_dict(), "met": True})
                return None, plan, rounds
            work, macs, sub = self._apply(model, units, plan)
            size = SizeFacts.of(work)
            measured_error = pm.output_errors(_session(work), probe.feeds, probe.reference, metric=probe.metric)
            measured = {"bytes": size.bytes, "params": size.params, "macs": macs}
            met = {
                "error": budgets.max_error is None or measured_error <= budgets.max_error,
                **{m: measured[m] <= v for m, v in budgets.targets().items()},
            }
            rounds.append({"round": r + 1, "scale": round(scale, 4), "predicted_error": float(f"{plan.error:.4g}"),
                           "measured_error": float(f"{measured_error:.4g}"), "predicted": plan.cost.as_dict(),
                           "measured": measured, "met": all(met.values()), "passes": sub, "steps": plan.steps})
            if all(met.values()):
                return work, plan, rounds
            if not met["error"] and plan.error > 0:
                scale *= measured_error / (plan.error / scale)
            lowered = {}
            for m, v in round_budgets.targets().items():
                excess = measured[m] - getattr(plan.cost, m)
                lowered[m] = v - max(excess, 0) if not met.get(m, True) else v
            round_budgets = ps.Budgets(budgets.max_error, lowered.get("bytes"), lowered.get("params"),
                                       lowered.get("macs"))
        last = rounds[-1]
        missed = ", ".join(
            [f"measured error {last['measured_error']:.4g} > max_error {budgets.max_error:g}"]
            * (budgets.max_error is not None and last["measured_error"] > budgets.max_error)
            + [f"{m} {last['measured'][m]:,} > {v:,}" for m, v in budgets.targets().items() if last["measured"][m] > v])
        raise PassError(f"budget missed after {o.rounds} plan rounds ({missed}; predicted error "
                        f"{last['predicted_error']:.4g}): the errors of the chosen actions do not add up as assumed; "
                        "raise rounds or loosen the budget", pass_name=self.name)

    def _infeasible(self, units, errors, budgets, e: ps.Infeasible, round_index: int) -> str:
        reach = ps.most_compressed(units, errors)
        asked = ", ".join(f"max_{m}={v:,}" if m != "macs" else f"max_flops={self.options.max_flops:g} "
                          f"({v:,} MACs/token)" for m, v in budgets.targets().items())
        within = (f"within max_error={budgets.max_error:g} the planner reaches {cost_text(e.reach.cost, units)} "
                  f"(predicted error {e.reach.error:.4g}); " if budgets.max_error is not None else "")
        again = f" (after {round_index} correction rounds)" if round_index else ""
        return (f"budget cannot be met{again}: {asked}; {within}every action together reaches "
                f"{cost_text(reach.cost, units)} at predicted error {reach.error:.4g}")

    def _apply(self, model: ir.Model, units: Units, plan: ps.Plan) -> tuple[ir.Model, int, list[dict]]:
        from graphc.passes.prune_ffn import PruneFfn
        from graphc.passes.prune_heads import PruneHeads
        from graphc.passes.quantize_embedding import QuantizeEmbedding
        from graphc.passes.quantize_gather_block import QuantizeGatherBlock
        from graphc.passes.svd_linear import SvdLinear

        o = self.options
        work = pm.copy_model(model)
        state = plan.state
        sub: list[dict] = []

        def run(pass_cls, options: dict) -> None:
            result = pass_cls.from_dict(options, self.context)(work)
            sub.append({"pass": pass_cls.name, "options": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in options.items()},
                        "modified": result.modified, "counts": dict(result.stats.counts)})

        common = {"correct": o.correct, "ridge": o.ridge, "min_keep": o.min_keep}
        heads = [0.0] * len(units.blocks)
        ffns = [0.0] * len(units.ffns)
        for u in units.units:
            if u.kind == "heads" and state.get(u.key):
                heads[u.index] = u.levels[state[u.key]]
            elif u.kind == "ffn" and state.get(u.key):
                ffns[u.index] = u.levels[state[u.key]]
        if any(heads):
            run(PruneHeads, {"fractions": tuple(heads), **common})
        if any(ffns):
            run(PruneFfn, {"fractions": tuple(ffns), **common})
        by_ratio: dict[float, list[str]] = {}
        for u in units.units:
            if u.kind == "svd" and state.get(u.key):
                by_ratio.setdefault(u.levels[state[u.key]], []).append(u.linears[0])
        for ratio, names in sorted(by_ratio.items(), reverse=True):
            run(SvdLinear, {"method": "whitened", "rank_rule": "ratio", "param_ratio": ratio, "only": tuple(names),
                            "min_elements": 0})
        macs = graph_macs(work, o.seq)
        bits = {u.linears[0]: u.bits(state.get(u.key, 0)) for u in units.units if u.kind == "quant"}
        q4 = {n for n, b in bits.items() if b == 4}
        q8 = {n for n, b in bits.items() if b == 8}
        if q4:
            self._quantize_int4(work, q4, sub)
        if q8:
            self._quantize_int8(work, q8, sub)
        tables = units.by_key.get("embeddings")
        table_bits = tables.bits(state.get(tables.key, 0)) if tables is not None else 32
        if table_bits == 8:
            run(QuantizeEmbedding, {"scale_dtype": "float16"})
        elif table_bits == 4:
            method = bq.Method.MSE.value if o.int4_method == bq.Method.GPTQ.value else o.int4_method
            # share_tied off: the plan prices every table on its own
            run(QuantizeGatherBlock, {"bits": 4, "block_size": o.int4_block, "symmetric": o.int4_symmetric,
                                      "method": method, "scale_dtype": "float16", "share_tied": False})
        return work, macs, sub

    def _details(self, units, errors, budgets, original, plan, rounds, sensitivities, n_feeds) -> dict:
        decisions = []
        for u in units.units:
            level = plan.state.get(u.key, 0)
            if not level:
                continue
            decisions.append({"unit": u.key, "kind": u.kind_at(level), "layer": layer_name(units, u),
                              "action": u.label(level),
                              "predicted_error": float(f"{errors[u.key][level]:.4g}")})
        return {
            "budgets": {"max_error": budgets.max_error, "max_bytes": budgets.max_bytes,
                        "max_params": budgets.max_params, "max_flops": self.options.max_flops or None,
                        "max_ppl_rise": self.options.max_ppl_rise or None,
                        "max_macs": budgets.max_macs},
            "metric": (f"mean over output rows of {'KL divergence of the softmax (nats)' if self._metric() == 'kl' else '1 - cosine'}"
                       f" vs the original, on {n_feeds} calibration feeds"),
            "additivity": "predicted error = sum of the errors of the chosen actions, each measured alone; "
                          "checked by measuring the result, re-planned with errors scaled by measured/predicted",
            "original": original.as_dict(),
            "decisions": decisions,
            "rounds": rounds,
            "sensitivities": sensitivities,
        }


def _session(model: ir.Model):
    from graphc.core.session import make_session

    return make_session(model, what="model after the plan")

"""Low-rank factorization of constant-weight linear layers: ``MatMul(x, W)`` → ``MatMul(MatMul(x,
A), B)`` with W [K, N] ≈ A [K, r] · B [r, N]; a Gemm becomes ``Gemm(x, A)`` → ``Gemm(h, B, C)``
(its bias, alpha and beta kept). Math in ``_lowrank``.

A layer is factorized only where it lowers cost: r (K + N) < K N, i.e. r below the break-even
rank K N / (K + N), and by at least ``min_saving`` of the layer's parameters under the error
rule. The rank per layer comes from ``rank_rule``:

- ``error`` (default): the smallest rank whose relative Frobenius error is at most
  ``max_error``, measured in the method's metric: with ``method="whitened"`` that is the error
  of the layer's output on the calibration activations, ``||X W - X A B|| / ||X W||``; with
  ``plain``, the weight's own error (the output error for white inputs).
- ``ratio``: the rank that keeps ``param_ratio`` of each layer's parameters (SVD-LLM's uniform
  compression ratio: ``param_ratio=0.8`` removes 20% of every factorized layer).

Methods (``method``): ``plain`` truncated SVD; ``whitened`` (default, SVD-LLM): whiten with the
Cholesky factor of the input's second moment from calibration data, truncate, unwhiten; ``asvd``
(ASVD): scale input channels by their mean |x|^``asvd_alpha`` before the SVD. A layer whose
input had fewer than ``min_tokens_per_channel`` calibration tokens per input channel falls back
to plain SVD, counted in the stats: its second moment would be singular or nearly so, and the
fit would follow the few tokens seen (on random graphs with 32 channels and 64 tokens, the
output cosine was 0.9987 on the calibration feeds and 0.980 on others).

The factors are plain float32 initializers, so ``quantize-int8`` and ``quantize-nbits`` can
quantize them afterwards. The MatMul whose output is a graph output, directly or through a
bias ``Add`` (an LM head, often tied to the embedding table), is left alone unless
``include_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, choice, copy_scope
from graphc.passes import _lowrank as lr
from graphc.passes._quant import constant, drop_unused_initializers, gemm_weight, weight_problem
from graphc.passes._weights import constant_weight, node_candidates
from graphc.core.registry import register


@dataclass(frozen=True)
class SvdLinearOptions:
    method: str = lr.Method.WHITENED.value
    rank_rule: str = lr.RankRule.ERROR.value
    max_error: float = 0.05  # rank_rule="error": relative Frobenius error per layer, in (0, 1)
    param_ratio: float = 0.8  # rank_rule="ratio": fraction of each layer's parameters kept, in (0, 1)
    min_saving: float = 0.1  # rank_rule="error": factorize only if it removes >= this fraction
    min_elements: int = 1024  # smaller weights are left alone
    include_head: bool = False  # also factorize MatMuls that produce a graph output (LM head)
    exclude: tuple[str, ...] = ()  # substrings of node names or scopes to leave alone
    only: tuple[str, ...] = ()  # exact node names to factorize, the others left alone (empty: all)
    damp: float = 0.01  # whitened: added to the second moment's diagonal, x its mean
    asvd_alpha: float = 0.5  # asvd: channel scale = mean|x|^alpha
    min_tokens_per_channel: float = 2.0  # whitened/asvd: fewer calibration tokens per input channel: plain SVD


@dataclass
class _Candidate:
    node: ir.Node
    weight: np.ndarray  # [K, N] float32, transposes and alpha applied
    bias: np.ndarray | None  # [N] float32 (Gemm C * beta)
    key: int  # identity of the stored weight


@register
class SvdLinear(GraphcPass):
    name = "svd-linear"
    summary = "low-rank (SVD) factorization of MatMul/Gemm weights: plain, activation-aware (SVD-LLM) or ASVD"
    Options = SvdLinearOptions

    @property
    def needs_calibration(self) -> bool:
        return self.options.method != lr.Method.PLAIN.value

    @property
    def calibration_texts(self) -> int:
        return 64 if self.needs_calibration else 0

    def _validate(self) -> tuple[lr.Method, lr.RankRule]:
        o = self.options
        method = choice(lr.Method, o.method, "method", self.name)
        rule = choice(lr.RankRule, o.rank_rule, "rank_rule", self.name)
        lr.check_budget(rule, o.max_error, o.param_ratio, o.min_saving, self.name)
        if o.damp < 0 or o.asvd_alpha < 0:
            raise UnsupportedError("damp and asvd_alpha must be >= 0", pass_name=self.name)
        return method, rule

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        method, rule = self._validate()
        graph = model.graph
        cands = node_candidates(graph, self._candidate, stats, "no constant-weight MatMul/Gemm to factorize")
        if not cands:
            return False
        moments = self._moments(model, cands, stats) if method is not lr.Method.PLAIN else {}
        producers = [c.node.inputs[1].producer() for c in cands]
        done: dict[tuple, lr.Factors | str] = {}
        stored: dict[tuple, tuple[ir.Value, ir.Value]] = {}  # one weight read with one input: factors stored once
        errors: list[float] = []
        for i, cand in enumerate(cands):
            self.context.report(self.name, i, len(cands))
            label = cand.node.name or cand.node.op_type
            k, n = cand.weight.shape
            stats.add("linear_params", k * n)
            x_name = cand.node.inputs[0].name
            key = (cand.key, x_name if method is not lr.Method.PLAIN else None)
            if key not in done:
                done[key] = self._factorize(cand, method, rule, moments.get(x_name), stats)
            factors = done[key]
            if isinstance(factors, str):
                stats.skip(label, factors)
                continue
            errors.append(factors.error)
            if key not in stored:
                base = cand.node.inputs[1].name or cand.node.name or "w"
                stored[key] = constant(graph, f"{base}_svd_a", factors.a), constant(graph, f"{base}_svd_b", factors.b)
            new = self._emit(graph, cand, *stored[key])
            for node in new:
                copy_scope(cand.node, node)
            ir.convenience.replace_nodes_and_values(graph, cand.node, [cand.node], new, cand.node.outputs,
                                                    [new[-1].outputs[0]])
            stats.add("layers_factorized")
            stats.add("params_removed", k * n - factors.rank * (k + n))
        if not errors:
            return False
        stats.counts["mean_rel_error"] = round(float(np.mean(errors)), 6)
        stats.counts["max_rel_error"] = round(float(np.max(errors)), 6)
        stats.counts["fraction_removed"] = round(stats.counts["params_removed"] / stats.counts["linear_params"], 6)
        for producer in {id(p): p for p in producers if p is not None}.values():
            if (producer.graph is graph and producer.op_type in ("Transpose", ops.CAST)
                    and not any(o.uses() or o in graph.outputs for o in producer.outputs)):
                graph.remove(producer, safe=True)
        drop_unused_initializers(graph)
        return True

    # ------------------------------------------------------------------ rank and factors
    def _factorize(self, cand: _Candidate, method: lr.Method, rule: lr.RankRule, moments, stats: PassStats):
        """Factors, or the reason (a string) the layer is left alone."""
        o = self.options
        k, n = cand.weight.shape
        even = lr.break_even_rank(k, n)
        if not np.isfinite(cand.weight).all():
            return "weight holds non-finite values"
        if rule is lr.RankRule.RATIO:
            rank = lr.ratio_rank(k, n, o.param_ratio)
            if rank < 1:
                return f"[{k}, {n}] weight: param_ratio={o.param_ratio} leaves rank 0"
        metric = lr.Metric.plain()
        if method is not lr.Method.PLAIN:
            need = int(np.ceil(o.min_tokens_per_channel * k))
            if moments is None or moments.tokens < need:
                stats.add("plain_fallbacks")
                got = 0 if moments is None else moments.tokens
                stats.notes.append(f"{cand.node.name or cand.node.op_type}: {got} calibration tokens < {need} "
                                   f"({o.min_tokens_per_channel} per input channel): plain SVD")
            elif not (np.isfinite(moments.gram).all() and np.isfinite(moments.abs_mean).all()):
                stats.add("plain_fallbacks")
                stats.notes.append(f"{cand.node.name or cand.node.op_type}: non-finite calibration activations: plain SVD")
            elif method is lr.Method.WHITENED:
                metric = lr.Metric.whitened(moments.gram, o.damp)
            else:
                metric = lr.Metric.asvd(moments.abs_mean, o.asvd_alpha)
        decomposition = lr.svd(metric.apply(cand.weight))
        if rule is lr.RankRule.ERROR:
            rank = lr.error_rank(decomposition[1], o.max_error)
            limit = int(np.floor((1.0 - o.min_saving) * k * n / (k + n)))
            if rank > min(even, limit):
                return (f"rank {rank} needed for max_error={o.max_error} is not below "
                        f"{'break-even rank ' + str(even) if rank > even else f'{limit} (min_saving={o.min_saving})'}"
                        f" of the [{k}, {n}] weight")
        return lr.factorize(cand.weight, metric, rank=rank, decomposition=decomposition)

    def _moments(self, model: ir.Model, cands: list[_Candidate], stats: PassStats) -> dict:
        from graphc.core.calibrate import input_moments

        if not self.context.calibration:
            raise PassError(
                f"method={self.options.method!r} needs calibration data (the layers' input activations), and none "
                "was given: use a model exported by graphc (its recipe's texts), pass calibration feeds in the "
                "PassContext, or method='plain'",
                pass_name=self.name,
            )
        values = [c.node.inputs[0] for c in cands if c.node.inputs[0].name]
        found = input_moments(model, values, self.context.calibration, pass_name=self.name)
        stats.notes.append(f"{self.options.method} SVD calibrated on {len(self.context.calibration)} batches "
                           f"({self.context.calibration_source}), {max((m.tokens for m in found.values()), default=0)} "
                           "tokens")
        return found

    # ------------------------------------------------------------------ matching
    def _candidate(self, graph: ir.Graph, node: ir.Node, stats: PassStats) -> _Candidate | None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in (ops.MATMUL, ops.GEMM):
            return None
        if len(node.inputs) < 2 or node.inputs[0] is None:
            return None
        label = node.name or node.op_type
        scope = node.metadata_props.get("graphc.scope", "")
        found = constant_weight(node.inputs[1])
        if found is None:
            return None  # activation x activation (attention scores): not a linear layer
        if self.options.only and node.name not in self.options.only:
            return None
        if any(s in label or s in scope for s in self.options.exclude):
            stats.skip(label, "excluded by option")
            return None
        w, key = found
        if w.dtype != np.float32 or w.ndim != 2:
            stats.skip(label, f"weight is {w.ndim}-D {w.dtype}, not a 2-D float32 matrix")
            return None
        for what, v in (("activation", node.inputs[0]), ("weight", node.inputs[1])):
            if v.dtype is not None and v.dtype != ir.DataType.FLOAT:
                stats.skip(label, f"{what} dtype {v.dtype} is not float32")
                return None
        if not self.options.include_head and _is_head(graph, node.outputs[0]):
            stats.skip(label, "produces a graph output (LM head; include_head=true factorizes it)")
            return None
        if (reason := weight_problem(w, self.options.min_elements)) is not None:
            stats.skip(label, reason)
            return None
        found = gemm_weight(node, w, stats, label)
        if found is None:
            return None
        return _Candidate(node, found[0], found[1], key)

    # ------------------------------------------------------------------ emitting
    @staticmethod
    def _emit(graph: ir.Graph, cand: _Candidate, a: ir.Value, b: ir.Value) -> list[ir.Node]:
        name = cand.node.name
        if cand.node.op_type == ops.GEMM:
            first = ir.node(ops.GEMM, [cand.node.inputs[0], a])
            inputs = [first.outputs[0], b]
            if cand.bias is not None:
                inputs.append(constant(graph, f"{b.name}_bias", cand.bias))
            second = ir.node(ops.GEMM, inputs)
        else:
            first = ir.node(ops.MATMUL, [cand.node.inputs[0], a])
            second = ir.node(ops.MATMUL, [first.outputs[0], b])
        if name:
            first.name, second.name = f"{name}_svd_a", f"{name}_svd_b"
        return [first, second]


def _is_head(graph: ir.Graph, value: ir.Value, hops: int = 2) -> bool:
    """Whether ``value`` is a graph output, or becomes one through at most ``hops`` bias Adds,
    Casts, Identities or Reshapes (an LM head with a bias)."""
    if value in graph.outputs:
        return True
    uses = list(value.uses())
    if hops == 0 or len(uses) != 1:
        return False
    user = uses[0][0]
    if user.domain not in ("", "ai.onnx") or user.op_type not in ("Add", ops.CAST, "Identity", "Reshape"):
        return False
    return _is_head(graph, user.outputs[0], hops - 1)

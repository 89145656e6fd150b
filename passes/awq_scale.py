"""Activation-aware channel scaling before weight-only quantization (AWQ).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(2023): a weight row (input channel) that meets large activations matters more, and scaling it
up by s before quantizing shrinks its relative rounding error; the activation is divided by s
where it is made, so the float model computes the same function. Here:

- **where the activation is made**: a normalization whose scale (and bias) is a constant
  (``SimplifiedLayerNormalization``, ``LayerNormalization``, ``Skip[Simplified]LayerNormalization``,
  or a ``Mul`` by a 1-D constant), its gamma (and beta) divided by s; or the gated product
  ``Mul(act(gate), up)`` of a SwiGLU FFN, the ``up`` MatMul's weight columns divided by s.
  The value must be read by constant-weight MatMuls only (q/k/v together, gate/up together,
  down alone), each weight stored once and read once; a MatMul that makes a graph output (an
  LM head, often tied to the embedding table) leaves its group alone.
- **s**: mean |x| per channel over the calibration tokens (padding left out) to the power
  alpha, normalized so that max(s) x min(s) = 1; alpha on a grid in [0, 1) (option
  ``coarse_step``: searched coarse to fine, every n-th alpha and then the neighbours of the best), chosen per group to minimise the output error of quantizing the scaled weights (``bits``, ``block_size``,
  ``symmetric``, ``method`` as quantize-nbits will run them) over the calibration inputs:
  E||x W - (x/s) Q(s W)||^2 = tr(D^T G D) with D = W - Q(sW)/s and G = E[x x^T], the inputs'
  second moments (no activations kept; where the calibration tokens are few next to K, through a
  thin factor of G: ``passes/_gram_factor.py``). alpha = 0 (no scaling) is on the grid, so a group is
  changed only when scaling lowers that error (by at least ``min_gain``).

The pass changes float weights only (same graph, same function up to float rounding); run it
before ``mixed-precision`` and ``quantize-nbits`` (whose GPTQ Hessians then come from the
scaled activations). Stats: groups scaled and skipped (with reasons), the alpha and the
error reduction of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, choice
from graphc.passes import _blockquant as bq
from graphc.passes._gram_factor import thin_factor
from graphc.passes._quant import const_array, constant, drop_unused_initializers, release_pages
from graphc.core.registry import register

# normalizations: op type -> (gamma input index, beta input index or None)
_NORMS = {
    "SimplifiedLayerNormalization": (1, None),
    "LayerNormalization": (1, 2),
    "SkipSimplifiedLayerNormalization": (2, None),
    "SkipLayerNormalization": (2, 3),
}


@dataclass(frozen=True)
class AwqScaleOptions:
    bits: int = 4
    block_size: int = 64
    symmetric: bool = False
    method: str = bq.Method.RTN.value  # quantizer of the search: rtn, mse or hqq (not gptq)
    grid: int = 20  # alphas 0, 1/grid, ..., (grid-1)/grid
    # the search tries every coarse_step-th alpha, then the alphas within coarse_step - 1 of the
    # best of those (1, default: every alpha). The full grid's choice wherever the error is
    # unimodal in alpha, from 12 (step 2) or 11 (step 4) error evaluations of 20; on SmolLM2 the
    # error is flat and not unimodal near its minimum: step 2 chose another alpha for 3 of 90
    # groups (error reductions within 0.008 of the full grid's), step 4 for 1; awq-scale took
    # 236 / 234 s instead of 269 s (AMD EPYC, AVX2). On held-out text (AMD EPYC, AVX-512 VNNI):
    # step 2 +4.29% perplexity, the full grid +4.47%; the built-in int4's decoder form uses step 2.
    coarse_step: int = 1
    min_gain: float = 0.01  # scale a group only if its error falls by at least this fraction
    exclude: tuple[str, ...] = ()  # substrings of MatMul names or scopes: their group is left alone


@dataclass
class _Group:
    x: ir.Value  # the activation the MatMuls read
    kind: str  # "norm" or "gated"
    source: ir.Node  # the norm (or Mul by gamma), or the up MatMul
    matmuls: list[ir.Node] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)  # norm: the source's inputs divided by s (gamma, beta)


@register
class AwqScale(GraphcPass):
    name = "awq-scale"
    summary = "AWQ: scale weight rows by activation size, fold the inverse into the norm / gated FFN (float, exact)"
    Options = AwqScaleOptions
    needs_calibration = True
    # x becomes x / s on each scaled group's input, everything else stays equal; the run's
    # moments cache is rescaled to match (graphc.core.moments)
    keeps_activations = True

    @property
    def calibration_texts(self) -> int:
        return 256

    def _validate(self) -> bq.Method:
        o = self.options
        method = choice(bq.Method, o.method, "method", self.name)
        if method is bq.Method.GPTQ:
            raise UnsupportedError("method='gptq' is not a search quantizer here; supported: rtn, mse, hqq",
                                   pass_name=self.name)
        if o.bits not in bq.MATMUL_NBITS_BITS:
            raise UnsupportedError(f"bits={o.bits}; supported: {', '.join(map(str, bq.MATMUL_NBITS_BITS))}", pass_name=self.name)
        if o.block_size not in bq.BLOCK_SIZES:
            raise UnsupportedError(f"block_size={o.block_size}; supported: {', '.join(map(str, bq.BLOCK_SIZES))}",
                                   pass_name=self.name)
        if method is bq.Method.HQQ and o.symmetric:
            raise UnsupportedError("method='hqq' needs symmetric=false", pass_name=self.name)
        if not isinstance(o.grid, int) or isinstance(o.grid, bool) or o.grid < 2:
            raise UnsupportedError(f"grid={o.grid!r}; needs a whole number of alphas, at least 2", pass_name=self.name)
        if not isinstance(o.coarse_step, int) or isinstance(o.coarse_step, bool) or o.coarse_step < 1:
            raise UnsupportedError(f"coarse_step={o.coarse_step!r}; needs a whole number >= 1", pass_name=self.name)
        if isinstance(o.min_gain, bool) or not isinstance(o.min_gain, (int, float)) or not 0 <= o.min_gain < 1:
            raise UnsupportedError(f"min_gain={o.min_gain!r}; needs a fraction in [0, 1)", pass_name=self.name)
        return method

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        method = self._validate()
        feeds = self.context.calibration
        if not feeds:
            raise PassError("needs calibration data (the activations' sizes), and none was given: use a model "
                            "exported by graphc (its recipe's texts) or pass calibration feeds", pass_name=self.name)
        graph = model.graph
        groups = [g for v in _matmul_inputs(graph) if (g := self._group(graph, v, stats)) is not None]
        if not groups:
            stats.notes.append("no normalization or gated FFN feeding constant-weight MatMuls only")
            return False
        from graphc.core.calibrate import input_moments

        moments = input_moments(model, [g.x for g in groups], feeds, pass_name=self.name, cache=self.context.moments,
                               report=lambda done, total: self.context.report("calibration sweep", done, total))
        changed = False
        alphas = np.arange(self.options.grid) / self.options.grid
        for i, g in enumerate(groups):
            self.context.report("awq-scale", i, len(groups))
            m = moments.get(g.x.name)
            if m is None or m.tokens == 0:
                stats.skip(g.x.name, "no calibration statistics")
                continue
            read = [n.inputs[1] for n in g.matmuls] + ([g.source.inputs[1]] if g.kind == "gated" else [])
            weights = [_weight(n) for n in g.matmuls]
            # the search compares errors: float32 GEMMs are plenty; a thin factor of G where the
            # calibration tokens are few next to the width (the same error, far fewer products)
            full = m.gram
            factor = thin_factor(full, m.tokens)
            form = (factor if factor is not None else full).astype(np.float32)
            del full
            errors = _search(len(alphas), self.options.coarse_step,
                             lambda j: self._error(weights, form, _scale(m.abs_mean, alphas[j]), method,
                                                   thin=factor is not None))
            del form, factor
            best = min(errors, key=lambda j: (errors[j], j))
            gain = 1.0 - errors[best] / errors[0] if errors[0] > 0 else 0.0
            label = g.matmuls[0].name or g.x.name
            if best == 0 or gain < self.options.min_gain:
                stats.skip(label, f"scaling lowers the quantization error by {gain:.1%} < min_gain")
                for value in read:
                    release_pages(value)
                continue
            s = _scale(m.abs_mean, alphas[best])
            self._apply(graph, g, s, weights)
            for value in read:  # a large model's mapped weight pages, read once, need not stay resident
                release_pages(value)
            if self.context.moments is not None:
                self.context.moments.rescale(g.x.name, s)
            stats.add("groups_scaled")
            stats.add("matmuls_scaled", len(g.matmuls))
            stats.details.setdefault("groups", []).append(
                {"matmuls": [n.name for n in g.matmuls], "kind": g.kind, "alpha": float(alphas[best]),
                 "error_reduction": round(gain, 4)})
            changed = True
        self.context.report("awq-scale", len(groups), len(groups))
        if changed:
            drop_unused_initializers(graph)
        return changed

    # ------------------------------------------------------------------ search
    def _error(self, weights: list[np.ndarray], form: np.ndarray, s: np.ndarray, method: bq.Method, *,
               thin: bool = False) -> float:
        """sum over the group's weights of tr(D^T G D); ``form`` is G [K, K], or with ``thin`` a
        factor F [r, K] with F^T F = G (then ||F D||^2)."""
        o = self.options
        total = 0.0
        for w in weights:  # [K, N]
            q = bq.quantize((w * s[:, None]).T, o.bits, o.block_size, symmetric=o.symmetric, method=method,
                            scale_dtype=np.float16)
            d = (w - q.dequantize().T / s[:, None]).astype(np.float32)
            if thin:
                total += float(np.sum(np.square(form @ d), dtype=np.float64))
            else:
                total += float(np.sum((form @ d) * d, dtype=np.float64))
        return total

    # ------------------------------------------------------------------ matching
    def _group(self, graph: ir.Graph, x: ir.Value, stats: PassStats) -> _Group | None:
        users = [u.node for u in x.uses()]
        label = x.name
        if x in graph.outputs or not users:
            return None
        matmuls = []
        for n in users:
            if _weight(n) is None or n.inputs[0] is not x:
                return None  # another reader (a residual, an Attention op) would see the scaled value
            if len(n.inputs[1].uses()) != 1:
                stats.skip(n.name, "weight shared with another node")
                return None
            if any(o in graph.outputs for o in n.outputs):
                stats.skip(n.name, "makes a graph output (an LM head): its group is left alone")
                return None
            scope = n.metadata_props.get("graphc.scope", "")
            if any(s in (n.name or "") or s in scope for s in self.options.exclude):
                stats.skip(n.name, "excluded by option")
                return None
            matmuls.append(n)
        producer = x.producer()
        if producer is None:
            return None
        if producer.op_type in _NORMS and producer.domain in ("", "ai.onnx", ops.MS_DOMAIN) and x is producer.outputs[0]:
            folds = [i for i in _NORMS[producer.op_type] if i is not None and len(producer.inputs) > i
                     and producer.inputs[i] is not None]  # gamma, and beta where there is one
            if any(_vector(producer, i) is None for i in folds):
                stats.skip(label, f"{producer.op_type} scale is not a constant vector")
                return None
            return _Group(x, "norm", producer, matmuls, folds)
        if producer.op_type == ops.MUL and producer.domain in ("", "ai.onnx"):
            for i in (0, 1):
                if _vector(producer, i) is not None:  # Mul(normalized, gamma)
                    return _Group(x, "norm", producer, matmuls, [i])
            for i in (0, 1):
                up = producer.inputs[i].producer() if producer.inputs[i] is not None else None
                if (up is not None and _weight(up) is not None and len(up.outputs[0].uses()) == 1
                        and len(up.inputs[1].uses()) == 1):
                    return _Group(x, "gated", up, matmuls)
        return None

    # ------------------------------------------------------------------ rewriting
    def _apply(self, graph: ir.Graph, g: _Group, s: np.ndarray, weights: list[np.ndarray]) -> None:
        for n, w in zip(g.matmuls, weights):
            n.replace_input_with(1, constant(graph, f"{n.inputs[1].name}_awq", (w * s[:, None]).astype(np.float32)))
        src = g.source
        if g.kind == "gated":  # up's output columns (and so the gated product) divided by s
            src.replace_input_with(1, constant(graph, f"{src.inputs[1].name}_awq", _weight(src) / s[None, :]))
            return
        for i in g.folds:
            v = _vector(src, i)
            src.replace_input_with(i, constant(graph, f"{src.inputs[i].name}_awq", (v / s).astype(v.dtype)))


def _weight(node: ir.Node) -> np.ndarray | None:
    """The float32 [K, N] initializer a default-domain MatMul multiplies by, else None."""
    if node.op_type != ops.MATMUL or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    arr = w.const_value.numpy() if w is not None and w.const_value is not None else None
    return arr if arr is not None and arr.ndim == 2 and arr.dtype == np.float32 else None


def _vector(node: ir.Node, i: int) -> np.ndarray | None:
    """The 1-D float constant at input ``i`` (a per-channel scale or bias), else None."""
    if len(node.inputs) <= i or node.inputs[i] is None:
        return None
    arr = const_array(node.inputs[i])
    return arr if arr is not None and arr.ndim == 1 and arr.dtype in (np.float32, np.float16) else None


def _matmul_inputs(graph: ir.Graph) -> list[ir.Value]:
    seen: dict[int, ir.Value] = {}
    for n in graph:
        if n.op_type == ops.MATMUL and n.inputs and n.inputs[0] is not None:
            seen.setdefault(id(n.inputs[0]), n.inputs[0])
    return list(seen.values())


def _search(n: int, step: int, error) -> dict[int, float]:
    """Errors of the grid indices a coarse-to-fine search visits: 0, step, 2·step, ..., then
    every index within step - 1 of the best of those. Index 0 (no scaling) is always there."""
    errors = {j: error(j) for j in range(0, n, step)}
    c = min(errors, key=lambda j: (errors[j], j))
    for j in range(max(0, c - step + 1), min(n, c + step)):
        if j not in errors:
            errors[j] = error(j)
    return errors


def _scale(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's per-channel scale: mean |x| ** alpha, normalized to max x min = 1 (alpha 0: ones)."""
    s = np.maximum(np.asarray(abs_mean, np.float64), 1e-8) ** alpha
    s = np.maximum(s, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)

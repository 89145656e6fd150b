"""Shared pieces of the structured-pruning passes (prune-heads, prune-ffn).

- :class:`Linear`: a float ``MatMul`` by a constant ``[K, N]`` weight with the bias that
  follows it (an ``Add``, or the bias input of ``SkipLayerNormalization`` / ``BiasGelu``),
  and the edits pruning makes on it (keep columns, keep rows, replace the weight and bias).
- :func:`activations`: the rows (tokens) of chosen values over the calibration feeds, padded
  positions left out.
- :func:`plan_layer`: the STAT-style correction. After input channels of a linear layer are
  removed, refit its weight (and bias) on the channels that remain by ridge-regularised least
  squares (normal equations from :class:`Moments`) so that its output on calibration data
  stays close to the original output; the ridge is chosen on held-out tokens.
- :class:`Budget`: how many units (heads, KV groups, neurons) a layer loses, from a fraction,
  a count, or a per-layer error budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, PreconditionError
from graphc.passes._quant import const_array, constant

_FLOATS = (np.float32, np.float64)


@dataclass
class Linear:
    """``y = x @ W (+ b)``: a MatMul by a constant 2-D float weight and where its bias lives."""

    node: ir.Node
    weight: np.ndarray  # [K, N]
    bias_node: ir.Node | None = None  # the node whose input ``bias_index`` is the bias
    bias_index: int = 1
    bias: np.ndarray | None = None  # [N]

    @property
    def output(self) -> ir.Value:
        """The value after the bias when the bias is a plain Add, else the MatMul output."""
        if self.bias_node is not None and self.bias_node.op_type == ops.ADD:
            return self.bias_node.outputs[0]
        return self.node.outputs[0]

    def set_weight(self, graph: ir.Graph, weight: np.ndarray, suffix: str) -> None:
        old = self.node.inputs[1]
        value = constant(graph, f"{old.name}_{suffix}", weight.astype(old.const_value.numpy().dtype
                                                                       if old.const_value is not None else np.float32))
        self.node.replace_input_with(1, value)
        self.weight = weight

    def set_bias(self, graph: ir.Graph, bias: np.ndarray, suffix: str) -> None:
        if self.bias_node is None:
            raise PassError(f"{self.node.name}: no bias to replace")
        old = self.bias_node.inputs[self.bias_index]
        value = constant(graph, f"{old.name}_{suffix}", bias.astype(np.float32))
        self.bias_node.replace_input_with(self.bias_index, value)
        self.bias = bias


def linear(node: ir.Node | None) -> Linear | None:
    """The :class:`Linear` of a float MatMul by a constant 2-D weight, else None."""
    if node is None or node.op_type != ops.MATMUL or node.domain != ops.ONNX_DOMAIN or len(node.inputs) != 2:
        return None
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype not in _FLOATS:
        return None
    lin = Linear(node, np.asarray(w, np.float32))
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1:
        user, idx = uses[0]
        n = w.shape[1]
        if user.op_type == ops.ADD and user.domain == ops.ONNX_DOMAIN:
            b = const_array(user.inputs[1 - idx])
            if b is not None and b.ndim == 1 and b.shape[0] == n:
                lin.bias_node, lin.bias_index, lin.bias = user, 1 - idx, np.asarray(b, np.float32)
        elif user.domain == ops.MS_DOMAIN and idx == 0:
            slot = {ops.SKIP_LAYER_NORM: 4, "SkipSimplifiedLayerNormalization": 3, ops.BIAS_GELU: 1, "FastGelu": 1}
            k = slot.get(user.op_type)
            if k is not None and len(user.inputs) > k and user.inputs[k] is not None:
                b = const_array(user.inputs[k])
                if b is not None and b.ndim == 1 and b.shape[0] == n:
                    lin.bias_node, lin.bias_index, lin.bias = user, k, np.asarray(b, np.float32)
    return lin


def producer_linear(value: ir.Value | None) -> Linear | None:
    """The Linear whose output (after its Add bias, if any) is ``value``."""
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == ops.ADD and node.domain == ops.ONNX_DOMAIN:
        for x in node.inputs:
            lin = linear(x.producer() if x is not None else None)
            if lin is not None and lin.bias_node is node:
                return lin
        return None
    lin = linear(node)
    return lin if lin is not None and lin.output is value else None


# --------------------------------------------------------------------------- calibration


def activations(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]] | None, *, pass_name: str,
    max_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Rows [tokens, channels] (float32) of each value over the calibration feeds. Values of
    shape [batch, seq, K] leave out padded positions (``attention_mask`` 0). With ``max_rows``,
    feeds are read in order until the rows reach it (the feed that passes it whole)."""
    from graphc.core.calibrate import exposing_session

    if not feeds:
        raise PassError("needs calibration data, and none was given (use a model spec or pass feeds)",
                        pass_name=pass_name)
    names = list(dict.fromkeys(v.name for v in values))
    session, _ = exposing_session(model, names)
    inputs = {i.name for i in session.get_inputs()}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        if max_rows is not None and names and sum(map(len, rows[names[0]])) >= max_rows:
            break
        outs = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        mask = feed.get("attention_mask")
        for name, out in zip(names, outs):
            out = np.asarray(out, np.float32)
            if mask is not None and out.ndim == 3 and out.shape[:2] == np.shape(mask):
                rows[name].append(out[np.asarray(mask) != 0])
            else:
                rows[name].append(out.reshape(-1, out.shape[-1]))
    return {n: np.concatenate(r) for n, r in rows.items()}


# --------------------------------------------------------------------------- least squares


def relative_error(y_hat: np.ndarray, y: np.ndarray) -> float:
    """||y_hat - y||² / ||y - mean(y)||²: the share of the output's variation that is lost."""
    denom = float(np.sum((y - y.mean(axis=0)) ** 2)) or 1.0
    return float(np.sum((y_hat - y) ** 2)) / denom


def group_energy(x: np.ndarray, w: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Importance of each group of input channels: ||x[:, g] @ w[g]||² summed over tokens
    (the energy of that group's contribution to the layer's output). One-channel groups (FFN
    neurons): the contribution is an outer product, so its energy is ||x_j||² ||w_j||²."""
    if all(len(g) == 1 for g in groups):
        idx = np.array([g[0] for g in groups], dtype=np.int64)
        xs = np.einsum("ij,ij->j", x[:, idx], x[:, idx], dtype=np.float64)
        return xs * np.einsum("ij,ij->i", w[idx], w[idx], dtype=np.float64)
    return np.array([float(np.sum((x[:, g] @ w[g]) ** 2)) for g in groups])


# --------------------------------------------------------------------------- how much to prune


@dataclass(frozen=True)
class Budget:
    """Units a layer removes: ``count`` units, else ``fraction`` of them (rounded down), else
    the most whose corrected output keeps ``relative_error`` ≤ ``max_error``."""

    fraction: float = 0.0
    count: int = 0
    max_error: float = 0.0

    @property
    def requested(self) -> bool:
        return self.count > 0 or self.fraction > 0 or self.max_error > 0

    def check(self, pass_name: str, unit: str) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise PreconditionError(f"fraction must be in [0, 1), got {self.fraction}", pass_name=pass_name)
        if self.count < 0:
            raise PreconditionError(f"count must be ≥ 0, got {self.count}", pass_name=pass_name)
        if self.max_error < 0:
            raise PreconditionError(f"max_error must be ≥ 0, got {self.max_error}", pass_name=pass_name)
        if sum(bool(v) for v in (self.fraction, self.count, self.max_error)) > 1:
            raise PreconditionError(f"give one of fraction, count or max_error ({unit} per layer)",
                                    pass_name=pass_name)

    def fixed(self, total: int) -> int | None:
        """Units to remove when fixed by fraction or count (None: by error budget)."""
        if self.count:
            return self.count
        if self.fraction:
            return int(np.floor(self.fraction * total + 1e-9))
        return None


def layer_budgets(budget: Budget, fractions: Sequence[float], layers: int, pass_name: str, unit: str) -> list[Budget]:
    """One :class:`Budget` per layer: ``fractions`` (one per layer, in graph order) when given,
    else ``budget`` for every layer."""
    if not fractions:
        return [budget] * layers
    if budget.requested:
        raise PreconditionError("give fractions (one per layer) or one of fraction, count, max_error, not both",
                                pass_name=pass_name)
    if len(fractions) != layers:
        raise PreconditionError(f"fractions has {len(fractions)} entries, the model has {layers} layers of {unit}",
                                pass_name=pass_name)
    for f in fractions:
        Budget(fraction=float(f)).check(pass_name, unit)
    return [Budget(fraction=float(f)) for f in fractions]


def choose(
    total: int, budget: Budget, order: np.ndarray, error_of: Callable[[np.ndarray], float], min_keep: int = 1
) -> np.ndarray:
    """Indices of the units to keep (sorted). ``order``: unit indices, least important first;
    ``error_of(keep)``: the corrected relative error when keeping ``keep``."""
    fixed = budget.fixed(total)
    if fixed is not None:
        remove = min(fixed, total - min_keep)
        return np.sort(order[remove:])
    lo, hi = 0, total - min_keep  # the error grows with the number removed: bisect on it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if error_of(np.sort(order[mid:])) <= budget.max_error:
            lo = mid
        else:
            hi = mid - 1
    return np.sort(order[lo:])


def expand_units(units: np.ndarray, width: int) -> np.ndarray:
    """Channel indices of units that each span ``width`` consecutive channels."""
    return (np.asarray(units)[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def set_arch_metadata(model: ir.Model, key: str, per_layer: Sequence[int]) -> None:
    """``graphc.arch.<key>`` = the largest per-layer value; ``graphc.arch.<key>_per_layer`` =
    all of them, in graph order (pruning may leave layers of different widths)."""
    if not per_layer:
        return
    model.metadata_props[f"{ops.META_ARCH_PREFIX}{key}"] = str(max(per_layer))
    model.metadata_props[f"{ops.META_ARCH_PREFIX}{key}_per_layer"] = ",".join(str(v) for v in per_layer)


class Moments:
    """Sufficient statistics of a least-squares problem ``x → y`` (float64): token count,
    sums, ``xᵀx``, ``xᵀy`` and ``Σy²``; any subset of x's columns is fitted and scored from
    them without touching the rows again."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        self.n = x.shape[0]
        self.sx, self.sy = x.sum(axis=0), y.sum(axis=0)
        self.xtx, self.xty = x.T @ x, x.T @ y
        self.syy = float(np.sum(y * y))
        self.y_var = self.syy - float(self.sy @ self.sy) / max(self.n, 1)

    def __add__(self, other: Moments) -> Moments:
        out = object.__new__(Moments)
        out.n = self.n + other.n
        out.sx, out.sy = self.sx + other.sx, self.sy + other.sy
        out.xtx, out.xty = self.xtx + other.xtx, self.xty + other.xty
        out.syy = self.syy + other.syy
        out.y_var = out.syy - float(out.sy @ out.sy) / max(out.n, 1)
        return out

    def fit(self, cols: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """Ridge least squares on the centred data, λ = ``ridge`` × mean diagonal, and the bias."""
        n = max(self.n, 1)
        mx, my = self.sx[cols] / n, self.sy / n
        gram = self.xtx[np.ix_(cols, cols)] - n * np.outer(mx, mx)
        cross = self.xty[cols] - n * np.outer(mx, my)
        lam = ridge * max(float(np.trace(gram)) / max(len(cols), 1), 1e-12)
        gram[np.diag_indices_from(gram)] += lam
        try:
            w = np.linalg.solve(gram, cross)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(gram, cross, rcond=None)[0]
        return w, my - mx @ w

    def error(self, cols: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
        """:func:`relative_error` of ``x[:, cols] @ w + b`` against y, from the moments."""
        w = np.asarray(w, np.float64)
        b = np.asarray(b, np.float64)
        sq = (float(np.sum(w * (self.xtx[np.ix_(cols, cols)] @ w))) + 2 * float(b @ (self.sx[cols] @ w))
              + self.n * float(b @ b) - 2 * float(np.sum(w * self.xty[cols])) - 2 * float(b @ self.sy) + self.syy)
        return max(sq, 0.0) / (self.y_var or 1.0)


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


GREEDY_UNITS = 64  # up to this many units (heads, KV groups) the order is greedy on the refit error


def _greedy_order(total: Moments, units: int, width: int, ridge: float) -> np.ndarray:
    """Units least important first: backward elimination, each step removing the unit whose
    loss the refit of the rest compensates best (the correction's own error, not the unit's
    size: a large head that the others can stand in for goes early)."""
    keep, order = list(range(units)), []
    while len(keep) > 1:
        def cost(u: int) -> float:
            cols = expand_units(np.array([k for k in keep if k != u]), width)
            return total.error(cols, *total.fit(cols, ridge))
        best = min(keep, key=cost)
        order.append(best)
        keep.remove(best)
    return np.array(order + keep)


def _pivoted_order(total: Moments, weight: np.ndarray) -> np.ndarray:
    """Channels least important first, by pivoted Cholesky of the covariance of the channels'
    contributions (each channel scaled by its weight row's norm): the channel that adds most
    variance not already spanned by those chosen before it comes first, as the interpolative
    decomposition STAT uses chooses the neurons to keep."""
    n = max(total.n, 1)
    mx = total.sx / n
    scale = np.linalg.norm(weight.astype(np.float64), axis=1)
    g = (total.xtx - n * np.outer(mx, mx)) * np.outer(scale, scale)
    k = g.shape[0]
    resid = np.diag(g).copy()
    basis = np.zeros((k, k))
    chosen: list[int] = []
    free = np.ones(k, bool)
    tiny = 1e-12 * max(float(resid.max(initial=0.0)), 1e-30)
    for i in range(k):
        j = int(np.argmax(np.where(free, resid, -np.inf)))
        if resid[j] <= tiny:
            break
        col = (g[:, j] - basis[:, :i] @ basis[j, :i]) / np.sqrt(resid[j])
        basis[:, i] = col
        resid -= col * col
        chosen.append(j)
        free[j] = False
    rest = [j for j in np.argsort(-np.diag(g), kind="stable") if free[j]]
    return np.array(chosen + rest)[::-1].copy()


@dataclass
class LayerPlan:
    """What pruning one layer decided: units kept, the input channels they span, the new
    weight and bias of the layer after them, the ridge chosen (None: not corrected), and
    relative output errors on the calibration tokens (``heldout_*``: fitted on one half of
    the tokens, scored on the other, both ways)."""

    keep: np.ndarray
    channels: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    ridge: float | None
    error: float
    error_uncorrected: float
    heldout: float
    heldout_uncorrected: float

    def describe(self) -> str:
        how = f"corrected (ridge {self.ridge:g})" if self.ridge is not None else "not corrected (no held-out gain)"
        return (f"relative error {self.error_uncorrected:.4f} → {self.error:.4f}, held out "
                f"{self.heldout_uncorrected:.4f} → {self.heldout:.4f}, {how}")


def plan_layer(
    x: np.ndarray, y: np.ndarray, lin: Linear, width: int, budget: Budget, *, correct: bool, ridge: float,
    min_keep: int = 1,
) -> LayerPlan:
    """Choose the units (``width`` consecutive input channels each) of ``lin``'s input to keep,
    least contributing first out, and refit ``lin`` on the rest so that it maps the kept
    channels ``x[:, channels]`` to ``y`` (the original layer's output on the same tokens).

    The correction is cross-validated: the tokens are split into two contiguous halves (whole
    sequences apart from one), the ridge is chosen among ``ridge`` and :data:`RIDGES` by the
    error on the half not fitted, and when no ridge beats the uncorrected layer there the layer
    is left uncorrected (a refit on few distinct tokens overfits)."""
    w = lin.weight.astype(np.float64)
    b = (lin.bias if lin.bias is not None else np.zeros(w.shape[1], np.float32)).astype(np.float64)
    units = x.shape[1] // width
    groups = [np.arange(u * width, (u + 1) * width) for u in range(units)]
    half = x.shape[0] // 2
    parts = (Moments(x[:half], y[:half]), Moments(x[half:], y[half:]))
    total = parts[0] + parts[1]
    if not correct:
        order = np.argsort(group_energy(x, lin.weight, groups), kind="stable")
    elif units <= GREEDY_UNITS:
        order = _greedy_order(total, units, width, ridge)
    else:
        order = _pivoted_order(total, lin.weight)
    grid = sorted({ridge, *RIDGES})

    def heldout(cols: np.ndarray, r: float | None) -> float:
        errs = []
        for fit_on, score_on in ((parts[0], parts[1]), (parts[1], parts[0])):
            w2, b2 = fit_on.fit(cols, r) if r is not None else (w[cols], b)
            errs.append(score_on.error(cols, w2, b2))
        return float(np.mean(errs))

    def fit(keep: np.ndarray):
        cols = expand_units(keep, width)
        plain = heldout(cols, None)
        best, best_err = None, plain
        if correct and half >= 2:
            for r in grid:
                e = heldout(cols, r)
                if e < best_err:
                    best, best_err = r, e
        w2, b2 = total.fit(cols, best) if best is not None else (w[cols], b)
        return cols, w2, b2, best, best_err, plain

    def error(keep: np.ndarray) -> float:
        cols, w2, b2, *_ = fit(keep)
        return total.error(cols, w2, b2)

    keep = choose(units, budget, order, error, min_keep)
    cols, w2, b2, best, held, held_plain = fit(keep)
    return LayerPlan(keep, cols, w2.astype(np.float32), b2.astype(np.float32), best, total.error(cols, w2, b2),
                     total.error(cols, w[cols], b), held, held_plain)


def apply_output_refit(graph: ir.Graph, lin: Linear, plan: LayerPlan, suffix: str) -> None:
    """Give ``lin`` its new weight (rows of the kept channels, refitted) and bias; a layer
    without a bias gets an Add when the refit moved the bias."""
    lin.set_weight(graph, plan.weight, suffix)
    if lin.bias_node is not None:
        lin.set_bias(graph, plan.bias, suffix)
    elif np.any(plan.bias != 0):
        out = lin.node.outputs[0]
        uses = list(out.uses())
        value = constant(graph, f"{lin.node.name or 'linear'}_bias_{suffix}", plan.bias.astype(np.float32))
        add = ir.node(ops.ADD, [out, value], name=unique_node_name(graph, f"{lin.node.name or 'linear'}_bias_{suffix}"))
        for key in ("graphc.scope", "namespace"):
            if key in lin.node.metadata_props:
                add.metadata_props[key] = lin.node.metadata_props[key]
        graph.insert_after(lin.node, add)
        for user, idx in uses:
            user.replace_input_with(idx, add.outputs[0])
        if out in graph.outputs:
            graph.outputs[list(graph.outputs).index(out)] = add.outputs[0]
        lin.bias_node, lin.bias_index, lin.bias = add, 1, plan.bias


def forget_shapes(nodes: Sequence[ir.Node]) -> None:
    """Drop the recorded shapes of the nodes' outputs (their channel counts changed)."""
    for node in nodes:
        for out in node.outputs:
            out.shape = None


def unique_node_name(graph: ir.Graph, base: str) -> str:
    names = {n.name for n in graph}
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name

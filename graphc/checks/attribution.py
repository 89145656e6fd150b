"""Per-layer error attribution: where error enters a rewritten graph, and how it grows.

Both graphs run in ONNX Runtime on the same feeds, matched intermediate tensors added as graph
outputs; each is compared with its counterpart (cosine, max abs, relative error). The error is
1 − cosine (flattened, float64); a layer's is that of its last compared tensor (its output),
and what it adds is that minus the previous layer's.

Matching is by value name. What survives (found on a tiny BERT, onnx 1.23, ORT 1.31):

- graphc passes keep the output names of the nodes they replace: ``MatMulIntegerToFloat``
  writes the MatMul's name, ``SkipLayerNormalization`` the LayerNorm's, ``BiasGelu`` the Gelu's,
  ``QAttention``/``MultiHeadAttention`` the attention output reshape's. Values inside a fusion
  (Q/K/V projections, scores, the residual sum) are gone.
- ORT ``quantize_dynamic`` (``MatMulInteger``): every float name survives; a MatMul's ``X``
  becomes the output of the ``Mul`` after ``MatMulInteger`` → ``Cast`` (new values
  ``X_output_quantized``, ``X_output_quantized_cast_output``).
- ORT ``quantize_static``, QDQ: an op keeps its float output ``X``; ``X_QuantizeLinear_Output``
  and ``X_DequantizeLinear_Output`` (what consumers read) follow. For a graph output the op
  writes ``Y_QuantizeLinear_Input`` and the last ``DequantizeLinear`` writes ``Y``.
- ORT ``quantize_static``, QOperator: between quantized ops only ``X_quantized`` (uint8, not
  compared) exists; float names survive where the graph returns to float (LayerNorm, Gelu...).
- ORT ``MatMulNBitsQuantizer``: ``MatMulNBits`` writes the MatMul's name; all names survive.

An exact name is taken first, else one that :func:`normalize_name` maps back to it (needed
once ORT has fused a QDQ graph and saved it: ``X`` is gone, ``X_DequantizeLinear_Output``
remains). No ``_output_0``-style renames were seen.

Layers come from the producing node in the original (:func:`graphc.checks.inspection.node_layer`),
but a node whose own scope is outside the layers (``embeddings.LayerNorm``) stays outside;
such tensors before the first layer are ``embeddings``, after the last ``head``. Padded rows
(``attention_mask``) and mask sentinels (|x| ≥ 1e30) are left out. A tensor's ``added_error``
is its error minus the largest error of the nearest compared tensors it is computed from.
Extra outputs can keep ORT from fusing QDQ pairs, so QDQ is measured as simulated quantization.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphc.core.errors import ValidationError
from graphc.checks.inspection import layer_of_text, node_layer
from graphc.checks.validate import _row_mask, make_session, run_feeds

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
# ORT quant_utils: X_QuantizeLinear_Input, X_DequantizeLinear_Output[_i] (DedicatedQDQPair),
# X_convert_... (mixed-precision type conversion)
_RENAMED = re.compile(r"^(.+?)(?:_convert)?(?:_DequantizeLinear_Output(?:_\d+)?|_QuantizeLinear_Input)$")
_NO_ERROR = 1e-9  # 1 − cosine below this is float rounding, not error
_SENTINEL = 1e30  # |x| beyond this is a mask value (finfo.min), not data


def normalize_name(name: str) -> str:
    """The original tensor name behind a name ORT's QDQ quantizer derived from it."""
    m = _RENAMED.match(name)
    return m.group(1) if m else name


def _as_dict(obj: Any) -> dict[str, Any]:
    """Fields as JSON values: floats rounded, inf/NaN as text."""
    return {k: (round(v, 7) if np.isfinite(v) else str(v)) if isinstance(v, float) else v
            for k, v in asdict(obj).items()}


@dataclass
class TensorError:
    name: str
    layer: str
    op_type: str
    cosine: float  # mean over feeds
    min_cosine: float
    max_abs: float
    rel_error: float  # ‖a − b‖ / ‖a‖, mean over feeds
    added_error: float = 0.0
    rewritten_name: str | None = None  # when the rewritten graph renamed it

    @property
    def error(self) -> float:
        return 1.0 - self.cosine

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class LayerError:
    layer: str
    output: str  # the layer's last compared tensor
    cosine: float
    added_error: float  # its 1 − cosine minus the previous layer's
    max_abs: float
    tensors: int

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class Attribution:
    tensors: list[TensorError]
    layers: list[LayerError]
    worst_layer: str | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    samples: int = 0

    def layer(self, name: str) -> LayerError | None:
        return next((layer for layer in self.layers if layer.layer == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "worst_layer": self.worst_layer,
            "summary": self.summary(),
            "samples": self.samples,
            "layers": [layer.to_dict() for layer in self.layers],
            "tensors": [t.to_dict() for t in self.tensors],
            "skipped": self.skipped,
        }

    def summary(self) -> str:
        worst = self.layer(self.worst_layer) if self.worst_layer else None
        if worst is None:
            return f"no error in any layer ({len(self.tensors)} tensors compared)"
        i = self.layers.index(worst)
        before = self.layers[i - 1].cosine if i else 1.0
        return (
            f"worst layer: {worst.layer} adds {worst.added_error:.4g} of 1−cos "
            f"(output cosine {before:.4f} → {worst.cosine:.4f}; {len(self.tensors)} tensors compared)"
        )


# --------------------------------------------------------------------------- matching


def _layer_of(node: ir.Node) -> str:
    scope = node.metadata_props.get("graphc.scope") or node.metadata_props.get("namespace") or ""
    if scope and layer_of_text(scope) is None and layer_of_text(node.name or "") is None:
        return "other"  # explicitly outside the layers: do not borrow a consumer's layer
    return node_layer(node)


def _is_float(value: ir.Value) -> bool:
    return value.dtype is None or value.dtype in _FLOAT


def _candidates(model: ir.Model) -> list[ir.Value]:
    """Float values computed (from the graph inputs) by top-level nodes, in topological order."""
    dynamic = {id(v) for v in model.graph.inputs if v.name not in model.graph.initializers}
    found = []
    for node in model.graph:
        if not any(v is not None and id(v) in dynamic for v in node.inputs):
            continue
        for out in node.outputs:
            dynamic.add(id(out))
            if out.name and _is_float(out):
                found.append(out)
    return found


def _match(candidates: list[ir.Value], rewritten: ir.Model) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Original name → rewritten name, and the candidates that have no counterpart."""
    produced = {v.name: v for node in rewritten.graph for v in node.outputs if v.name and _is_float(v)}
    renamed: dict[str, str] = {}
    for name in produced:
        renamed.setdefault(normalize_name(name), name)
    pairs, skipped = {}, []
    for value in candidates:
        if value.name in produced:
            pairs[value.name] = value.name
        elif value.name in renamed:
            pairs[value.name] = renamed[value.name]
        else:
            skipped.append({"name": value.name, "reason": "not in the rewritten graph (fused away or renamed)"})
    return pairs, skipped


def _labels(values: list[ir.Value]) -> list[str]:
    raw = [_layer_of(v.producer()) for v in values]
    real = [i for i, layer in enumerate(raw) if layer != "other"]
    if not real:
        return raw
    first, last = real[0], real[-1]
    return [("embeddings" if i < first else "head" if i > last else "other") if layer == "other" else layer
            for i, layer in enumerate(raw)]


def _choose(values: list[ir.Value], labels: list[str], outputs: set[str], limit: int) -> list[int]:
    """Indices to compare: all when within ``limit``, else graph outputs, layer outputs, then evenly spaced."""
    if len(values) <= limit:
        return list(range(len(values)))
    keep = {i for i, v in enumerate(values) if v.name in outputs}
    keep |= {i for i in range(len(values)) if i + 1 == len(values) or labels[i + 1] != labels[i]}
    keep = set(sorted(keep, key=lambda i: (values[i].name not in outputs, i))[: max(limit, len(outputs))])
    rest = [i for i in range(len(values)) if i not in keep]
    room = max(limit - len(keep), 0)
    if room and rest:
        keep |= {rest[int(j * len(rest) / room)] for j in range(min(room, len(rest)))}
    return sorted(keep)


# --------------------------------------------------------------------------- measuring


def _session(model: ir.Model, names: Sequence[str], what: str) -> ort.InferenceSession:
    """A session whose outputs also include the named values (the model is restored after):
    through make_session's IR path, which also serves models past protobuf's 2 GB."""
    by_name = {v.name: v for v in model.graph.inputs}
    by_name.update({v.name: v for node in model.graph for v in node.outputs})
    present = {v.name for v in model.graph.outputs}
    extra = [by_name[n] for n in dict.fromkeys(names) if n in by_name and n not in present]
    model.graph.outputs.extend(extra)
    try:
        return make_session(model, what=what)
    finally:
        for _ in extra:
            model.graph.outputs.pop()


def _outputs(session: ort.InferenceSession, feed: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    values = run_feeds(session, [feed], what)[0]
    return dict(zip((o.name for o in session.get_outputs()), values))


def _metrics(ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> tuple[float, float, float]:
    """Cosine, max abs error and relative error of one tensor on one feed."""
    r, g = np.asarray(ref), np.asarray(got)
    if mask is not None and not np.all(mask):  # rows picked before the float64 copies
        r, g = r[mask], g[mask]
    r, g = r.astype(np.float64, copy=False).ravel(), g.astype(np.float64, copy=False).ravel()
    # inf, NaN and mask sentinels (finfo.min added to padded scores) in the original carry no
    # signal; a non-finite value where the original has a number is a failure
    keep = np.abs(r) < _SENTINEL
    if np.any(keep & ~np.isfinite(g)):
        return 0.0, float("inf"), float("inf")
    if not keep.all():
        r, g = r[keep], g[keep]
    nr, ng, nd = (float(np.linalg.norm(x)) for x in (r, g, r - g))
    cos = 1.0 if nr == ng == 0.0 else 0.0 if nr == 0.0 or ng == 0.0 else float(np.dot(r, g) / (nr * ng))
    max_abs = float(np.abs(r - g).max(initial=0.0))
    return min(cos, 1.0), max_abs, nd / nr if nr > 0 else nd


class _Values:
    """The named values and outputs of a model on each feed: one session, run feed by feed; or,
    for a model that streams (graphc.core.streaming), one pass segment by segment over all
    feeds, the values kept in an activation cache (spilled to a temporary folder past its bound)."""

    def __init__(self, model: ir.Model, names: Sequence[str], feeds: Sequence[dict], what: str) -> None:
        from graphc.core import streaming

        self.feeds, self.what, self._cache = feeds, what, None
        if streaming.applies(model):
            try:
                runner = streaming.StreamedModel(model, observe=[n for n in dict.fromkeys(names)
                                                                 if n not in {o.name for o in model.graph.outputs}],
                                                 what=what)
                cache = streaming.ActivationCache(len(feeds), streaming.policy().cache_bytes)
                outs = runner.run(feeds, on_value=lambda i, name, value: cache.put(i, name, np.asarray(value)))
                for i, row in enumerate(outs):
                    for name, value in zip(runner.outputs, row):
                        cache.put(i, name, value)
                self._cache = cache
                return
            except streaming.NotStreamable:
                pass
        self.session = _session(model, names, what)

    def of(self, i: int) -> dict[str, Any]:
        if self._cache is None:
            return _outputs(self.session, self.feeds[i], self.what)
        return {name: self._cache.get(i, name) for name in self._cache.values[i]}

    def __del__(self) -> None:
        if self._cache is not None:
            self._cache.close()


def _measure(original: ir.Model, rewritten: ir.Model, pairs: dict[str, str], feeds: Sequence[dict]):
    """Per original name, the (cosine, max_abs, rel) of each feed; and the pairs that could not be compared."""
    orig = _Values(original, list(pairs), feeds, "original model")
    rew = _Values(rewritten, list(pairs.values()), feeds, "rewritten model")
    per: dict[str, list[tuple[float, float, float]]] = {name: [] for name in pairs}
    reasons: dict[str, str] = {}
    for i, feed in enumerate(feeds):
        ref, got = orig.of(i), rew.of(i)
        for name, rname in pairs.items():
            if name in reasons:
                continue
            a, b = ref[name], got[rname]
            if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
                reasons[name] = "not a tensor (a sequence or a map)"
            elif not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)):
                reasons[name] = f"not a float tensor ({a.dtype} vs {b.dtype})"
            elif a.shape != b.shape:
                reasons[name] = f"shape differs: {list(a.shape)} in the original, {list(b.shape)} rewritten"
            else:
                per[name].append(_metrics(a, b, _row_mask(feed, a, name)))
    return per, reasons


# --------------------------------------------------------------------------- attribution


def _nearest_compared(value: ir.Value, compared: dict[int, TensorError]) -> list[TensorError]:
    """The compared tensors a value is computed from, looking back through uncompared float values."""
    node = value.producer()
    stack = [v for v in (node.inputs if node else ()) if v is not None]
    seen: set[int] = set()
    found = []
    while stack:
        v = stack.pop()
        if id(v) in seen or not _is_float(v):
            continue
        seen.add(id(v))
        if id(v) in compared:
            found.append(compared[id(v)])
        elif (p := v.producer()) is not None:
            stack.extend(i for i in p.inputs if i is not None)
    return found


def _layer_order(name: str) -> tuple[int, int, str]:
    if name.startswith("layer.") and name[6:].isdigit():
        return (1, int(name[6:]), "")
    return ({"embeddings": 0, "head": 2}.get(name, 3), 0, name)


def _layers(tensors: list[TensorError]) -> list[LayerError]:
    last: dict[str, TensorError] = {}
    counts: dict[str, int] = {}
    for t in tensors:
        last[t.layer] = t
        counts[t.layer] = counts.get(t.layer, 0) + 1
    names = sorted(last, key=_layer_order)
    if len(names) > 1 and "other" in names:  # glue between layers (mask arithmetic): not a stage
        names.remove("other")
    layers, before = [], 0.0
    for name in names:
        out = last[name]
        layers.append(LayerError(name, out.name, out.cosine, out.error - before, out.max_abs, counts[name]))
        before = out.error
    return layers


def attribute(
    original: ir.Model, rewritten: ir.Model, feeds: list[dict[str, np.ndarray]], *, max_tensors: int = 400
) -> Attribution:
    """Where error enters ``rewritten`` relative to ``original``, tensor by tensor and layer by layer."""
    if not feeds:
        raise ValidationError("error attribution needs at least one feed")
    values = _candidates(original)
    pairs, skipped = _match(values, rewritten)
    values = [v for v in values if v.name in pairs]
    labels = _labels(values)
    outputs = {v.name for v in original.graph.outputs}
    chosen = _choose(values, labels, outputs, max(max_tensors, 1))
    per, reasons = _measure(original, rewritten, {values[i].name: pairs[values[i].name] for i in chosen}, feeds)
    skipped += [{"name": name, "reason": reason} for name, reason in reasons.items()]
    tensors: list[TensorError] = []
    compared: dict[int, TensorError] = {}
    for i in chosen:
        value = values[i]
        if value.name in reasons:
            continue
        cos, mx, rel = (np.array(x) for x in zip(*per[value.name]))
        t = TensorError(value.name, labels[i], value.producer().op_type, float(cos.mean()), float(cos.min()),
                        float(mx.max()), float(rel.mean()),
                        rewritten_name=None if pairs[value.name] == value.name else pairs[value.name])
        sources = _nearest_compared(value, compared)
        t.added_error = t.error - max((s.error for s in sources), default=0.0)
        compared[id(value)] = t
        tensors.append(t)
    layers = _layers(tensors)
    worst = max(layers, key=lambda layer: layer.added_error, default=None)
    if worst is not None and max(t.error for t in tensors) <= _NO_ERROR:
        worst = None
    return Attribution(tensors, layers, worst.layer if worst else None, skipped, len(feeds))

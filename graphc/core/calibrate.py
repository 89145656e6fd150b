"""Calibration statistics: run the model as it stands in the pipeline on the calibration
feeds and reduce chosen intermediate values, without keeping them all in memory."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphc.core import streaming, tempdirs
from graphc.core.errors import PassError
from graphc.core.interrupt import run_session  # interruptible, bounded by time_limit
from graphc.core.moments import LazyGram, MomentsCache, SpillFolder, Sums
from graphc.core.session import make_session

MIN_CALIBRATION_FEEDS = 1


def exposing_session(model: ir.Model, names: Sequence[str], *, only: bool = False) -> tuple[object, set[str]]:
    """An ORT session over the model as it stands, with the named intermediate values added
    as outputs; and the names of its inputs (feeds may carry more). ``only``: the named values
    are the session's only outputs and the nodes that do not lead to them are left out (ONNX
    Runtime runs every node of a graph whatever is fetched: a decoder's LM head is ~20% of its
    forward pass, and a sweep over the body's inputs does not need it)."""
    def expose(proto: onnx.ModelProto) -> None:
        if only:
            del proto.graph.output[:]
        existing = {o.name for o in proto.graph.output}
        for name in names:
            if name not in existing:
                proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
        if only:
            _drop_dead_nodes(proto.graph)

    session = make_session(model, what="model during calibration", edit=expose)
    return session, {i.name for i in session.get_inputs()}


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove the nodes none of the graph's outputs depend on (nodes are in topological order;
    a node with subgraphs keeps every name they read from the outer scope alive)."""
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if not any(o and o in live for o in node.output):
            continue
        keep.append(node)
        live.update(_names_read(node))
    if len(keep) < len(graph.node):
        kept = list(reversed(keep))
        del graph.node[:]
        graph.node.extend(kept)


def _names_read(node: onnx.NodeProto) -> set[str]:
    """The names a node reads: its inputs, and every name its subgraphs read or output."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in sub.node:
                names |= _names_read(inner)
            names.update(o.name for o in sub.output)
    return names


def token_rows(out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[tokens, channels] rows of a value; for a [batch, seq, K] value the rows at padded
    positions (``attention_mask`` 0) are left out."""
    if mask is not None and out.ndim == 3 and out.shape[:2] == np.shape(mask):
        keep = np.asarray(mask) != 0
        if not keep.all():  # a copy of the kept rows; else the value itself, as rows
            return out[keep]
    return out.reshape(-1, out.shape[-1])


def channel_absmax(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]] | None, *, pass_name: str
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each value over all calibration feeds."""
    if not feeds or len(feeds) < MIN_CALIBRATION_FEEDS:
        raise PassError("needs calibration data, and none was given (pass feeds or use a model spec)", pass_name=pass_name)
    names = [v.name for v in values]
    result: dict[str, np.ndarray] = {}

    def add(i: int, name: str, out: np.ndarray) -> None:
        amax = np.abs(out.reshape(-1, out.shape[-1])).max(axis=0)
        result[name] = amax if name not in result else np.maximum(result[name], amax)

    if streaming.applies(model):
        streaming.StreamedModel(model, observe=names, what="model during calibration").run(feeds, on_value=add, outputs=False)
        return result
    session, inputs = exposing_session(model, names)
    for feed in feeds:
        outs = run_session(session, {k: v for k, v in feed.items() if k in inputs}, names)
        for name, out in zip(names, outs):
            add(0, name, out)
    return result


class InputMoments:
    """Second moments of one value's last axis over the calibration tokens (padding left out):
    ``gram`` = mean of x x^T [K, K] (float64), ``abs_mean`` = mean |x| per channel [K], and
    ``tokens``, how many rows went in. From sums kept on disk (a streamed sweep), ``gram`` is
    computed on each access: read it once per use, and let it go."""

    __slots__ = ("_gram", "abs_mean", "tokens")

    def __init__(self, gram: np.ndarray | Callable[[], np.ndarray], abs_mean: np.ndarray, tokens: int) -> None:
        self._gram, self.abs_mean, self.tokens = gram, abs_mean, tokens

    @property
    def gram(self) -> np.ndarray:
        return self._gram() if callable(self._gram) else self._gram

    def gram_float32(self) -> np.ndarray:
        """``gram`` as float32; from sums on disk a block of rows at a time (never the whole
        float64 matrix at once): the same numbers as ``gram.astype(float32)``."""
        if isinstance(self._gram, LazyGram):
            return self._gram.float32()
        return np.asarray(self.gram, dtype=np.float32)


class Grams(Mapping):
    """``{value name: gram}`` of :class:`InputMoments`, each read when asked for (a streamed
    sweep's grams are on disk: a large model's would not fit in memory all at once)."""

    def __init__(self, moments: Mapping[str, InputMoments]) -> None:
        self._moments = moments

    def __getitem__(self, name: str) -> np.ndarray:
        return self._moments[name].gram

    def __contains__(self, name: object) -> bool:  # without reading the gram (Mapping's would)
        return name in self._moments

    def tokens(self, name: str) -> int:
        """The rows ``name``'s gram averages."""
        return self._moments[name].tokens

    def float32(self, name: str) -> np.ndarray:
        """``self[name]`` as float32, without the float64 matrix whole in memory when it is on disk."""
        return self._moments[name].gram_float32()

    def __iter__(self):
        return iter(self._moments)

    def __len__(self) -> int:
        return len(self._moments)


def input_moments(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]] | None, *, pass_name: str,
    cache: MomentsCache | None = None, report: Callable[[int, int], None] | None = None,
) -> dict[str, InputMoments]:
    """:class:`InputMoments` of each named value over all calibration feeds; rows at padded
    positions (the feed's ``attention_mask`` is 0) are left out when the value is [batch, seq, K].

    ``cache`` (the run's :class:`~graphc.core.moments.MomentsCache`, ``context.moments``): read
    from it when it holds these values over these feeds; else one sweep collects them together
    with every other constant-weight MatMul input of the model and keeps the sums there.
    ``report(done, total)``: the sweep's progress, feed by feed (segment by segment when streamed)."""
    if not feeds or len(feeds) < MIN_CALIBRATION_FEEDS:
        raise PassError("needs calibration data, and none was given (pass feeds or use a model spec)", pass_name=pass_name)
    names = sorted({v.name for v in values if v.name})
    if cache is not None:
        found = cache.lookup(names, feeds)
        cache.hits += found is not None
        full = cache.sweep_for(feeds) if found is None else None
        if full is not None:
            known = {v.name: k for v, k in weight_inputs(model) if v.name}
            wanted = sorted({*names, *known})
            sizes = [known.get(n) or k for n, k in zip(wanted, _widths(model, wanted))]
            if all(k > 0 for k in sizes) and (streaming.applies(model) or cache.fits(sizes)):  # streamed: on disk
                total, heads = _sweep(model, wanted, full, sorted(cache.held_out), report)
                cache.store(full, total, heads)
                found = cache.lookup(names, feeds)
        if found is not None:
            return {n: _moments(s) for n, s in found.items() if s.tokens > 0}
    total, _ = _sweep(model, names, feeds, [], report)
    return {n: _moments(s) for n, s in total.items() if s.tokens > 0}


def weight_inputs(model: ir.Model) -> list[tuple[ir.Value, int]]:
    """The data input of every MatMul whose weight (input 1) is a 2-D constant, or the
    transpose of one (a tied LM head reads the embedding table so), in the main graph, with
    its channel count (the weight's first axis)."""
    seen: dict[int, tuple[ir.Value, int]] = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) >= 2:
            x, k = node.inputs[0], _weight_rows(node.inputs[1])
            if x is not None and k:
                seen.setdefault(id(x), (x, k))
    return list(seen.values())


def _weight_rows(w: ir.Value | None) -> int:
    """K of a MatMul weight [K, N] that is a constant or a Transpose of one; 0 otherwise."""
    if w is None:
        return 0
    if w.const_value is not None:
        shape = w.const_value.shape
        return int(shape[0]) if len(shape) == 2 else 0
    node = w.producer()
    if node is not None and node.op_type == "Transpose" and node.inputs and node.inputs[0] is not None:
        src = node.inputs[0].const_value
        perm = node.attributes.get_ints("perm", None)
        if src is not None and len(src.shape) == 2 and (perm is None or list(perm) == [1, 0]):
            return int(src.shape[1])
    return 0


def _widths(model: ir.Model, names: Sequence[str]) -> list[int]:
    """The last-axis size of each named value where the graph knows it (0: unknown), in one walk."""
    found = {v.name: v for v in model.graph.inputs}
    found.update((v.name, v) for n in model.graph for v in n.outputs)
    out = []
    for name in names:
        shape = found[name].shape if name in found else None
        out.append(int(shape[-1]) if shape is not None and len(shape) and isinstance(shape[-1], int) else 0)
    return out


def _sweep(model: ir.Model, names: list[str], feeds: Sequence[dict[str, np.ndarray]],
           heads_at: Sequence[int], report: Callable[[int, int], None] | None = None
           ) -> tuple[dict[str, Sums], dict[int, dict[str, Sums]]]:
    """Sums of each named value over the feeds (one ORT run a feed), and copies of them after
    the first n feeds for each n in ``heads_at``. The rows of a few feeds together make one
    float32 x^T x (:func:`_batch_rows`), added up in float64."""
    total: dict[str, Sums] = {}
    heads: dict[int, dict[str, Sums]] = {}
    streamed = streaming.applies(model)
    widths = _widths(model, names)
    if streamed:  # K x K float64 sums per value, and a copy per snapshot: say so now, not hours later
        copies = 1 + len({n for n in heads_at if 0 < n < len(feeds)})
        need = copies * sum(8 * k * k for k in widths)
        tempdirs.check_free(need, "the calibration sums of this streamed model")
    folder = SpillFolder() if streamed else None  # a streamed sweep's sums go to disk (a large model's)
    # rows of a few feeds go into one x^T x (see _batch_rows), the same feeds whether streamed or not
    batch = _batch_rows(widths)
    pending: dict[str, list[np.ndarray]] = {}

    def flush(name: str) -> None:
        parts = pending.pop(name, None)
        if parts:
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            s = total[name]
            np.add(s.gram, _gram(rows), out=s.gram)  # float64 += float32, without a float64 copy of the GEMM

    def add(i: int, name: str, out: np.ndarray) -> None:
        out = np.asarray(out)
        if out.ndim == 0:
            return
        rows = np.ascontiguousarray(token_rows(out, feeds[i].get("attention_mask")), dtype=np.float32)
        absum = np.abs(rows).sum(axis=0, dtype=np.float64)
        if name in total:
            s = total[name]
            s.abs_sum += absum
            s.tokens += rows.shape[0]
        else:
            total[name] = Sums(np.zeros((rows.shape[1], rows.shape[1])), absum, rows.shape[0])
        pending.setdefault(name, []).append(rows)
        if sum(len(r) for r in pending[name]) >= batch:
            flush(name)
        if i + 1 in heads_at and i + 1 < len(feeds):  # each value is seen feed by feed, in order
            flush(name)
            s = total[name]
            heads.setdefault(i + 1, {})[name] = s.snapshot(folder) if folder is not None else s.copy()

    if streamed:  # segment by segment: one segment's weights in memory at a time
        runner = streaming.StreamedModel(model, observe=names, what="model during calibration")

        def spill(done: int, segments: int) -> None:  # a segment's values are complete: their sums go to disk
            for name in runner.observe.get(done - 1, []) + (runner.observe.get(-1, []) if done == 1 else []):
                flush(name)  # the rows still waiting, before the sums leave memory
                for table in (total, *heads.values()):
                    if name in table:
                        table[name].spill(folder)
            if report is not None:
                report(done, segments)

        runner.run(feeds, on_value=add, outputs=False, progress=spill)
        return total, heads
    session, inputs = exposing_session(model, names, only=True)
    for i, feed in enumerate(feeds):
        outs = run_session(session, {k: v for k, v in feed.items() if k in inputs}, names)
        for name, out in zip(names, outs):
            add(i, name, out)
        del outs
        if report is not None:
            report(i + 1, len(feeds))
    for name in list(pending):
        flush(name)
    return total, heads


# x^T x of a few feeds' rows at once: one float32 GEMM over 2,048 rows takes 0.80x the time of
# four over 512 (K = 576 and 1,536, AMD EPYC, 2 cores), and the float64 sums are added to a
# quarter as often; the rows waiting for it are bounded in bytes over all values
GRAM_ROWS = 2048
GRAM_PENDING_BYTES = 512 << 20


def _batch_rows(channels: Sequence[int]) -> int:
    """Rows gathered per value before its x^T x: up to :data:`GRAM_ROWS`, fewer where the rows of
    every value (``channels``: their widths; 0 unknown, counted as 4,096) would pass
    :data:`GRAM_PENDING_BYTES`; at least 1 (each feed alone)."""
    width = sum(k if k > 0 else 4096 for k in channels)
    return max(1, min(GRAM_ROWS, GRAM_PENDING_BYTES // max(4 * width, 1)))


def _gram(rows: np.ndarray) -> np.ndarray:
    """rows^T rows [K, K] as one float32 GEMM, for sums kept in float64. (BLAS's symmetric rank-k update through
    SciPy does half the multiplications and was 2x faster alone, but made the SmolLM2 sweep 2.5x
    slower inside a run: SciPy's own BLAS threads contend with numpy's and ONNX Runtime's.)"""
    return rows.T @ rows


def _moments(s: Sums) -> InputMoments:
    n = max(s.tokens, 1)
    if s.spilled:  # read and divided in place on each access (whole, or a block of rows at a time)
        return InputMoments(LazyGram(lambda a, b: np.divide(g := s.rows(a, b), n, out=g), len(s.abs_sum)),
                            s.abs_sum / n, s.tokens)
    return InputMoments(s.gram / n, s.abs_sum / n, s.tokens)

"""Run a model segment by segment, so that memory follows one segment's weights and not the model's.

A large model's calibration sweep, reference run and validation used to build one ONNX Runtime
session over the whole graph: every weight resident at once (ORT's prepacked copy of each
MatMul weight on top of the mapped file pages). Here the main graph is cut, between nodes, where
few values cross the cut: in a transformer that is the residual stream between blocks (the
hidden state, and the values every block reads: the mask, the rotary tables). Each segment
becomes its own small model whose inputs are the values that cross into it; all feeds run
through segment 1, its crossing values are kept (an :class:`ActivationCache`, spilled to a
temporary folder past a bound), the session is released, and segment 2 runs on them, and so on.
Weights reach each session through ``SessionOptions.add_external_initializers`` (shared numpy
memory: memory-mapped external data is read by the segment that uses it and nothing else).

The arithmetic is the whole model's, node for node: outputs equal the whole-model session's up
to the float differences of ORT choosing other kernels for other graph shapes (none were seen on
the tested models; tests check equality within float tolerance).

:func:`policy` decides whether a run streams: ``auto`` (weights over :data:`AUTO_BYTES`),
``always`` or ``never``, set for a block of work with :func:`streaming` (``graphc.compress``'s
``stream`` option).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphc.core import tempdirs
from graphc.core.errors import GraphcError

AUTO_BYTES = 1 << 30  # ``auto`` streams models whose weights pass this
SEGMENT_BYTES = 256 << 20  # weights per segment (a segment holds at least one node)
CACHE_BYTES = 1 << 30  # activations kept in memory; past this they go to a temporary folder
MODES = ("auto", "always", "never")


class NotStreamable(GraphcError):
    """The graph cannot be cut (nodes out of order, or a non-tensor value crosses a cut)."""


@dataclass(frozen=True)
class Policy:
    mode: str = "auto"
    segment_bytes: int = SEGMENT_BYTES
    cache_bytes: int = CACHE_BYTES


_policy: contextvars.ContextVar[Policy] = contextvars.ContextVar("graphc_streaming", default=Policy())


@contextlib.contextmanager
def streaming(mode: str = "auto", *, segment_bytes: int | None = None, cache_bytes: int | None = None) -> Iterator[None]:
    """Runs inside stream by ``mode`` (see the module doc)."""
    if mode not in MODES:
        raise GraphcError(f"stream={mode!r}; supported: {', '.join(MODES)}")
    token = _policy.set(Policy(mode, segment_bytes or SEGMENT_BYTES, cache_bytes or CACHE_BYTES))
    try:
        yield
    finally:
        _policy.reset(token)


def policy() -> Policy:
    return _policy.get()


def applies(model: ir.Model) -> bool:
    """Whether runs over ``model`` stream under the current policy."""
    p = policy()
    if p.mode == "never":
        return False
    if p.mode == "always":
        return True
    from graphc.core.io import tensor_bytes

    return tensor_bytes(model) > AUTO_BYTES


# ---------------------------------------------------------------------------- the plan
@dataclass
class Segment:
    """Nodes ``start:stop`` of the main graph (``nodes``: their indices, with the constant
    nodes they need from anywhere: values computed from weights alone, such as scales decoded at
    load, are recomputed where they are read, never cached, so that ONNX Runtime still sees
    them as constants); ``reads``: the non-constant values they take from before the segment
    (graph inputs included); ``keeps``: values made here that later segments or the graph's
    outputs read; ``weights``: the initializers they read."""

    start: int
    stop: int
    nodes: list[int] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    keeps: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)


_NOT_CONSTANT = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _names_read(node: onnx.NodeProto) -> set[str]:
    from graphc.core.calibrate import _names_read as read

    return read(node)


def plan_segments(graph: onnx.GraphProto, weight_bytes: dict[str, int], segment_bytes: int) -> list[Segment]:
    """Cut ``graph``'s nodes into segments of about ``segment_bytes`` of weights each, at the
    positions where the fewest values cross (the latter half of each segment's range is searched,
    so that segments do not come out tiny)."""
    nodes = list(graph.node)
    n = len(nodes)
    initializers = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
    reads = [_names_read(node) for node in nodes]
    made_at: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for o in node.output:
            if o:
                made_at[o] = i
    # constant nodes: computed from weights alone; their weights count where they are used
    const_of: dict[str, set[str]] = {}  # constant value -> the initializers it is computed from
    const_nodes: set[int] = set()
    cone: dict[int, set[int]] = {}  # constant node -> the constant nodes it needs (itself included)
    for i, node in enumerate(nodes):
        if node.op_type in _NOT_CONSTANT or not all(r in initializers or r in const_of for r in reads[i]):
            continue
        const_nodes.add(i)
        inits = {r for r in reads[i] if r in initializers}
        need = {i}
        for r in reads[i]:
            if r in const_of:
                inits |= const_of[r]
                need |= cone[made_at[r]]
        cone[i] = need
        for o in node.output:
            if o:
                const_of[o] = inits
    last_use: dict[str, int] = {}
    for i, names in enumerate(reads):
        for name in names:
            if name in made_at and made_at[name] >= i:
                raise NotStreamable(f"node {nodes[i].name or nodes[i].op_type!r} reads {name!r} before it is made")
            last_use[name] = i
    outputs = {o.name for o in graph.output}
    for name in outputs:
        last_use[name] = n
    # values crossing position p (between node p-1 and node p): made before p, read at p or later
    delta = np.zeros(n + 2, np.int64)
    for name, made in made_at.items():
        if name in last_use and last_use[name] > made and (name not in const_of or name in outputs):
            delta[made + 1] += 1
            delta[last_use[name] + 1] -= 1
    crossing = np.cumsum(delta)[: n + 1]
    # weight bytes each node reads first (a weight read again later is loaded again there)
    def weights_of(i: int) -> set[str]:
        found = reads[i] & initializers
        for r in reads[i]:
            found |= const_of.get(r, set())
        return found

    first = np.zeros(n + 1, np.int64)
    seen: set[str] = set()
    for i in range(n):
        if i in const_nodes:
            continue
        for name in weights_of(i):
            if name not in seen:
                seen.add(name)
                first[i + 1] += weight_bytes.get(name, 0)
    cum = np.cumsum(first)  # cum[p]: bytes first read by nodes before p
    cuts = [0]
    while cuts[-1] < n:
        s = cuts[-1]
        allowed = [p for p in range(s + 1, n + 1) if cum[p] - cum[s] <= segment_bytes]
        if allowed and allowed[-1] == n:
            cuts.append(n)
            continue
        late = [p for p in allowed if cum[p] - cum[s] >= segment_bytes // 2]
        if not late:  # the next weight alone would pass the budget: the segment ends right after it
            cuts.append(allowed[-1] + 1 if allowed else s + 1)
            continue
        cuts.append(min(late, key=lambda p: (crossing[p], -p)))
    segments = []
    for s, e in zip(cuts, cuts[1:]):
        own = [i for i in range(s, e) if i not in const_nodes or any(o in outputs for o in nodes[i].output)]
        if not own:
            continue
        members = set(own)
        for i in own:
            for r in reads[i]:
                if r in const_of:
                    members |= cone[made_at[r]]
        seg = _segment(s, e, members, nodes, reads, initializers,
                       keep=lambda name, e=e: last_use.get(name, -1) >= e and (name not in const_of or name in outputs))
        segments.append(seg)
    return segments


def _segment(start: int, stop: int, members: set[int], nodes: Sequence[onnx.NodeProto], reads: Any,
             initializers: set[str], keep: Callable[[str], bool]) -> Segment:
    """The :class:`Segment` of nodes ``members`` (``reads[i]``: the names node ``i`` reads):
    what they read from outside, the weights among it, and the values they make that ``keep``."""
    inside = {o for i in members for o in nodes[i].output if o}
    read_here: set[str] = set().union(*(reads[i] for i in members))
    return Segment(start, stop, sorted(members), reads=sorted(read_here - inside - initializers),
                   keeps=sorted(name for name in inside if keep(name)), weights=sorted(read_here & initializers))


# ---------------------------------------------------------------------------- the cache
class ActivationCache:
    """Values per feed between segments: in memory up to ``max_bytes``, then as .npy files in a
    temporary folder (memory-mapped when read back)."""

    def __init__(self, count: int, max_bytes: int) -> None:
        self.values: list[dict[str, Any]] = [{} for _ in range(count)]
        self.max_bytes = max_bytes
        self.in_memory = 0
        self._folder: tempfile.TemporaryDirectory | None = None
        self._files = 0

    def put(self, i: int, name: str, array: Any) -> None:
        if not isinstance(array, np.ndarray):
            raise NotStreamable(f"value {name!r} crosses a segment cut and is not a tensor")
        if self.in_memory + array.nbytes > self.max_bytes and array.nbytes > 0:
            if self._folder is None:
                self._folder = tempdirs.folder("graphc-activations-")
            path = os.path.join(self._folder.name, f"{self._files}.npy")
            self._files += 1
            with tempdirs.writing("activations between segments", self._folder.name):
                np.save(path, array)
            self.values[i][name] = ("file", path)
            return
        self.values[i][name] = array
        self.in_memory += array.nbytes

    def get(self, i: int, name: str) -> np.ndarray:
        value = self.values[i][name]
        if isinstance(value, tuple):
            return np.load(value[1], mmap_mode="r")
        return value

    def drop(self, i: int, name: str) -> None:
        value = self.values[i].pop(name, None)
        if isinstance(value, tuple):
            os.unlink(value[1])
        elif value is not None:
            self.in_memory -= value.nbytes

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


# ---------------------------------------------------------------------------- running
@dataclass
class SegmentSession:
    """One segment's ORT session: ``reads`` come from earlier segments or the feed,
    ``switched`` are weights given at each run (a caller may replace them), ``fetch`` what it makes."""

    session: Any
    reads: list[str]
    switched: list[str]
    fetch: list[str]


class StreamedModel:
    """A model run segment by segment (see the module doc). ``observe``: intermediate values
    to hand to the ``on_value`` callback of :meth:`run` as each segment makes them;
    ``switchable``: initializers that are session inputs instead (given from the model's arrays
    unless a run replaces them: the sensitivity probes' quantized weights); ``threads``: ONNX
    Runtime threads of each segment's session (None: its default)."""

    def __init__(self, model: ir.Model, *, observe: Sequence[str] = (), segment_bytes: int | None = None,
                 what: str = "model", switchable: Sequence[str] = (), threads: int | None = None) -> None:
        from graphc.core.ort_large import weightless_proto

        self.what = what
        self.threads = threads  # ONNX Runtime threads per segment session (None: its default)
        self.switchable = set(switchable)
        self.proto, self.arrays = weightless_proto(model, always=self.switchable)
        self._mapped = {name: v.const_value for name, v in model.graph.initializers.items()
                        if isinstance(v.const_value, ir.ExternalTensor)}
        graph = self.proto.graph
        sizes = {name: a.nbytes for name, a in self.arrays.items()}
        sizes.update({t.name: _inline_bytes(t) for t in graph.initializer if t.name not in sizes})
        self.segments = plan_segments(graph, sizes, segment_bytes or policy().segment_bytes)
        self.inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.outputs = [o.name for o in graph.output]
        made = {o: k for k, seg in enumerate(self.segments) for i in seg.nodes for o in graph.node[i].output}
        self.observe: dict[int, list[str]] = {}
        for name in observe:
            if name in self.inputs:
                self.observe.setdefault(-1, []).append(name)
            elif name in made:
                self.observe.setdefault(made[name], []).append(name)
            elif name not in self.inputs:
                raise GraphcError(f"{what}: no node makes value {name!r}")
        self._input_types = {i.name: i.type for i in graph.input}
        made_anywhere = {o for node in graph.node for o in node.output}
        for name in self.outputs:
            if name not in made_anywhere and name not in self.inputs:
                raise NotStreamable(f"output {name!r} is a constant, not made by a node")

    def release(self, k: int) -> None:
        """Let the OS drop the memory-mapped pages of segment ``k``'s external weights (read
        again from the file if a later segment needs them): without this the pages every
        segment touched stay resident, and the peak grows with the model."""
        import mmap

        later = set().union(*(seg.weights for seg in self.segments[k + 1:])) if k + 1 < len(self.segments) else set()
        for name in self.segments[k].weights:
            raw = getattr(self._mapped.get(name), "raw", None)
            if raw is not None and name not in later and hasattr(mmap, "MADV_DONTNEED"):
                raw.madvise(mmap.MADV_DONTNEED)

    def needed_after(self, k: int, outputs: bool = True) -> set[str]:
        """Values read after segment ``k`` (the graph's outputs too, when ``outputs``)."""
        later = set(self.outputs) if outputs else set()
        for nxt in self.segments[k + 1:]:
            later.update(nxt.reads)
        return later

    def run(self, feeds: Sequence[dict[str, np.ndarray]], *, on_value: Callable[[int, str, np.ndarray], None] | None = None,
            outputs: bool | Sequence[str] = True, progress: Callable[[int, int], None] | None = None,
            at_segment: Callable[[int, ActivationCache], None] | None = None) -> list[list[Any]]:
        """Every feed through every segment; ``on_value(feed index, name, array)`` for each
        observed value (and observed graph inputs, first). Returns each feed's graph outputs
        (in the graph's order) when ``outputs`` is True, those named when it lists some (the
        others are not kept), else empty lists. ``at_segment(k, cache)`` before segment ``k``
        runs: the cache holds, per feed, the values entering it."""
        wanted = list(self.outputs) if outputs is True else list(outputs or [])
        cache = ActivationCache(len(feeds), policy().cache_bytes)
        try:
            if on_value is not None:
                for i, feed in enumerate(feeds):
                    for name in self.observe.get(-1, []):
                        on_value(i, name, np.asarray(feed[name]))
            for k in range(len(self.segments)):
                if at_segment is not None:
                    at_segment(k, cache)
                later = self.needed_after(k, outputs=False) | set(wanted)
                seen = self.observe.get(k, [])
                fetch = [n for n in self.segments[k].keeps if n in later] + [n for n in seen if n not in later]
                if not fetch:
                    if progress is not None:
                        progress(k + 1, len(self.segments))
                    continue
                part = self.segment_session(k, fetch, lambda name: cache.get(0, name))
                for i, feed in enumerate(feeds):
                    got = self.step(part, feed, lambda name, i=i: cache.get(i, name))
                    for name, value in zip(fetch, got):
                        if on_value is not None and name in seen:
                            on_value(i, name, value)
                        if name in later:
                            cache.put(i, name, value)
                    for name in list(cache.values[i]):
                        if name not in later:
                            cache.drop(i, name)
                del part
                self.release(k)
                if progress is not None:
                    progress(k + 1, len(self.segments))
            return [[np.asarray(feed[name]) if name in self.inputs and name not in cache.values[i]
                     else np.array(cache.get(i, name)) for name in wanted] for i, feed in enumerate(feeds)]
        finally:
            cache.close()

    def step(self, part: SegmentSession, feed: dict, value: Callable[[str], np.ndarray],
             replaced: dict[str, np.ndarray] | None = None) -> list[Any]:
        """One run of a segment: graph inputs from ``feed``, earlier values from ``value(name)``,
        switched weights from ``replaced`` or the model."""
        return step(part, feed, value, self.arrays, self.inputs, replaced, what=self.what)

    def segment_session(self, k: int, fetch: list[str], sample: Callable[[str], np.ndarray]) -> SegmentSession:
        """An ORT session over segment ``k`` that makes ``fetch`` (nodes that lead elsewhere
        left out), its inputs typed from ``sample(name)``, a value at hand for each."""
        model, arrays, reads, switched = self.segment_model(k, fetch, sample)
        where = f"segment {k + 1} of {len(self.segments)}"
        options = None
        if self.threads:
            from graphc.core.session import session_options

            options = session_options(self.threads)
        return SegmentSession(load(model, arrays, what=self.what, where=where, options=options), reads, switched,
                              list(fetch))

    def suffix(self, k: int) -> Segment:
        """Segments ``k`` to the last as one (a run from cut ``k`` to the graph's outputs)."""
        graph = self.proto.graph
        members = set().union(*(seg.nodes for seg in self.segments[k:]))
        initializers = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
        reads = {i: _names_read(graph.node[i]) for i in members}
        outputs = set(self.outputs)
        return _segment(self.segments[k].start, self.segments[-1].stop, members, graph.node, reads, initializers,
                        keep=outputs.__contains__)

    def segment_model(self, k: int | Segment, fetch: list[str], sample: Callable[[str], np.ndarray]
                      ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str], list[str]]:
        """Segment ``k`` (or a :class:`Segment`, such as :meth:`suffix`'s) as its own model (see
        :meth:`segment_session`): the protobuf, the weights it reads from this model's arrays
        (placeholders in the protobuf), the values it reads from earlier segments or the feed,
        and the switchable weights it takes as inputs."""
        from graphc.core.calibrate import _drop_dead_nodes

        seg = self.segments[k] if isinstance(k, int) else k
        graph = self.proto.graph
        sub = onnx.GraphProto(name=f"{graph.name}-segment-{seg.start}")
        sub.node.extend(graph.node[i] for i in seg.nodes)
        for name in fetch:
            sub.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
        _drop_dead_nodes(sub)
        read = set().union(*(_names_read(node) for node in sub.node)) if len(sub.node) else set()
        reads = [n for n in seg.reads if n in read]
        weights = [n for n in seg.weights if n in read and n not in self.switchable]
        switched = [n for n in seg.weights if n in read and n in self.switchable]
        wanted = set(weights)
        sub.initializer.extend(t for t in graph.initializer if t.name in wanted)
        sub.sparse_initializer.extend(t for t in graph.sparse_initializer if t.name in wanted)
        for name in reads:
            if name in self._input_types:
                sub.input.append(onnx.ValueInfoProto(name=name, type=self._input_types[name]))
                continue
            value = sample(name)
            if not isinstance(value, np.ndarray):
                raise NotStreamable(f"value {name!r} crosses a segment cut and is not a tensor")
            sub.input.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), None))
        for name in switched:
            array = self.arrays[name]
            sub.input.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                                                list(array.shape)))
        model = onnx.ModelProto()
        model.ir_version = self.proto.ir_version
        model.opset_import.extend(self.proto.opset_import)
        model.functions.extend(self.proto.functions)
        model.graph.CopyFrom(sub)
        arrays = {name: self.arrays[name] for name in weights if name in self.arrays}
        return model, arrays, reads, switched


def step(part: SegmentSession, feed: dict, value: Callable[[str], np.ndarray], weights: dict[str, np.ndarray],
         inputs: Collection[str], replaced: dict[str, np.ndarray] | None = None, *, what: str = "model") -> list[Any]:
    """One run of a part of a model: graph ``inputs`` from ``feed``, earlier values from
    ``value(name)``, switched weights from ``replaced`` or ``weights``."""
    from graphc.core.errors import ValidationError
    from graphc.core.interrupt import run_session

    given = {n: (feed[n] if n in inputs else value(n)) for n in part.reads}
    for n in part.switched:
        given[n] = replaced[n] if replaced and n in replaced else weights[n]
    try:
        return run_session(part.session, given, part.fetch)
    except GraphcError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT's own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime failed to run the {what}: {first}") from None


def load(model: onnx.ModelProto, arrays: dict[str, np.ndarray], *, what: str, where: str, options: Any = None) -> Any:
    """An ORT session over a part of a model (:meth:`StreamedModel.segment_model`), its
    placeholder weights given as ``arrays``; a load failure is one line naming ``where``."""
    from graphc.core.errors import ValidationError
    from graphc.core.ort_large import session_from_proto

    try:
        return session_from_proto(model, arrays, options=options)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime cannot load the {what} ({where}): {first}") from None


def _inline_bytes(t: onnx.TensorProto) -> int:
    try:
        return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001 - string tensors and the like
        return 0

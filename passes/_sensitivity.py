"""Per-layer quantization sensitivity, measured on calibration data.

A *layer* here is one stored weight that ``quantize-nbits`` or ``quantize-gather-block``
would quantize: the constant B of a ``MatMul`` (stored [K, N], quantized as W^T [N, K] along K,
as ``MatMulNBits`` does) or the table of an embedding ``Gather`` (stored [vocab, hidden],
quantized along hidden). A weight read by several nodes (a table tied to an LM head) is one
layer.

Its sensitivity to a configuration (bits, block size) is the model's output error on the
calibration feeds with *only that layer* quantized and dequantized back to float, everything
else exact: the mean over the output rows (tokens; padding left out where the feed has an
``attention_mask`` of the row's shape) of ``1 - cosine(row, reference row)``. To first order
the errors of independently quantized layers add (the error vectors are uncorrelated, so their
squared norms add, and ``1 - cos`` is half the squared norm of the error's orthogonal part
relative to the row's), which is what lets a planner predict the whole model's error as a sum.

One ONNX Runtime session serves every measurement: the layers' weights become graph inputs
(their initializers removed), so each measurement is a run with one input swapped, not a new
session. The quantized weights are computed on the fly (``_blockquant``, the passes' own math).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.passes import _blockquant as bq
from graphc.passes._gram_factor import thin_factor
from graphc.passes._quant import const_array

# "log8": float16 scales that compact-scales then stores as one byte each (plus 8 bytes a tensor)
SCALE_BYTES = {"float32": 4, "float16": 2, "log8": 1}


@dataclass(frozen=True, order=True)
class QuantConfig:
    bits: int
    block_size: int

    @property
    def label(self) -> str:
        return f"int{self.bits}/b{self.block_size}"


@dataclass
class Layer:
    """A stored weight to plan for, and the nodes that read it."""

    name: str  # readable: the module scope of its first reader, else the initializer's name
    kind: str  # "matmul" or "embedding"
    value: ir.Value  # the initializer
    transposed: bool  # the quantizer sees the stored array transposed (a MatMul B stored [K, N])
    nodes: list[ir.Node] = field(default_factory=list)
    # an embedding table that a MatMul also reads through a Transpose (a tied LM head): one
    # stored weight, its precision set on the head (quantize-gather-block shares the head's
    # MatMulNBits weights), so its blocks must divide the hidden size
    tied: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) as quantized: blocks run along cols."""
        s = tuple(int(d) for d in self.value.const_value.shape)
        return (s[1], s[0]) if self.transposed else (s[0], s[1])

    @property
    def params(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def view(self) -> np.ndarray:
        """float32 [rows, cols]: what the quantizer sees."""
        a = self.value.const_value.numpy().astype(np.float32, copy=False)
        return np.ascontiguousarray(a.T if self.transposed else a)

    def stored(self, view: np.ndarray) -> np.ndarray:
        """A [rows, cols] array back in the stored orientation."""
        return np.ascontiguousarray(view.T if self.transposed else view, dtype=np.float32)


def config_bytes(rows: int, cols: int, config: QuantConfig, *, symmetric: bool, scale_dtype: str) -> int:
    """Bytes a [rows, cols] weight takes at ``config`` (``BlockQuant.nbytes``: packed codes,
    scales, packed zero points when asymmetric)."""
    n_blocks = -(-cols // config.block_size)
    codes = rows * n_blocks * config.block_size * config.bits // 8
    zeros = 0 if symmetric else rows * -(-n_blocks * config.bits // 8)
    return int(codes + rows * n_blocks * SCALE_BYTES[scale_dtype] + zeros)


def find_layers(
    graph: ir.Graph, *, matmuls: bool = True, embeddings: bool = True, min_elements: int = 0,
    min_rows: int = 64, min_cols: int = 0, exclude: Sequence[str] = (),
) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The plannable layers of a graph, and (node, reason) for the candidates left out."""
    layers: dict[int, Layer] = {}
    skipped: list[tuple[str, str]] = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if matmuls and node.op_type == ops.MATMUL and len(node.inputs) == 2:
            value, transposed, kind = node.inputs[1], True, "matmul"
            table = _transposed_table(value)
            if table is not None:  # B = Transpose(table): the quantizer's [N, K] view is the table itself
                value, transposed = table, False
        elif embeddings and node.op_type == ops.GATHER and node.attributes.get_int("axis", 0) == 0:
            value, transposed, kind = node.inputs[0], False, "embedding"
            arr = const_array(value)
            if arr is None or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
                continue  # index arithmetic on shapes, not a table
            tied = matmuls and any(u.op_type != ops.GATHER for u, _ in value.uses()) and _tied_to_heads(value)
            if arr.shape[0] < min_rows and not tied:  # a tied table follows its head
                skipped.append((node.name or node.op_type, f"{arr.shape[0]} rows < min_rows={min_rows}"))
                continue
            others = sorted({u.op_type for u, _ in value.uses() if u.op_type != ops.GATHER})
            if others and (not matmuls or not _tied_to_heads(value)):
                skipped.append((node.name or node.op_type, f"table also read by {', '.join(others)} (tied to an LM head: "
                                "quantize-nbits sets its precision, quantize-gather-block shares it)"))
                continue
        else:
            continue
        label = node.name or node.op_type
        scope = node.metadata_props.get("graphc.scope", "")
        if any(s in label or s in scope for s in exclude):
            skipped.append((label, "excluded by option"))
            continue
        if value is None or value.const_value is None or value.name not in graph.initializers:
            if kind == "matmul" and const_array(value) is None:
                continue  # activation x activation
            skipped.append((label, "weight is not a float32 initializer read directly (a Cast/Transpose/Constant)"))
            continue
        tensor = value.const_value
        if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            skipped.append((label, f"weight is a {len(tensor.shape)}-D {tensor.dtype}, not a 2-D float32 weight"))
            continue
        if int(np.prod(tensor.shape)) < min_elements:
            skipped.append((label, f"weight has fewer than min_elements={min_elements} elements"))
            continue
        cols = tensor.shape[0] if transposed else tensor.shape[1]
        if cols < min_cols:
            skipped.append((label, f"{cols} values along the blocks < the smallest block {min_cols} (padding would dominate)"))
            continue
        layer = layers.get(id(value))
        if layer is None:
            layer = layers[id(value)] = Layer(scope or value.name or label, kind, value, transposed)
        elif layer.transposed != transposed:  # read as a table and as a MatMul B: not one orientation
            skipped.append((label, "weight read both as a table and as an untransposed MatMul B"))
            continue
        layer.nodes.append(node)
    for key, layer in list(layers.items()):
        kinds = {n.op_type for n in layer.nodes}
        if kinds == {ops.MATMUL, ops.GATHER}:  # a tied table: the head leads
            layer.tied, layer.kind = True, "matmul"
            layer.nodes.sort(key=lambda n: n.op_type != ops.MATMUL)
            head = layer.nodes[0]
            layer.name = head.metadata_props.get("graphc.scope", "") or head.name or layer.name
        elif kinds == {ops.GATHER} and any(u.op_type != ops.GATHER for u, _ in layer.value.uses()):
            del layers[key]  # its head was excluded: the table stays float for it
            skipped += [(n.name or n.op_type, "table tied to an LM head that is not planned (excluded)")
                        for n in layer.nodes]
    return list(layers.values()), skipped


def _transposed_table(value: ir.Value | None) -> ir.Value | None:
    """The 2-D initializer behind ``value`` when ``value`` is its plain Transpose."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    perm = producer.attributes.get_ints("perm", None)
    inner = producer.inputs[0]
    if perm is not None and list(perm) != [1, 0]:
        return None
    if inner is None or inner.const_value is None or len(inner.const_value.shape) != 2:
        return None
    return inner


def _tied_to_heads(table: ir.Value) -> bool:
    """Every non-Gather reader of ``table`` is a Transpose read only as MatMul weights."""
    for user, _ in table.uses():
        if user.op_type == ops.GATHER:
            continue
        if _transposed_table(user.outputs[0]) is not table:
            return False
        if any(u.op_type != ops.MATMUL or i != 1 for u, i in user.outputs[0].uses()):
            return False
    return True


@dataclass
class Measurement:
    layer: Layer
    config: QuantConfig
    nbytes: int
    error: float  # mean 1 - cosine of output rows, only this layer quantized
    weight_error: float  # ||W - Q(W)|| / ||W||


def weight_input_proto(model: ir.Model, layers: Sequence[Layer]):
    """``model`` as a ModelProto in which the layers' weights are graph inputs (their
    initializers removed): one ORT session then serves every measurement."""
    import onnx

    from graphc.core.io import inline_external_data

    names = {layer.value.name for layer in layers}
    with inline_external_data(model):
        proto = ir.serde.serialize_model(model)
    kept = [t for t in proto.graph.initializer if t.name not in names]
    moved = [t for t in proto.graph.initializer if t.name in names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    moved += _constants_out(proto.graph, names - {t.name for t in moved})
    for t in moved:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return proto


def _constants_out(graph, names: set[str]) -> list:
    """Tensors of the ``Constant`` nodes (in ``graph`` or any subgraph below it) whose outputs
    are among ``names``, their nodes removed: the main graph's inputs of the same names take
    their place (a subgraph reads an outer-scope value by name)."""
    import onnx

    found = []
    if not names:
        return found
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] in names:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value.t)
                tensor.name = node.output[0]
                found.append(tensor)
                continue
        keep.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found += _constants_out(sub, names)
                sub_init = [t for t in sub.initializer if t.name in names]
                if sub_init:
                    rest = [t for t in sub.initializer if t.name not in names]
                    del sub.initializer[:]
                    sub.initializer.extend(rest)
                    found += sub_init
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    return found


def weight_input_session(model: ir.Model, layers: Sequence[Layer]):
    """An ORT session of ``model`` in which the layers' weights are graph inputs."""
    from graphc.core.session import make_session

    return make_session(weight_input_proto(model, layers), what="model during sensitivity measurement")


def row_errors(out: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """1 - cosine of each output row (the last axis) against the reference; padding rows
    (``mask`` == 0, where the mask has the rows' leading shape) left out."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.ndim == 0:
        out, ref = out.reshape(1, 1), ref.reshape(1, 1)
    if mask is not None and out.ndim == 3 and out.shape[:2] == np.shape(mask):
        keep = np.asarray(mask) != 0
        out, ref = out[keep], ref[keep]
    else:
        out, ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
    dot = (out * ref).sum(-1)
    norms = np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(np.abs(out - ref).max(-1, initial=0) == 0, 1.0, 0.0))
    return 1.0 - np.clip(cos, -1.0, 1.0)


def _rows(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[rows, last axis] of an output, padding rows (``mask`` == 0) left out."""
    if mask is not None and a.ndim == 3 and a.shape[:2] == np.shape(mask):
        return a[np.asarray(mask) != 0]
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def log_softmax(a: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, float32."""
    a = np.asarray(a, dtype=np.float32)
    shifted = a - a.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def row_kl(out: np.ndarray, ref_logp: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(out)) in nats of each row, from the reference's
    log-probabilities (rows already selected by ``_rows``). For a language model's logits the
    mean over tokens is, to first order, the rise of the log-perplexity on text drawn from the
    reference model: ``exp(mean KL) - 1`` approximates the relative perplexity rise."""
    logq = log_softmax(out)
    return (np.exp(ref_logp) * (ref_logp - logq)).sum(axis=-1, dtype=np.float64)


class SoftmaxRef:
    """The reference rows' next-token distributions for :func:`kl_rows`: ``p`` [rows, vocab]
    float32, ``plogp`` = sum p log p and ``psum`` = sum p per row (float64; 1 up to float32
    rounding, kept exact so that small KLs are not swamped), computed once per evaluator."""

    __slots__ = ("p", "plogp", "psum")

    def __init__(self, logits: np.ndarray) -> None:
        logp = log_softmax(logits)
        self.p = np.exp(logp)
        self.plogp = np.einsum("ij,ij->i", self.p, logp, dtype=np.float64)
        self.psum = self.p.sum(axis=-1, dtype=np.float64)

    def __getstate__(self):
        return (self.p, self.plogp, self.psum)

    def __setstate__(self, state) -> None:
        self.p, self.plogp, self.psum = state


def kl_rows(out: np.ndarray, ref: SoftmaxRef) -> np.ndarray:
    """:func:`row_kl` from a :class:`SoftmaxRef`: KL = sum p log p - sum p out + sum p x
    logsumexp(out), four passes over the logits instead of ten (a 512 x 49152 block: 0.11 s
    instead of 0.18 s), the rows split over the CPU's cores (numpy's loops run on one) with the
    exponentials in a buffer each thread keeps (0.04 s; every row is computed as alone)."""
    out = np.asarray(out, dtype=np.float32)
    parts = min(_kl_threads(), max(1, len(out) // KL_MIN_ROWS))
    if parts <= 1:
        return _kl_part(out, ref, 0, len(out))
    edges = np.linspace(0, len(out), parts + 1).astype(int)
    return np.concatenate(list(_kl_pool().map(lambda ab: _kl_part(out, ref, *ab), zip(edges[:-1], edges[1:]))))


KL_MIN_ROWS = 64  # rows per thread, at least
KL_MAX_THREADS = 8
KL_THREADS: int | None = None  # threads the KL may use (None: the cores this process may run on, at most 8)
_kl_buffers: dict[int, np.ndarray] = {}  # thread id -> its exponentials' buffer (release_kl_buffers)
_kl_pools: dict[int, ThreadPoolExecutor] = {}  # process id -> its pool: a forked child makes its own


def _kl_threads() -> int:
    if KL_THREADS:
        return KL_THREADS
    try:
        return min(len(os.sched_getaffinity(0)), KL_MAX_THREADS)
    except AttributeError:  # no affinity call on this OS
        return min(os.cpu_count() or 1, KL_MAX_THREADS)


def _kl_pool() -> ThreadPoolExecutor:
    """This process's pool (threads start as tasks need them; a pool's threads do not survive a
    fork, and a child using its parent's would wait forever)."""
    pid = os.getpid()
    if pid not in _kl_pools:
        _kl_pools[pid] = ThreadPoolExecutor(KL_MAX_THREADS, thread_name_prefix="graphc-kl")
    return _kl_pools[pid]


def release_kl_buffers() -> None:
    """Let the KL's buffers go (a probe phase is over: ~50 MB a thread for SmolLM2's vocabulary)."""
    _kl_buffers.clear()


def _kl_part(out: np.ndarray, ref: SoftmaxRef, a: int, b: int) -> np.ndarray:
    """:func:`kl_rows` of rows a..b."""
    rows = out[a:b]
    size = rows.size
    thread = threading.get_ident()
    buffer = _kl_buffers.get(thread)
    if buffer is None or buffer.size < size:
        buffer = _kl_buffers[thread] = np.empty(size, np.float32)
    top = rows.max(axis=-1)
    shifted = np.subtract(rows, top[:, None], out=buffer[:size].reshape(rows.shape))
    lse = np.log(np.exp(shifted, out=shifted).sum(axis=-1, dtype=np.float64)) + top
    return ref.plogp[a:b] - np.einsum("ij,ij->i", ref.p[a:b], rows, dtype=np.float64) + ref.psum[a:b] * lse


METRICS = ("cosine", "kl", "tensor")
LOGITS = "logits"


def measured_outputs(outputs: Sequence[str], metric: str) -> list[str]:
    """The outputs a metric is taken on: KL is defined on next-token scores, so a language
    model's ``logits`` alone when it has them (a KV-cache decoder's ``present.*`` tensors are not
    distributions); every output otherwise."""
    if metric == "kl" and LOGITS in outputs:
        return [LOGITS]
    return list(outputs)


def tensor_error(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """1 - cosine of a whole output against the reference (what the validation gate's output
    cosine checks): steadier than row cosines on maps that are mostly near zero (a detector's
    probabilities), where a row of background makes its cosine noise."""
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    norms = np.linalg.norm(out) * np.linalg.norm(ref)
    cos = float(out @ ref) / norms if norms > 0 else (1.0 if np.array_equal(out, ref) else 0.0)
    return np.array([1.0 - min(max(cos, -1.0), 1.0)])


class Evaluator:
    """Output error of the model with some layers' weights replaced, on calibration feeds.

    ``metric``: ``cosine`` (mean 1 - cosine of output rows), ``kl`` (mean KL divergence of
    the rows' softmax from the reference's, in nats: for logits of a language model) or
    ``tensor`` (mean 1 - cosine of whole outputs).

    :meth:`payload` is everything a worker process needs to rebuild it
    (:meth:`from_payload`) without the IR model: the ORT model with the weights as inputs,
    the weights, feeds and the reference outputs (computed once, here)."""

    def __init__(self, model: ir.Model, layers: Sequence[Layer], feeds: Sequence[dict], metric: str = "cosine"):
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}; supported: {', '.join(METRICS)}")
        from graphc.core.session import make_session

        self.metric = metric
        self.layers = list(layers)
        self.proto = weight_input_proto(model, self.layers)
        self.session = make_session(self.proto, what="model during sensitivity measurement")
        inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = measured_outputs([o.name for o in self.session.get_outputs()], metric)
        self.weights = {layer.value.name: layer.value.const_value.numpy() for layer in self.layers}
        self.feeds = [{k: v for k, v in feed.items() if k in inputs} for feed in feeds]
        self.masks = [feed.get("attention_mask") for feed in feeds]
        self.reference = [self.session.run(self.outputs, {**feed, **self.weights}) for feed in self.feeds]
        if metric == "kl":  # the reference's distributions, once
            self.reference = [[SoftmaxRef(_rows(r, mask)) for r in refs]
                              for refs, mask in zip(self.reference, self.masks)]

    def payload(self) -> dict:
        """Picklable parts for :meth:`from_payload` (numpy arrays travel zero-copy through Ray)."""
        model = np.frombuffer(self.proto.SerializeToString(), np.uint8)  # an array: not copied per task
        return {"model": model, "metric": self.metric, "outputs": self.outputs,
                "weights": {k: np.asarray(v) for k, v in self.weights.items()}, "feeds": self.feeds,
                "masks": self.masks, "reference": self.reference}

    @classmethod
    def from_payload(cls, payload: dict, threads: int | None = None, session=None) -> Evaluator:
        """The evaluator in another process; ``threads``: ONNX Runtime's intra-op threads
        (``session``: one already made of the payload's model, in this process)."""
        import onnx

        from graphc.core.session import make_session

        self = cls.__new__(cls)
        self.metric, self.outputs, self.layers = payload["metric"], payload["outputs"], []
        self.proto = None if session is not None else onnx.ModelProto.FromString(payload["model"].tobytes())
        if session is None:
            session = make_session(self.proto, threads=threads, what="model during sensitivity measurement")
        self.session = session
        self.weights, self.feeds = payload["weights"], payload["feeds"]
        self.masks, self.reference = payload["masks"], payload["reference"]
        return self

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """Mean over every output row of every feed of the metric vs the unquantized model."""
        weights = {**self.weights, **replaced}
        errs = []
        for feed, mask, ref in zip(self.feeds, self.masks, self.reference):
            errs += feed_errors(self.metric, self.session.run(self.outputs, {**feed, **weights}), ref, mask)
        return float(np.concatenate(errs).mean()) if errs else 0.0


def feed_errors(metric: str, got: Sequence[np.ndarray], ref: Sequence, mask: np.ndarray | None) -> list[np.ndarray]:
    """``metric`` of each output row of one feed's outputs against the reference's (SoftmaxRef
    for ``kl``, arrays otherwise); :meth:`Evaluator.error` is the mean over every feed's."""
    if metric == "kl":
        return [kl_rows(_rows(o, mask), r) for o, r in zip(got, ref)]
    if metric == "tensor":
        return [tensor_error(o, r) for o, r in zip(got, ref)]
    return [row_errors(o, r, mask) for o, r in zip(got, ref)]


def _scale_array_dtype(scale_dtype: str) -> type:
    """The block scales' array type while quantizing (``log8`` scales are rounded from float16)."""
    return np.float16 if scale_dtype in ("float16", "log8") else np.float32


def quantize_view(layer: Layer, view: np.ndarray, config: QuantConfig, *, symmetric: bool, method: bq.Method,
                  scale_dtype: str, hessian: np.ndarray | None = None, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight quantized at ``config`` and dequantized: (stored orientation, the
    quantizer's [rows, cols] view). ``gptq`` needs the Hessian of the MatMul's input [cols, cols]."""
    dtype = _scale_array_dtype(scale_dtype)
    if method is bq.Method.GPTQ:
        quant = bq.gptq(view, hessian, config.bits, config.block_size, symmetric=symmetric, scale_dtype=dtype,
                        damp=damp, act_order=True)
    else:
        quant = bq.quantize(view, config.bits, config.block_size, symmetric=symmetric, method=method,
                            scale_dtype=dtype)
    deq = quant.dequantize()
    return layer.stored(deq), deq


def hessian_norm2(view: np.ndarray, hessian: np.ndarray) -> float:
    """tr(W H W^T), the denominator of :func:`relative_error` with a Hessian (pass it as ``den``
    when one weight's candidates are compared: it is the same for all of them)."""
    return float(((view @ np.asarray(hessian, np.float64)) * view).sum())


def relative_error(view: np.ndarray, deq: np.ndarray, hessian: np.ndarray | None = None, *,
                   den: float | None = None) -> float:
    """||W - Q(W)|| / ||W||; with a Hessian H of the layer's input, the output-weighted form
    sqrt(tr(D H D^T) / tr(W H W^T)) (what GPTQ minimises; ``den``: :func:`hessian_norm2` of
    this view and Hessian, if known). A weight of more than CHUNKED_ABOVE elements (a large
    model's LM head) is summed a block of rows at a time."""
    if view.size > CHUNKED_ABOVE:
        return _chunked_relative_error(view, lambda i, j: deq[i:j], hessian)
    d = np.asarray(view, np.float64) - deq
    if hessian is None:  # not np.linalg.norm: a whole-array norm is BLAS's dot, whose sum order
        # depends on its thread count (1 in a Ray worker), and the plan must not depend on where it ran
        den = float(np.sqrt(np.square(np.asarray(view, np.float64)).sum()))
        return float(np.sqrt(np.square(d).sum())) / den if den > 0 else 0.0
    h = np.asarray(hessian, np.float64)
    den = hessian_norm2(view, h) if den is None else den
    return float(np.sqrt(max(((d @ h) * d).sum(), 0.0) / den)) if den > 0 else 0.0


def _chunked_relative_error(view: np.ndarray, deq_rows: Callable[[int, int], np.ndarray],
                            hessian: np.ndarray | None, factor: np.ndarray | None = None) -> float:
    """:func:`relative_error` summed a block of rows at a time; ``deq_rows(i, j)``: rows i:j of
    the dequantized weight (a slice, or made for those rows alone). ``factor``: the Hessian given
    as F [r, K] with H = F^T F instead (tr(D H D^T) = ||D F^T||^2)."""
    rows = max(1, CHUNKED_ABOVE // max(view.shape[1], 1) // 16)
    h = None if hessian is None else np.asarray(hessian, np.float64)
    ft = None if factor is None else np.ascontiguousarray(factor.T)

    def form(e: np.ndarray) -> float:
        if ft is not None:
            return float(np.square(e @ ft).sum())
        return float(np.square(e).sum() if h is None else ((e @ h) * e).sum())

    den = num = 0.0
    for i in range(0, view.shape[0], rows):
        v = np.asarray(view[i:i + rows], np.float64)
        e = v - deq_rows(i, i + rows)
        den += form(v)
        num += form(e)
    if ft is not None:
        return float(np.sqrt(num / den)) if den > 0 else 0.0
    if h is None:
        return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else 0.0
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def candidate_errors(view: np.ndarray, candidates: Sequence[QuantConfig], hessian: np.ndarray | None = None, *,
                     symmetric: bool, scale_dtype: str, tokens: int = 0) -> dict[QuantConfig, float]:
    """Each candidate's weight error: :func:`relative_error` of ``view`` against its
    round-to-nearest quantization (tr(W H W^T) computed once for all). A weight past
    CHUNKED_ABOVE is quantized a block of rows at a time (block quantization is row by row: the
    same codes) and never held dequantized whole: a 32000 x 2048 LM head's float32 copy is 262 MB.
    ``tokens``: how many rows the Hessian averages (0: unknown); few next to its width, the
    forms go through its thin factor (passes/_gram_factor.py: the same errors, far fewer products)."""
    dtype = _scale_array_dtype(scale_dtype)

    def deq(config: QuantConfig, i: int, j: int) -> np.ndarray:
        return bq.quantize(view[i:j], config.bits, config.block_size, symmetric=symmetric, method=bq.Method.RTN,
                           scale_dtype=dtype).dequantize()

    factor = thin_factor(hessian, tokens) if hessian is not None and tokens > 0 else None
    if factor is not None:
        return {c: _chunked_relative_error(view, lambda i, j, c=c: deq(c, i, j), None, factor) for c in candidates}
    if view.size > CHUNKED_ABOVE:
        return {c: _chunked_relative_error(view, lambda i, j, c=c: deq(c, i, j), hessian) for c in candidates}
    den = hessian_norm2(view, hessian) if hessian is not None else None
    return {c: relative_error(view, deq(c, 0, view.shape[0]), hessian, den=den) for c in candidates}


CHUNKED_ABOVE = 1 << 25  # weights with more elements (not SmolLM2-135M's head: 28M): relative_error sums by row blocks

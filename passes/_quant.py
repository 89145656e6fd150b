"""Shared quantization math and IR helpers (used by every quantization pass)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def symmetric_int8(
    w: np.ndarray, axis: int | None, scale_dtype=np.float32, qmax: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 on [-qmax, qmax] (127, or 63 for 7-bit weights); ``axis`` is the axis
    that keeps its own scale (None: one scale for the tensor). Returns (q int8, scale with
    ``axis`` kept, in ``scale_dtype``); q is computed against the scale as stored, so a float16
    scale costs nothing beyond its own rounding."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(initial=0.0), dtype=np.float32)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.abs(w).max(axis=reduce, keepdims=True, initial=0.0)
    scale = np.asarray(amax / float(qmax), dtype=np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    scale = scale.astype(scale_dtype_for(scale, scale_dtype))
    q = np.clip(np.rint(w / scale.astype(np.float32)), -qmax, qmax).astype(np.int8)
    return q, scale


# float16 keeps a scale to ~3 significant digits between its smallest normal number and its
# largest; outside (weights beyond ~8e6 or below ~1e-5 at 127 levels) it turns to inf or loses
# its digits to subnormals and zero, and the weights with it.
FLOAT16_SCALE_RANGE = (float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max))


def scale_dtype_for(scale: np.ndarray, wanted) -> type:
    """``wanted`` (np.float16 or np.float32) unless float16 cannot hold every (nonzero) scale:
    then float32."""
    if np.dtype(wanted) != np.float16:
        return wanted
    nonzero = np.abs(np.asarray(scale, np.float32))
    nonzero = nonzero[nonzero > 0]
    lo, hi = FLOAT16_SCALE_RANGE
    if nonzero.size and (nonzero.min() < lo or nonzero.max() > hi or not np.isfinite(nonzero).all()):
        return np.float32
    return np.float16


def target_form(context, option: str, pass_name: str, stats=None):
    """The int8 formulation a weight-quantizing pass writes: ``option`` (u8s8 | u8u8 | u8s7), or
    the target's own for ``auto``; one that saturates on the target is refused. Recorded in
    ``stats.details["int8_form"]`` when ``stats`` is given."""
    from graphc.core.errors import UnsupportedError
    from graphc.core.pass_base import choice
    from graphc.core.target import GEMM_ONLY_FORMS, Int8Form, exact_forms

    target = context.target_info()
    form = target.int8_form if option == "auto" else choice(Int8Form, option, "form", pass_name)
    if form in GEMM_ONLY_FORMS:
        raise UnsupportedError(f"form={form.value!r} bounds weight pairs along a MatMul's K axis, which this pass's "
                               f"weights do not have; use u8s8, u8u8 or u8s7", pass_name=pass_name)
    if form not in exact_forms(target):
        raise UnsupportedError(f"form={form.value!r} saturates on target {target.name}", pass_name=pass_name)
    if stats is not None:
        stats.details["int8_form"] = form.value
    return form


def check_max_error(value: float, what: str) -> None:
    """An error budget option: a mean 1 - cosine in [0, 1), 0 meaning no budget."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"max_error={value}; a mean 1 - cosine in [0, 1) (0: quantize every {what})")


U8U8_ZERO_POINT = 128  # int8 codes stored as uint8: code + 128, read back with this zero point


def int8_weight(
    w: np.ndarray, axis: int | None, form: str, scale_dtype=np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A weight in one of the int8 formulations of :class:`graphc.target.Int8Form`:
    (codes, scale, zero point or None). ``u8s8``: int8 codes on [-127, 127], no zero point;
    ``u8s7``: int8 codes on [-63, 63]; ``u8u8``: the ``u8s8`` codes + 128 as uint8 with a
    scalar uint8 zero point of 128 (the same values: dequantized, all three agree up to the
    7-bit grid); ``u8s8p``: int8 codes whose adjacent pairs along axis 0 (K of a [K, N] MatMul
    weight) have |q[2i]| + |q[2i+1]| <= 128 (:func:`pair_bounded_int8`)."""
    if form == "u8s8p":
        q, s = pair_bounded_int8(w, axis, scale_dtype)
        return q, s, None
    if form == "u8s7":
        q, s = symmetric_int8(w, axis, scale_dtype, qmax=63)
        return q, s, None
    q, s = symmetric_int8(w, axis, scale_dtype)
    if form == "u8u8":
        return (q.astype(np.int16) + U8U8_ZERO_POINT).astype(np.uint8), s, np.array(U8U8_ZERO_POINT, np.uint8)
    return q, s, None


PAIR_LIMIT = 128  # 255 · 128 = 32,640: an adjacent u8×s8 product pair fits vpmaddubsw's int16


def pair_sums(a: np.ndarray) -> np.ndarray:
    """|a[2i]| + |a[2i+1]| along K of a [K, N] array, an odd K's last row paired with zero: the
    pairs a u8×s8 ``vpmaddubsw`` adds into one int16."""
    u = np.abs(np.pad(a, ((0, a.shape[0] % 2), (0, 0))))
    return u[0::2] + u[1::2]


def pair_bounded_int8(
    w: np.ndarray, axis: int | None, scale_dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of a [K, N] weight with |q[2i]| + |q[2i+1]| <= 128 in every column
    (``axis`` 1: a scale per column; None: one scale): the scale is the larger of max|w| / 127
    and the largest pair's |w[2i]| + |w[2i+1]| / 128, so the bound holds before rounding; a pair
    that rounding pushes to 129 gives a unit back from the code rounded up the most. An odd K's
    last row pairs with nothing (the kernel pads it with zero)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or axis not in (1, -1, None):
        raise ValueError(f"pair-bounded int8 needs a [K, N] weight with per-column or one scale (got {w.shape}, axis {axis})")
    k = w.shape[0]
    padded = np.pad(w, ((0, k % 2), (0, 0)))
    u = np.abs(padded)
    pairs = u[0::2] + u[1::2]  # pair_sums(w), from the padded copy made once
    if axis is None:
        amax, pmax = np.array(u.max(initial=0.0)), np.array(pairs.max(initial=0.0))
    else:
        amax, pmax = u.max(axis=0, keepdims=True, initial=0.0), pairs.max(axis=0, keepdims=True, initial=0.0)
    scale = np.maximum(amax / 127.0, pmax / float(PAIR_LIMIT)).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    scale = scale.astype(scale_dtype_for(scale, scale_dtype))
    x = u / scale.astype(np.float32)
    q = np.clip(np.rint(x), 0, 127)
    a, b = q[0::2], q[1::2]  # views: edits below land in q
    over = a + b > PAIR_LIMIT
    if over.any():
        a_up = (a - x[0::2]) >= (b - x[1::2])
        a -= over & a_up
        b -= over & ~a_up
    q = (np.sign(padded) * q)[:k].astype(np.int8)
    return q, scale


def nonfinite_reason(w: np.ndarray) -> str | None:
    """Why a weight cannot be quantized because of its values (NaN or ±inf: no finite scale
    represents it), or None. Zero columns and constant rows need no reason: the quantizers
    give them a scale of 1."""
    if np.issubdtype(w.dtype, np.floating) and not np.all(np.isfinite(w)):
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
        return f"weight holds {bad} NaN/inf value(s): no finite scale represents it"
    return None


def weight_problem(w: np.ndarray, min_elements: int) -> str | None:
    """Why a quantizer leaves a constant weight alone for its size or values, or None: fewer
    elements than the pass's ``min_elements``, or NaN/inf (:func:`nonfinite_reason`)."""
    if w.size < min_elements:
        return f"weight has {w.size} elements < min_elements={min_elements}"
    return nonfinite_reason(w)


def outer_product_reason(node: ir.Node, w: np.ndarray) -> str | None:
    """Why a 2-D constant weight with one input row (K = 1: no sum, an outer product) is no
    linear layer to quantize, or None. fuse-ort builds rotary's caches as positions [N, 1] x
    inv_freq [1, D/2]: a quantized inverse frequency (or int8 positions) turns every angle by
    position x its error."""
    rows = w.shape[1] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w.shape[0]
    if rows != 1:
        return None
    return "K=1 input rows: an outer product (such as rotary's positions x inv_freq), not a linear layer"


def subgraphs(graph: ir.Graph):
    """The bodies of If/Loop/Scan nodes in ``graph``, nested ones included."""
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
                yield from subgraphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield g
                    yield from subgraphs(g)


def constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer with a unique name and return its value."""
    base = name
    i = 1
    while name in graph.initializers:
        name = f"{base}_{i}"
        i += 1
    from graphc.core import scratch

    store = scratch.current()  # a large model's new float weights go to a temporary file
    if store is not None and isinstance(array, np.ndarray) and store.wants(array):
        tensor = store.tensor(array, name)
    else:
        tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
    if producer is not None and producer.op_type == "Cast" and producer.domain == "":
        inner = const_array(producer.inputs[0])  # e.g. a float16 constant behind a Cast
        to = producer.attributes.get_int("to", 0)
        if inner is not None and to:
            return inner.astype(ir.DataType(to).numpy())
    return None


def embedding_table(node: ir.Node, stats, min_rows: int) -> np.ndarray | None:
    """The float32 [rows, width] table a default-domain Gather on axis 0 reads, or None.
    Gathers of index arithmetic (integer or 1-D constants) are not tables and pass silently;
    a table the quantizers cannot take is skipped with the reason in ``stats``."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return None
    label = node.name or node.op_type
    table = const_array(node.inputs[0])
    if table is None or table.ndim < 2 or not np.issubdtype(table.dtype, np.floating):
        return None  # index arithmetic on shapes, not an embedding table
    if table.ndim != 2 or table.dtype != np.float32:
        stats.skip(label, f"table is {table.ndim}-D {table.dtype}, not a 2-D float32 table")
        return None
    if node.attributes.get_int("axis", 0) != 0:
        stats.skip(label, "Gather on an axis other than 0")
        return None
    if table.shape[0] < min_rows:
        stats.skip(label, f"{table.shape[0]} rows < min_rows={min_rows}")
        return None
    reason = nonfinite_reason(table)
    release_pages(node.inputs[0])  # the scan read every page: let them go (bounded memory)
    if reason is not None:
        stats.skip(label, reason)
        return None
    return table


def gemm_terms(node: ir.Node, stored: np.ndarray, stats, label: str) -> tuple[bool, float, np.ndarray | None] | None:
    """How a constant-weight MatMul/Gemm uses its stored weight [K, N] (or [N, K] under
    transB): (transpose, alpha, bias) with the bias C * beta as an [N] float32 vector. None,
    with the skip recorded in ``stats``, for a Gemm this cannot express (transA, a C that is
    not a constant vector)."""
    if node.op_type != "Gemm":
        return False, 1.0, None
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        stats.skip(label, "Gemm with transA=1")
        return None
    transpose = bool(attrs.get_int("transB", 0))
    n = stored.shape[0] if transpose else stored.shape[1]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_array(node.inputs[2])
        if c is None or c.size not in (1, n):
            stats.skip(label, "Gemm bias C is not a constant vector")
            return None
        bias = np.broadcast_to(c.astype(np.float32).reshape(-1), (n,)) * attrs.get_float("beta", 1.0)
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    return transpose, attrs.get_float("alpha", 1.0), bias


def gemm_weight(node: ir.Node, stored: np.ndarray, stats, label: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The weight as the MatMul/Gemm applies it, [K, N] float32 contiguous with alpha folded
    in, and the bias (``gemm_terms``); None, with the skip recorded, where it cannot say."""
    terms = gemm_terms(node, stored, stats, label)
    if terms is None:
        return None
    transpose, alpha, bias = terms
    w = stored.T if transpose else stored
    w = w * alpha if alpha != 1.0 else w
    return np.ascontiguousarray(w, dtype=np.float32), bias


def release_pages(value: ir.Value | None) -> None:
    """Let the OS drop the memory-mapped pages of the external weight behind ``value`` (through
    a Transpose or Cast of it) once a pass has read it: onnx_ir maps external data and the
    pages a pass touched would otherwise stay resident until the pass ends, so that peak
    memory grew with the model instead of its largest tensor. Re-reading later faults the
    pages back in from the file."""
    import mmap

    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type not in ("Transpose", "Cast") or not producer.inputs:
            return
        value = producer.inputs[0]
    tensor = value.const_value if value is not None else None
    raw = getattr(tensor, "raw", None)
    if isinstance(tensor, ir.ExternalTensor) and raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        raw.madvise(mmap.MADV_DONTNEED)


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    if model.opset_imports.get(domain, 0) < version:
        model.opset_imports[domain] = version


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove initializers nothing reads any more (the float weights a pass replaced)."""
    for value in list(graph.initializers.values()):
        if not value.uses() and value not in graph.outputs and value not in graph.inputs:
            del graph.initializers[value.name]

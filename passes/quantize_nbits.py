"""Weight-only block-wise 2/4/8-bit quantization of constant-weight MatMul (and Gemm).

The weight W [K, N] is quantized along K in blocks of ``block_size`` (16..256, powers of two;
0 = one block per output channel, QDQ only), each block with its own scale and, when
asymmetric, an integer zero point (math and quantizers in ``_blockquant``: ``rtn``, ``mse``,
``hqq`` need nothing but the weights; ``gptq`` needs calibration data: the Hessian X^T X of
each MatMul's input over the calibration tokens, padding left out, and fails with a PassError
without it). Activations stay float. Emitted as (``emit``):

- ``ms`` (default): com.microsoft ``MatMulNBits``: B uint8 [N, n_blocks, block*bits/8] (codes
  packed low bits first; K padded to whole blocks), scales [N*n_blocks], packed uint8 zero
  points [N, ceil(n_blocks*bits/8)] when asymmetric, attributes K, N, bits, block_size,
  ``accuracy_level`` (4: ORT quantizes the activations to int8 per block and uses its integer
  kernels). ORT's CPU kernel runs bits 2, 4 and 8. A Gemm's bias goes to the op's bias input.
- ``qdq``: standard ONNX: ``DequantizeLinear`` (opset 21, int4/uint4 or int8/uint8 weights,
  ``block_size`` attribute along K, or per-axis for ``block_size=0``) → ``MatMul``. ORT fuses
  the 4-bit form into ``MatMulNBits`` itself. The model is converted to opset 21 if older.

``head_bits`` gives the MatMul(s) whose output is a graph output (an LM head) other bits,
e.g. 8 to keep a language model's logits accurate. A MatMul on which ``mixed-precision`` wrote
a plan (node metadata ``graphc.quant.bits``/``graphc.quant.block_size``) gets the planned bits
and block size instead of ``bits``/``head_bits``/``block_size``. Each ``MatMulNBits`` records a digest of
its float weight (node metadata ``graphc.nbits.weight``) so that ``quantize-gather-block``
can find an embedding table tied to it and store the two once.

Scales are stored as ``scale_dtype`` (float16 by default, behind a ``Cast`` that ORT folds at
load); the codes are fitted to the rounded scales.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import PassError, UnsupportedError
from graphc.core.executor import resolve as resolve_executor
from graphc.core.pass_base import GraphcPass, PassStats, choice, copy_scope
from graphc.passes import _blockquant as bq
from graphc.passes._quant import (constant, drop_unused_initializers, ensure_opset, gemm_terms, nonfinite_reason,
                                  outer_product_reason, release_pages, subgraphs)
from graphc.passes._weights import META_WEIGHT, constant_weight, planned_config, weight_digest
from graphc.core.registry import register

QDQ_OPSET = 21
_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


class Emit(str, enum.Enum):
    MS = "ms"
    QDQ = "qdq"


@dataclass(frozen=True)
class NBitsOptions:
    bits: int = 4
    block_size: int = 32  # 16..256, power of two; 0 = per output channel (emit="qdq" only)
    symmetric: bool = False
    method: str = bq.Method.MSE.value
    emit: str = Emit.MS.value
    accuracy_level: int = 4  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
    scale_dtype: str = "float16"
    head_bits: int = 0  # bits for MatMuls that produce a graph output (an LM head); 0 = ``bits``
    exclude: tuple[str, ...] = ()  # substrings of node names or scopes to leave in float
    min_elements: int = 0  # smaller weights stay float
    damp: float = 0.01  # method="gptq": added to the Hessian diagonal, x its mean
    act_order: bool = False  # method="gptq": columns by decreasing Hessian diagonal (static block parameters)
    # method="gptq": then each block's scale re-chosen (codes kept) to lower the output error on the
    # calibration Hessian (_blockquant.refit_scales); held out on SmolLM2 layers: 1-3% lower error
    refit_scales: bool = False
    # method="gptq": then this many sweeps of coordinate descent on the codes for GPTQ's own
    # objective, scales kept (_blockquant.refine_codes); 0 = GPTQ's codes as they are
    refine_sweeps: int = 0


@dataclass
class _Candidate:
    node: ir.Node
    stored: np.ndarray  # the constant as stored (often a view of memory-mapped external data)
    bias: np.ndarray | None  # [N] float32 (Gemm C * beta)
    key: int  # identity of the stored weight (shared weights are quantized once)
    head: bool
    transpose: bool = False  # Gemm transB
    alpha: float = 1.0  # Gemm alpha

    @property
    def shape(self) -> tuple[int, int]:
        k, n = self.stored.shape
        return (n, k) if self.transpose else (k, n)

    @property
    def weight(self) -> np.ndarray:
        """[K, N] float32 with Gemm's transB and alpha applied: made on demand, not kept, so
        that the pass holds one float weight at a time (large models)."""
        w = self.stored.T if self.transpose else self.stored
        w = w.astype(np.float32, copy=False)
        return np.ascontiguousarray(w * self.alpha if self.alpha != 1.0 else w)


def check_block(bits: int, block_size: int, emit: Emit, name: str) -> None:
    """UnsupportedError listing what is supported for a bits/block/emit combination."""
    if emit is Emit.MS:
        if bits not in bq.MATMUL_NBITS_BITS:
            raise UnsupportedError(
                f"bits={bits} with emit='ms' (MatMulNBits); supported: "
                f"{', '.join(map(str, bq.MATMUL_NBITS_BITS))}",
                pass_name=name,
            )
        if block_size not in bq.BLOCK_SIZES:
            extra = (" (per-channel, block_size=0, needs emit='qdq'; the largest MatMulNBits block is 256)"
                     if block_size == 0 else "")
            raise UnsupportedError(
                f"block_size={block_size} with emit='ms' (MatMulNBits){extra}; supported: "
                f"{', '.join(map(str, bq.BLOCK_SIZES))}",
                pass_name=name,
            )
    else:
        if bits not in bq.QDQ_BITS:
            raise UnsupportedError(
                f"bits={bits} with emit='qdq': ONNX has no {bits}-bit tensor type; supported with emit='qdq': "
                f"{', '.join(map(str, bq.QDQ_BITS))} (int4/uint4, int8/uint8); with emit='ms': "
                f"{', '.join(map(str, bq.MATMUL_NBITS_BITS))}",
                pass_name=name,
            )
        if block_size not in (0, *bq.BLOCK_SIZES):
            raise UnsupportedError(
                f"block_size={block_size} with emit='qdq'; supported: 0 (per-channel), "
                f"{', '.join(map(str, bq.BLOCK_SIZES))}",
                pass_name=name,
            )


@register
class QuantizeNBits(GraphcPass):
    name = "quantize-nbits"
    summary = "weight-only block-wise 2/4/8-bit MatMul weights (MatMulNBits or QDQ DequantizeLinear), rtn/mse/hqq/gptq"
    Options = NBitsOptions
    uses_executor = True  # each weight's quantization (GPTQ), one work item a weight

    @property
    def needs_calibration(self) -> bool:
        return self.options.method == bq.Method.GPTQ.value

    @property
    def calibration_texts(self) -> int:
        """Calibration texts GPTQ wants (``_blockquant.GPTQ_CALIBRATION_TEXTS``)."""
        return bq.GPTQ_CALIBRATION_TEXTS if self.needs_calibration else 0

    def _validate(self) -> tuple[Emit, bq.Method]:
        o = self.options
        emit = choice(Emit, o.emit, "emit", self.name)
        method = choice(bq.Method, o.method, "method", self.name)
        check_block(o.bits, o.block_size, emit, self.name)
        if o.head_bits:
            check_block(o.head_bits, o.block_size, emit, self.name)
        if method is bq.Method.HQQ and o.symmetric:
            raise UnsupportedError("method='hqq' optimises zero points: needs symmetric=false; "
                                   "supported with symmetric=true: rtn, mse", pass_name=self.name)
        if o.scale_dtype not in _SCALE_DTYPES:
            raise UnsupportedError(f"scale_dtype={o.scale_dtype!r}; supported: {', '.join(_SCALE_DTYPES)}",
                                   pass_name=self.name)
        if o.accuracy_level not in range(5):
            raise UnsupportedError(f"accuracy_level={o.accuracy_level}; supported: 0, 1, 2, 3, 4", pass_name=self.name)
        if o.refine_sweeps < 0 or (o.refine_sweeps and method is not bq.Method.GPTQ):
            raise UnsupportedError(f"refine_sweeps={o.refine_sweeps}: a count >= 0, of sweeps over GPTQ's codes "
                                   "(method='gptq' only)", pass_name=self.name)
        return emit, method

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        emit, method = self._validate()
        graph = model.graph
        cands = [c for n in list(graph) if (c := self._candidate(graph, n, stats)) is not None]
        # If/Loop/Scan bodies: no calibration statistics reach inside, so GPTQ's Hessians do
        # not exist there; those weights take the clipping search (mse) instead
        bodies = [(g, replace(c, head=False))  # a body's output is no LM head
                  for g in subgraphs(graph) for n in list(g) if (c := self._candidate(g, n, stats)) is not None]
        if not cands and not bodies:
            stats.notes.append("no constant-weight MatMul/Gemm found")
            return False
        if emit is Emit.MS:
            ensure_opset(model, ops.MS_DOMAIN, ops.MS_OPSET)
        else:
            _ensure_qdq_opset(model, self.name)
        gptq = method is bq.Method.GPTQ
        hessians = self._hessians(model, cands, stats) if gptq and cands else {}
        if bodies:
            body_method = bq.Method.MSE if gptq else method
            stats.add("subgraph_matmuls", len(bodies))
            if gptq:
                stats.notes.append(f"{len(bodies)} MatMul/Gemm weights in If/Loop/Scan bodies quantized with mse, "
                                   "not gptq (no calibration statistics inside bodies)")
        work = [(graph, c, method) for c in cands] + [(g, c, body_method) for g, c in bodies]
        producers = [(g, c.node.inputs[1].producer()) for g, c, _ in work]
        # each entry's precision and the key of its codes: codes are shared where the float weight
        # was (a body may read the main graph's, outer scope, never a sibling body's)
        entries, keys = [], set()
        for where, cand, how in work:
            bits = self.options.head_bits if cand.head and self.options.head_bits else self.options.bits
            bits, block, is_planned = planned_config(cand.node, bits, self.options.block_size)
            if is_planned:
                check_block(bits, block, emit, self.name)
            key = (cand.key, bits, block, 0 if where is graph else id(where))
            if where is not graph and (cand.key, bits, block, 0) in keys:
                key = (cand.key, bits, block, 0)
            first = key not in keys
            keys.add(key)
            entries.append((where, cand, how, bits, block, is_planned, key, first))
        jobs = [(cand, how, bits, block) for _, cand, how, bits, block, _, _, first in entries if first]
        quantized = self._quantized(jobs, hessians, stats)
        done: dict[tuple[int, int, int, int], tuple[bq.BlockQuant, dict[str, ir.Value]]] = {}
        errors: list[float] = []
        for i, (where, cand, how, bits, block, is_planned, key, first) in enumerate(entries):
            self.context.report(self.name, i, len(entries))
            if is_planned:
                stats.add("matmuls_at_planned_precision")
            if first:
                quant, error, digest, before = next(quantized)
                errors.append(error)
                stats.add("weight_bytes_before", before)
                stats.add("weight_bytes_after", quant.nbytes())
                done[key] = quant, {"digest": digest}
            quant, cache = done[key]
            if emit is Emit.MS:
                new = self._emit_nbits(where, cand, quant, cache)
            else:
                new = self._emit_qdq(where, cand, quant, cache)
            # the codes now live in the graph, packed: a shared weight's later uses read only
            # bits/block/symmetric, so drop the unpacked arrays (a byte per weight) now
            done[key] = _emptied(quant), cache
            for n in new:
                copy_scope(cand.node, n)
            ir.convenience.replace_nodes_and_values(
                where, cand.node, [cand.node], new, cand.node.outputs, [new[-1].outputs[0]]
            )
            stats.add("gemms_quantized" if cand.node.op_type == ops.GEMM else "matmuls_quantized")
            if cand.head and self.options.head_bits and not is_planned:
                stats.add("head_matmuls_at_head_bits")
        stats.counts["mean_rel_weight_error"] = round(float(np.mean(errors)), 6)
        stats.counts["max_rel_weight_error"] = round(float(np.max(errors)), 6)
        for where, producer in {id(p): (g, p) for g, p in producers if p is not None}.values():
            # a Transpose/Cast that only fed a replaced weight is dead now
            if (producer.graph is where and producer.op_type in ("Transpose", ops.CAST)
                    and not any(o.uses() or o in where.outputs for o in producer.outputs)):
                where.remove(producer, safe=True)
        for g in [graph, *subgraphs(graph)]:  # a body's weights may be outer-scope initializers
            drop_unused_initializers(g)
        return True

    def _quantized(self, jobs: list[tuple[_Candidate, bq.Method, int, int]], hessians: Mapping[str, np.ndarray],
                   stats: PassStats) -> Iterator[tuple[bq.BlockQuant, float, str, int]]:
        """Each job's (codes, relative weight error, float weight digest, float bytes), in job
        order and as the emitting loop asks for them: in this process one weight at a time; with
        workers (``--workers``/``--ray``) in batches (:func:`_batches`), each weight and its
        Hessian sent with its task (the codes come back; the graph is edited here)."""
        o = self.options
        shared = _JobOptions(o.symmetric, o.scale_dtype, o.damp, o.act_order, o.refit_scales, o.refine_sweeps)
        executor = resolve_executor(self.context.executor)

        def job(cand: _Candidate, how: bq.Method, bits: int, block: int) -> _Job:
            w_t = np.ascontiguousarray(cand.weight.T)
            release_pages(cand.node.inputs[1])
            name = cand.node.inputs[0].name
            h = None
            if how is bq.Method.GPTQ:  # read once (maybe from disk)
                # GPTQ works on a float32 copy past LARGE_HESSIAN inputs: read it as float32 (by
                # rows from disk) rather than hold the float64 matrix beside that copy (~1.5 GB at
                # 11008 wide); the same codes (refit_scales reads the float64 one)
                wide = w_t.shape[1] > bq.LARGE_HESSIAN and not o.refit_scales and hasattr(hessians, "float32")
                h = hessians.float32(name) if wide else hessians[name]
            return _Job(w_t, h, how.value, bits, block)

        if executor.workers <= 1:
            for spec in jobs:
                yield quantize_job(shared, job(*spec))
            return
        stats.counts["workers"] = executor.workers
        for part in _batches(jobs, executor.workers):
            yield from executor.map(quantize_job, (job(*spec) for spec in part), shared=shared,
                                    labels=[f"weight of {spec[0].node.name}" for spec in part])

    def _hessians(self, model: ir.Model, cands: list[_Candidate], stats: PassStats) -> Mapping[str, np.ndarray]:
        """H = mean over calibration tokens of x x^T for each distinct MatMul input x
        (padding positions, where the feed's attention_mask is 0, left out)."""
        feeds = self.context.calibration
        if not feeds:
            raise PassError(
                "method='gptq' needs calibration data (the layers' input statistics), and none was given: "
                "use a model exported by graphc (its recipe's texts) or pass calibration feeds in the PassContext",
                pass_name=self.name,
            )
        from graphc.core.calibrate import input_moments

        moments = input_moments(model, [c.node.inputs[0] for c in cands], feeds, pass_name=self.name,
                                cache=self.context.moments,
                                report=lambda done, total: self.context.report("calibration sweep", done, total))
        stats.notes.append(f"gptq Hessians from {len(feeds)} calibration batches ({self.context.calibration_source}), "
                           f"{max((m.tokens for m in moments.values()), default=0)} tokens")
        missing = [c.node.name for c in cands if c.node.inputs[0].name not in moments]
        if missing:
            raise PassError(f"no calibration statistics for the inputs of {', '.join(missing[:3])}", pass_name=self.name)
        from graphc.core.calibrate import Grams

        return Grams(moments)  # each read when a weight is quantized

    # ------------------------------------------------------------------ matching
    def _candidate(self, graph: ir.Graph, node: ir.Node, stats: PassStats) -> _Candidate | None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in (ops.MATMUL, ops.GEMM):
            return None
        label = node.name or node.op_type
        scope = node.metadata_props.get("graphc.scope", "")
        if any(s in label or s in scope for s in self.options.exclude):
            stats.skip(label, "excluded by option")
            return None
        if len(node.inputs) < 2 or node.inputs[0] is None:
            return None
        found = constant_weight(node.inputs[1])
        if found is None:
            stats.skip(label, "weight is not a constant (activation x activation MatMul)")
            return None
        w, key = found
        if w.dtype != np.float32:  # a float16 constant without a Cast to float: a float16 MatMul
            stats.skip(label, f"weight dtype {w.dtype} is not float32 (float32 MatMuls only)")
            return None
        if w.ndim != 2:
            stats.skip(label, f"weight is {w.ndim}-D, not 2-D")
            return None
        if w.size < self.options.min_elements:
            stats.skip(label, f"weight has {w.size} elements < min_elements={self.options.min_elements}")
            return None
        if (reason := outer_product_reason(node, w)) is not None:
            stats.skip(label, reason)
            return None
        reason = nonfinite_reason(w)
        release_pages(node.inputs[1])  # the scan read every page: let them go (bounded memory)
        if reason is not None:
            stats.skip(label, reason)
            return None
        x = node.inputs[0]
        for what, v in (("activation", x), ("weight", node.inputs[1])):
            if v.dtype is not None and v.dtype != ir.DataType.FLOAT:
                stats.skip(label, f"{what} dtype {v.dtype} is not float32 (float32 MatMuls only)")
                return None
        if x.shape is not None and len(x.shape) < 2 and node.op_type == ops.MATMUL:
            stats.skip(label, "1-D activation (MatMulNBits needs A of rank >= 2)")
            return None
        terms = gemm_terms(node, w, stats, label)
        if terms is None:
            return None
        transpose, alpha, bias = terms
        head = any(o in graph.outputs for o in node.outputs)
        return _Candidate(node, w, bias, key, head, transpose, alpha)

    # ------------------------------------------------------------------ emitting
    def _scales(
        self, graph: ir.Graph, base: str, scales: np.ndarray, cache: dict, key: str
    ) -> tuple[ir.Value, list[ir.Node]]:
        """The stored scales (once per weight) and, for float16, a Cast to float32 before the consumer."""
        if key not in cache:
            cache[key] = constant(graph, f"{base}_scales", scales)
        stored = cache[key]
        if scales.dtype == np.float32:
            return stored, []
        cast = ir.node(ops.CAST, [stored], attributes={"to": ir.DataType.FLOAT})
        return cast.outputs[0], [cast]

    def _emit_nbits(self, graph: ir.Graph, cand: _Candidate, quant: bq.BlockQuant, cache: dict) -> list[ir.Node]:
        base = _base_name(cand)
        if "B" not in cache:
            b, s, zp = bq.matmul_nbits_arrays(quant)
            cache["B"] = constant(graph, f"{base}_q{quant.bits}", b)
            cache["scales_array"] = s
            cache["zp"] = constant(graph, f"{base}_zero_points", zp) if zp is not None else None
        scales, pre = self._scales(graph, base, cache["scales_array"], cache, "scales")
        inputs: list[ir.Value | None] = [cand.node.inputs[0], cache["B"], scales, cache["zp"]]
        if cand.bias is not None:
            inputs += [None, constant(graph, f"{base}_bias", cand.bias)]
        while inputs[-1] is None:
            inputs.pop()
        k, n = cand.shape
        node = ir.node(
            ops.MATMUL_NBITS, inputs, domain=ops.MS_DOMAIN,
            attributes={"K": k, "N": n, "bits": quant.bits, "block_size": quant.block_size,
                        "accuracy_level": self.options.accuracy_level},
        )
        node.name = f"{cand.node.name}_q{quant.bits}" if cand.node.name else ""
        node.metadata_props[META_WEIGHT] = cache["digest"]
        return [*pre, node]

    def _emit_qdq(self, graph: ir.Graph, cand: _Candidate, quant: bq.BlockQuant, cache: dict) -> list[ir.Node]:
        import ml_dtypes

        base = _base_name(cand)
        per_channel = self.options.block_size == 0
        if "data" not in cache:
            if quant.symmetric:
                codes = quant.signed_codes().T  # [K, N]
                dtype = ml_dtypes.int4 if quant.bits == 4 else np.int8
                zp = None
            else:
                codes = quant.codes().T
                dtype = ml_dtypes.uint4 if quant.bits == 4 else np.uint8
                zp = quant.zero.T  # [n_blocks, N]
            cache["data"] = constant(graph, f"{base}_q{quant.bits}", np.ascontiguousarray(codes).astype(dtype))
            scales = np.ascontiguousarray(quant.scale.T)  # [n_blocks, N]
            if per_channel:
                scales = scales.reshape(-1)
                zp = zp.reshape(-1) if zp is not None else None
            cache["scales_array"] = scales
            cache["zp"] = None
            if zp is not None:
                cache["zp"] = constant(graph, f"{base}_zero_points", np.ascontiguousarray(zp).astype(dtype))
        scales, pre = self._scales(graph, base, cache["scales_array"], cache, "scales")
        attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": quant.block_size}
        inputs = [cache["data"], scales] + ([cache["zp"]] if cache["zp"] is not None else [])
        dq = ir.node("DequantizeLinear", inputs, attributes=attrs)
        dq.name = f"{cand.node.name}_dq" if cand.node.name else ""
        mm = ir.node(ops.MATMUL, [cand.node.inputs[0], dq.outputs[0]])
        mm.name = cand.node.name
        nodes = [*pre, dq, mm]
        if cand.bias is not None:
            nodes.append(ir.node(ops.ADD, [mm.outputs[0], constant(graph, f"{base}_bias", cand.bias)]))
        return nodes


BATCH_BYTES = 512 << 20  # weights and Hessians sent to workers at once (besides one per worker)


def _batches(jobs: list[tuple[_Candidate, bq.Method, int, int]], workers: int) -> Iterator[list]:
    """Consecutive jobs, at most 4 per worker, whose float weights and Hessians (float64) stay
    under :data:`BATCH_BYTES` unless that leaves a worker idle: the driver holds a batch's arrays
    and Ray's object store a copy (a 5632-wide input's Hessian alone is 254 MB)."""
    part: list = []
    held = 0
    for spec in jobs:
        k, n = spec[0].shape
        size = 4 * k * n + (8 * k * k if spec[1] is bq.Method.GPTQ else 0)
        if part and (len(part) >= 4 * workers or (held + size > BATCH_BYTES and len(part) >= workers)):
            yield part
            part, held = [], 0
        part.append(spec)
        held += size
    if part:
        yield part


@dataclass(frozen=True)
class _JobOptions:
    """What every weight's quantization shares (sent to each worker once)."""

    symmetric: bool
    scale_dtype: str
    damp: float
    act_order: bool
    refit_scales: bool
    refine_sweeps: int = 0


@dataclass(frozen=True)
class _Job:
    w_t: np.ndarray  # [N, K] float32
    hessian: np.ndarray | None  # [K, K], GPTQ only
    method: str
    bits: int
    block: int


def quantize_job(shared: _JobOptions, job: _Job) -> tuple[bq.BlockQuant, float, str, int]:
    """One weight quantized (a work item: in this process or on a worker): its codes, relative
    error, the float weight's digest and its float bytes."""
    how = bq.Method(job.method)
    scale_dtype = _SCALE_DTYPES[shared.scale_dtype]
    if how is bq.Method.GPTQ:
        quant = bq.gptq(job.w_t, job.hessian, job.bits, job.block, symmetric=shared.symmetric,
                        scale_dtype=scale_dtype, damp=shared.damp, act_order=shared.act_order)
        if shared.refine_sweeps > 0:
            quant = bq.refine_codes(job.w_t, job.hessian, quant, damp=shared.damp, sweeps=shared.refine_sweeps)
        if shared.refit_scales:
            quant = bq.refit_scales(job.w_t, job.hessian, quant)
    else:
        quant = bq.quantize(job.w_t, job.bits, job.block, symmetric=shared.symmetric, method=how,
                            scale_dtype=scale_dtype)
    return quant, quant.relative_error(job.w_t), weight_digest(job.w_t), int(job.w_t.size * 4)


def _emptied(quant: bq.BlockQuant) -> bq.BlockQuant:
    """The same quantization's parameters with zero rows (no arrays held)."""
    from dataclasses import replace

    return replace(quant, q=np.empty((0, *quant.q.shape[1:]), quant.q.dtype),
                   scale=np.empty((0, *quant.scale.shape[1:]), quant.scale.dtype),
                   zero=np.empty((0, *quant.zero.shape[1:]), quant.zero.dtype))


def _base_name(cand: _Candidate) -> str:
    value = cand.node.inputs[1]
    producer = value.producer() if value is not None else None
    if value is not None and value.const_value is None and producer is not None and producer.inputs:
        value = producer.inputs[0] or value  # a Transpose/Cast of the stored weight
    return (value.name if value is not None else None) or cand.node.name or "w"


def _ensure_qdq_opset(model: ir.Model, name: str) -> None:
    """Blocked and 4-bit DequantizeLinear need opset 21 and IR 10."""
    current = model.opset_imports.get("", 0)
    if current < QDQ_OPSET:
        try:
            from onnxscript import version_converter

            version_converter.convert_version(model, QDQ_OPSET)
        except Exception as e:  # noqa: BLE001 - the converter raises many kinds
            raise UnsupportedError(
                f"emit='qdq' needs opset {QDQ_OPSET} (blocked int4 DequantizeLinear); converting the model "
                f"from opset {current} failed: {e}", pass_name=name,
            ) from None
        ensure_opset(model, "", QDQ_OPSET)
    if model.ir_version < 10:
        model.ir_version = 10

"""2/4/8-bit block-quantized embedding tables: ``Gather(table, ids)`` → com.microsoft
``GatherBlockQuantized``.

The table [vocab, hidden] is quantized along ``hidden`` in blocks of ``block_size`` (math in
``_blockquant``) and stored as ORT's uint8 layout: codes packed along the last axis, low bits
first ([vocab, hidden*bits/8]), scales [vocab, n_blocks], packed uint8 zero points [vocab,
ceil(n_blocks*bits/8)] when asymmetric (without them ORT uses 2^(bits-1), the symmetric grid).
Only the gathered rows are dequantized, inside the op. A Gather on which ``mixed-precision``
wrote a plan (node metadata ``graphc.quant.bits``/``graphc.quant.block_size``) gets the planned
bits and block size instead of the options'. ORT 1.31 also takes int4/uint4 data
(checked: same results); uint8 is used because it holds the same bytes for 4 bits, also serves 2
and 8 bits, and is the layout ``MatMulNBits`` uses, which is what makes sharing possible:

Tied embeddings (an LM head that multiplies by the same table, transposed, as SmolLM2's):
``quantize-nbits`` records a digest of each MatMulNBits float weight; a table with the same
digest is not stored again. ``GatherBlockQuantized`` reads the MatMulNBits weight B
[vocab, n_blocks, block*bits/8] as 3-D data with ``quantize_axis=2`` (one block per innermost
row), its scales through a ``Reshape`` to [vocab, n_blocks, 1] (folded by ORT at load), and the
gathered [..., n_blocks, block] rows are reshaped to [..., hidden]. The embedding then has the
head's bits and block size (if the head was kept at 8 bits, the embedding is 8-bit too: one
8-bit copy is smaller than an 8-bit head plus a 4-bit table). Asymmetric zero points are
stored a second time (MatMulNBits packs them along blocks, the 3-D gather needs one per
byte); a hidden size that is not a multiple of the block (the head's K is padded) is stored
twice; the stats say which and why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import UnsupportedError
from graphc.core.pass_base import GraphcPass, PassStats, choice, copy_scope
from graphc.passes import _blockquant as bq
from graphc.passes._quant import const_array, constant, drop_unused_initializers, embedding_table, ensure_opset
from graphc.passes._weights import META_BLOCK, META_COLD_BITS, META_COLD_BLOCK, META_HOT_ROWS, META_WEIGHT, planned_config, weight_digest
from graphc.core.registry import register

_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class GatherBlockOptions:
    bits: int = 4
    block_size: int = 32  # power of two, 16..256
    symmetric: bool = False
    method: str = bq.Method.MSE.value
    scale_dtype: str = "float16"
    min_rows: int = 64  # smaller tables (token types) stay float
    share_tied: bool = True  # reuse a tied LM head's MatMulNBits weights instead of a second copy


@register
class QuantizeGatherBlock(GraphcPass):
    name = "quantize-gather-block"
    summary = "2/4/8-bit block-quantized embedding tables (GatherBlockQuantized), shared with a tied MatMulNBits head"
    Options = GatherBlockOptions

    def _validate(self) -> bq.Method:
        o = self.options
        method = choice(bq.Method, o.method, "method", self.name)
        if method is bq.Method.GPTQ:
            raise UnsupportedError("method='gptq' needs a layer's input Hessian, which a table lookup has none of; "
                                   "supported: rtn, mse, hqq", pass_name=self.name)
        if o.bits not in bq.GATHER_BITS:
            raise UnsupportedError(f"bits={o.bits}; supported: {', '.join(map(str, bq.GATHER_BITS))}", pass_name=self.name)
        if o.block_size not in bq.BLOCK_SIZES:
            raise UnsupportedError(f"block_size={o.block_size}; supported: {', '.join(map(str, bq.BLOCK_SIZES))}",
                                   pass_name=self.name)
        if o.scale_dtype not in _SCALE_DTYPES:
            raise UnsupportedError(f"scale_dtype={o.scale_dtype!r}; supported: {', '.join(_SCALE_DTYPES)}",
                                   pass_name=self.name)
        if method is bq.Method.HQQ and o.symmetric:
            raise UnsupportedError("method='hqq' optimises zero points: needs symmetric=false; "
                                   "supported with symmetric=true: rtn, mse", pass_name=self.name)
        return method

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        method = self._validate()
        graph = model.graph
        heads = {}
        for node in graph:
            if node.op_type == ops.MATMUL_NBITS and node.domain == ops.MS_DOMAIN and META_WEIGHT in node.metadata_props:
                heads.setdefault(node.metadata_props[META_WEIGHT], node)
        done: dict[int, tuple] = {}
        errors: list[float] = []
        modified = False
        for node in list(graph):
            table = embedding_table(node, stats, 0)
            if table is None:
                continue
            label = node.name or node.op_type
            if table.shape[0] < self.options.min_rows and not (
                    self.options.share_tied and weight_digest(table) in heads):  # a shared table costs nothing
                stats.skip(label, f"{table.shape[0]} rows < min_rows={self.options.min_rows}")
                continue
            bits, block, is_planned = planned_config(node, self.options.bits, self.options.block_size)
            if is_planned and (bits not in bq.GATHER_BITS or block not in bq.BLOCK_SIZES):
                raise UnsupportedError(f"{label}: planned bits={bits}, block_size={block}; supported: bits "
                                       f"{', '.join(map(str, bq.GATHER_BITS))}, block sizes "
                                       f"{', '.join(map(str, bq.BLOCK_SIZES))}", pass_name=self.name)
            if table.shape[1] * bits % 8:
                stats.skip(label, f"hidden size {table.shape[1]} x {bits} bits is not whole bytes")
                continue
            ensure_opset(model, ops.MS_DOMAIN, ops.MS_OPSET)
            key = id(node.inputs[0])
            if key not in done:
                head = heads.get(weight_digest(table)) if self.options.share_tied else None
                why = self._why_not_shared(head, table) if head is not None else None
                if head is not None and why is None:
                    done[key] = ("tied", head)
                    stats.add("tied_tables_shared")
                    stats.notes.append(
                        f"{node.inputs[0].name}: stored once, read from the {head.attributes.get_int('bits')}-bit "
                        f"MatMulNBits {head.name or 'head'} weights (block {head.attributes.get_int('block_size')})"
                    )
                    stats.add("table_bytes_before", int(table.nbytes))
                else:
                    if why is not None:
                        stats.notes.append(f"{node.inputs[0].name}: tied to MatMulNBits {head.name or 'head'} but "
                                           f"stored twice: {why}")
                    elif self.options.share_tied:
                        tied = any(n.op_type == ops.MATMUL for n in _readers(node.inputs[0]))
                        if tied:
                            stats.notes.append(f"{node.inputs[0].name}: also read by a float MatMul (run "
                                               "quantize-nbits first to share the tied weights)")
                    if is_planned:
                        stats.add("tables_at_planned_precision")
                    split = _split_plan(node, table.shape[0])
                    if split is not None:
                        done[key] = ("split", self._store_split(graph, node, table, bits, block, split, method, stats))
                        stats.add("tables_quantized")
                        stats.add("table_bytes_before", int(table.nbytes))
                        kind, what = done[key]
                        new = self._emit_split(node, what)
                        for n in new:
                            copy_scope(node, n)
                        ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs,
                                                                [new[-1].outputs[0]])
                        stats.add("gathers_quantized")
                        modified = True
                        continue
                    quant = bq.quantize(table, bits, block,
                                        symmetric=self.options.symmetric, method=method,
                                        scale_dtype=_SCALE_DTYPES[self.options.scale_dtype])
                    errors.append(quant.relative_error(table))
                    done[key] = ("own", self._store(graph, node.inputs[0].name or "embedding", quant))
                    stats.add("tables_quantized")
                    stats.add("table_bytes_before", int(table.nbytes))
                    stats.add("table_bytes_after", quant.nbytes())
            kind, what = done[key]
            if kind == "split":
                new = self._emit_split(node, what)
            else:
                new = self._emit_tied(node, what) if kind == "tied" else self._emit_own(node, what)
            for n in new:
                copy_scope(node, n)
            ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [new[-1].outputs[0]])
            stats.add("gathers_quantized")
            modified = True
        if errors:
            stats.counts["mean_rel_table_error"] = round(float(np.mean(errors)), 6)
        drop_unused_initializers(graph)
        return modified

    # ------------------------------------------------------------------ own table
    def _store(self, graph: ir.Graph, base: str, quant: bq.BlockQuant) -> dict:
        data = bq.pack(quant.codes(), quant.bits)  # [vocab, hidden * bits / 8]
        return {
            "data": constant(graph, f"{base}_q{quant.bits}", data),
            "scales": constant(graph, f"{base}_scales", quant.scale),
            "zp": None if quant.symmetric else constant(graph, f"{base}_zero_points", bq.pack(quant.zero, quant.bits)),
            "bits": quant.bits,
            "block_size": quant.block_size,
        }

    def _emit_own(self, node: ir.Node, stored: dict) -> list[ir.Node]:
        pre, scales = _float(stored["scales"])
        inputs = [stored["data"], node.inputs[1], scales] + ([stored["zp"]] if stored["zp"] is not None else [])
        gbq = ir.node(
            ops.GATHER_BLOCK_QUANTIZED, inputs, domain=ops.MS_DOMAIN,
            attributes={"bits": stored["bits"], "block_size": stored["block_size"], "gather_axis": 0, "quantize_axis": 1},
        )
        gbq.name = f"{node.name}_q{stored['bits']}" if node.name else ""
        return [*pre, gbq]

    # ------------------------------------------------------------------ rows split by use
    def _store_split(self, graph, node, table, bits, block, split, method, stats) -> dict:
        """Hot rows at (bits, block), the others at the cold plan, and the id → row map."""
        hot, cold_bits, cold_block = split
        vocab = table.shape[0]
        cold = np.setdiff1d(np.arange(vocab), hot)
        scale_dtype = _SCALE_DTYPES[self.options.scale_dtype]
        base = node.inputs[0].name or "embedding"
        parts = []
        for rows, b, k, tag in ((hot, bits, block, "hot"), (cold, cold_bits, cold_block, "cold")):
            quant = bq.quantize(table[rows], b, k, symmetric=self.options.symmetric, method=method,
                                scale_dtype=scale_dtype)
            stats.add("table_bytes_after", quant.nbytes())
            parts.append(self._store(graph, f"{base}_{tag}", quant))
        index_dtype = np.int16 if vocab <= np.iinfo(np.int16).max else np.int32
        row_of = np.empty(vocab, index_dtype)
        row_of[hot] = np.arange(len(hot))
        row_of[cold] = len(hot) + np.arange(len(cold))
        stats.add("table_bytes_after", int(row_of.nbytes))
        stats.add("tables_split")
        stats.notes.append(f"{base}: {len(hot)} rows used in calibration at int{bits}/b{block}, {len(cold)} others at "
                           f"int{cold_bits}/b{cold_block} (row map {row_of.dtype})")
        return {
            "hot": parts[0], "cold": parts[1], "n_hot": len(hot),
            "map": constant(graph, f"{base}_row_of_id", row_of),
            "n_hot_value": constant(graph, f"{base}_n_hot", np.array(len(hot), np.int64)),
            "last_hot": constant(graph, f"{base}_last_hot", np.array(len(hot) - 1, np.int64)),
            "zero": constant(graph, f"{base}_zero", np.array(0, np.int64)),
            "minus_one": constant(graph, f"{base}_minus_one_axis", np.array([-1], np.int64)),
        }

    def _emit_split(self, node: ir.Node, stored: dict) -> list[ir.Node]:
        """row = map[id]; Where(row < n_hot, hot[min(row, n_hot-1)], cold[max(row - n_hot, 0)])."""
        nodes: list[ir.Node] = []

        def add(op, inputs, **attrs):
            n = ir.node(op, inputs, attributes=attrs or None)
            nodes.append(n)
            return n.outputs[0]

        row = add(ops.CAST, [add(ops.GATHER, [stored["map"], node.inputs[1]])], to=ir.DataType.INT64)
        is_hot = add("Less", [row, stored["n_hot_value"]])
        hot_row = add("Min", [row, stored["last_hot"]])
        cold_row = add("Max", [add("Sub", [row, stored["n_hot_value"]]), stored["zero"]])
        outs = []
        for part, idx in ((stored["hot"], hot_row), (stored["cold"], cold_row)):
            pre, scales = _float(part["scales"])
            nodes += pre
            inputs = [part["data"], idx, scales] + ([part["zp"]] if part["zp"] is not None else [])
            gbq = ir.node(ops.GATHER_BLOCK_QUANTIZED, inputs, domain=ops.MS_DOMAIN,
                          attributes={"bits": part["bits"], "block_size": part["block_size"], "gather_axis": 0,
                                      "quantize_axis": 1})
            nodes.append(gbq)
            outs.append(gbq.outputs[0])
        cond = add("Unsqueeze", [is_hot, stored["minus_one"]])
        add("Where", [cond, outs[0], outs[1]])
        return nodes

    # ------------------------------------------------------------------ tied to a MatMulNBits head
    @staticmethod
    def _why_not_shared(head: ir.Node, table: np.ndarray) -> str | None:
        block = head.attributes.get_int("block_size")
        if table.shape[1] % block:
            return f"hidden size {table.shape[1]} is not a multiple of the head's block {block} (its K is padded)"
        b = head.inputs[1]
        if b is None or b.const_value is None or len(b.const_value.shape) != 3:
            return "the head's packed weight is not a 3-D initializer"
        if _stored(head.inputs[2]) is None:
            return "the head's scales are not a constant"
        return None

    def _emit_tied(self, node: ir.Node, head: ir.Node) -> list[ir.Node]:
        graph = node.graph
        bits = head.attributes.get_int("bits")
        block = head.attributes.get_int("block_size")
        b = head.inputs[1]
        vocab, n_blocks, _ = b.const_value.shape
        nodes: list[ir.Node] = []
        # scales: the head's stored (float16 or float32) initializer, reshaped, cast to float32
        stored = _stored(head.inputs[2])
        shape3 = constant(graph, f"{b.name}_gather_scale_shape", np.array([vocab, n_blocks, 1], np.int64))
        reshape = ir.node("Reshape", [stored, shape3])
        nodes.append(reshape)
        scales = reshape.outputs[0]
        if stored.dtype != ir.DataType.FLOAT:
            cast = ir.node(ops.CAST, [scales], attributes={"to": ir.DataType.FLOAT})
            nodes.append(cast)
            scales = cast.outputs[0]
        inputs = [b, node.inputs[1], scales]
        if len(head.inputs) > 3 and head.inputs[3] is not None and bits == 8:
            # one zero point a byte already: the head's own, reshaped (not a second copy)
            zshape = constant(graph, f"{b.name}_gather_zero_shape", np.array([vocab, n_blocks, 1], np.int64))
            zreshape = ir.node("Reshape", [head.inputs[3], zshape])
            nodes.append(zreshape)
            inputs.append(zreshape.outputs[0])
        elif len(head.inputs) > 3 and head.inputs[3] is not None:
            # MatMulNBits packs a row's zero points; GatherBlockQuantized wants one per (row, block)
            packed = const_array(head.inputs[3])
            zero = bq.unpack(packed, bits, n_blocks)  # [vocab, n_blocks]
            inputs.append(constant(graph, f"{b.name}_gather_zero_points", zero.reshape(vocab, n_blocks, 1)))
        gbq = ir.node(
            ops.GATHER_BLOCK_QUANTIZED, inputs, domain=ops.MS_DOMAIN,
            attributes={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 2},
        )
        gbq.name = f"{node.name}_q{bits}" if node.name else ""
        nodes.append(gbq)
        # [..., n_blocks, block] → [..., hidden]
        ids = node.inputs[1]
        if ids.shape is not None:
            target = constant(graph, f"{b.name}_gather_out_shape", np.array([0] * len(ids.shape) + [-1], np.int64))
            out = ir.node("Reshape", [gbq.outputs[0], target])
            nodes.append(out)
        else:
            shape = ir.node("Shape", [ids])
            minus1 = constant(graph, f"{b.name}_minus_one", np.array([-1], np.int64))
            cat = ir.node("Concat", [shape.outputs[0], minus1], attributes={"axis": 0})
            out = ir.node("Reshape", [gbq.outputs[0], cat.outputs[0]])
            nodes += [shape, cat, out]
        return nodes


def _split_plan(node: ir.Node, vocab: int) -> tuple[np.ndarray, int, int] | None:
    """(hot row ids, cold bits, cold block) when ``mixed-precision`` split this table's rows."""
    text = node.metadata_props.get(META_HOT_ROWS)
    if not text or META_COLD_BITS not in node.metadata_props:
        return None
    hot = np.unique(np.array([int(t) for t in text.split(",")], np.int64))
    hot = hot[(hot >= 0) & (hot < vocab)]
    if len(hot) == 0 or len(hot) == vocab:
        return None
    cold_bits = int(node.metadata_props[META_COLD_BITS])
    cold_block = int(node.metadata_props.get(META_COLD_BLOCK, node.metadata_props.get(META_BLOCK, "32")))
    if cold_bits not in bq.GATHER_BITS or cold_block not in bq.BLOCK_SIZES:
        from graphc.core.errors import UnsupportedError

        raise UnsupportedError(f"{node.name}: planned cold rows bits={cold_bits}, block_size={cold_block}; supported: "
                               f"bits {', '.join(map(str, bq.GATHER_BITS))}, block sizes "
                               f"{', '.join(map(str, bq.BLOCK_SIZES))}", pass_name="quantize-gather-block")
    return hot, cold_bits, cold_block


def _float(value: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    if value.dtype == ir.DataType.FLOAT:
        return [], value
    cast = ir.node(ops.CAST, [value], attributes={"to": ir.DataType.FLOAT})
    return [cast], cast.outputs[0]


def _stored(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind a value, looking through one Cast (float16 scales)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value
    producer = value.producer()
    if producer is not None and producer.op_type == ops.CAST and producer.inputs and producer.inputs[0] is not None:
        inner = producer.inputs[0]
        return inner if inner.const_value is not None else None
    return None


def _readers(value: ir.Value):
    for user, _ in value.uses():
        yield user
        if user.op_type == "Transpose":
            yield from (u for u, _ in user.outputs[0].uses())

"""Run the token-wise part of an encoder on real tokens only ("remove padding").

A batch of sentences is padded to one length; an encoder then spends most of its MatMuls on
padding (MiniLM on tweets padded to 128: 32 real tokens a row on average, a quarter). Every op
outside attention works on each token by itself, so it can run on the real tokens packed
together, as FasterTransformer's "effective transformer" and ONNX Runtime's CUDA packed
attention do; ORT's CPU kernels have no such mode, so this pass writes it into the graph:

- ``idx = Squeeze(NonZero(Reshape(attention_mask, [-1])))``: the flat positions of the T real
  tokens, computed once a call;
- **pack** a [B, S, H] activation: ``Unsqueeze(Gather(Flatten(x, 2), idx), 0)`` -> [1, T, H];
- **unpack** back: ``Reshape(Gather(Pad(x[0], one zero row after), inverse), [B, S, H])``, where
  ``inverse`` gives each position its packed row (a cumulative count of real positions) or the
  zero row (padded positions get zeros; their values were never meaningful: every reader masks
  them).

Attention runs on a batch cut to its longest row: with ``L`` = the last real position + 1
(computed from the mask each call), a ``MultiHeadAttention``'s inputs are unpacked to [B, L, H]
instead of [B, S, H] and its ``key_padding_mask`` / ``attention_bias`` sliced to L (a bias
[B|1, N|1, S|1, S] on its last two axes). Exact: no real token sits at or past L, so no real
query or key is cut. A batch padded to a fixed 128 then pays attention for its longest
sentence, not for 128 (``Attention``/``QAttention`` and MHA with a past or a mask of another
layout keep the padded batch).

The activation read by the first attention block's Q/K/V MatMuls is packed. Then, in graph
order, a node whose per-token inputs are all packed and whose other inputs are constants that
broadcast along the last axis only (MatMul by a constant matrix, bias Add / Mul, LayerNorm and
Skip(Simplified)LayerNorm, Gelu / BiasGelu / FastGelu, Relu, Tanh, Sigmoid, Erf, Cast,
Identity, Softmax on the last axis) keeps working on packed tensors; attention
(``MultiHeadAttention``, ``Attention``) gets unpacked inputs and its output is packed again;
any other reader (a graph output, a Reshape, rotary embeddings with their position tensors) gets
an unpacked copy. So the rewrite is exact at real tokens by construction (the same float ops on
the same rows); padded rows of the outputs become zeros.

Quantized graphs too: ``DynamicQuantizeLinear`` (its range then spans the real tokens only,
not the padded batch: not bit-exact, and no worse), ``MatMulIntegerToFloat`` and 4-bit
``MatMulNBits`` stay packed, and
``QAttention`` is attention like the others; so the pass can also run on a finished int8 model
(graphc's or ORT's ``quantize_dynamic``). Run before quantization (recipe ``fast``) an
attention's float Q/K/V MatMuls on one input merge into one MatMul on the packed rows, one
unpack and a Split.

What it costs: a Gather after each attention, a Pad + Gather before it and at each output; what it
saves: the MatMuls' rows at padded positions. With no padding it is a loss (MiniLM int8, 8 x 128
real tokens: 1.12x). KV-cache decoders (past inputs, GroupQueryAttention) are left alone: their
token count is not the mask's. Run it after pruning (whose matchers expect MatMul -> attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats, copy_scope
from graphc.passes._quant import const_array, constant
from graphc.core.registry import register

_ATTENTION = {"MultiHeadAttention": (0, 1, 2), "Attention": (0,), "QAttention": (0,)}  # com.microsoft op -> activation inputs
# op -> indices of the inputs that are per-token activations; every other input must be a constant
# broadcasting along the last axis only
_TOKENWISE_MS = {"SkipLayerNormalization": (0, 1), "SkipSimplifiedLayerNormalization": (0, 1),
                 "SimplifiedLayerNormalization": (0,), "BiasGelu": (0,), "FastGelu": (0,), "Gelu": (0,),
                 "QuickGelu": (0,)}
_UNARY = {"Relu", "Tanh", "Sigmoid", "Erf", "Gelu", "Cast", "Identity", "Sqrt", "Neg", "Abs"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
_DECODER_OPS = {"GroupQueryAttention", "RotaryEmbedding"}


@dataclass(frozen=True)
class RemovePaddingOptions:
    mask_input: str = "attention_mask"  # the [batch, sequence] graph input whose zeros mark padding
    # MultiHeadAttention on the batch cut to its longest row (L = the last real position + 1),
    # not the padded length: its masks are sliced to [.., L, L] (exact: no real token sits past L)
    trim_attention: bool = True


@register
class RemovePadding(GraphcPass):
    name = "remove-padding"
    summary = "MatMuls, norms and activations on the real tokens only (padding removed), attention on the batch cut to its longest row"
    Options = RemovePaddingOptions
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        mask = next((v for v in graph.inputs if v.name == self.options.mask_input), None)
        problem = _problem(model, mask, self.options.mask_input)
        if problem:
            stats.notes.append(f"not rewritten: {problem}")
            return False
        seeds = _seeds(graph, mask)
        if not seeds:
            stats.notes.append(f"not rewritten: no attention whose Q/K/V MatMuls read a [batch, sequence, hidden] "
                               f"activation shaped like {self.options.mask_input!r}")
            return False
        graph.sort()
        rw = _Rewriter(graph, mask)
        packed: set[int] = set()
        for node in list(graph):
            if node in rw.added:
                continue
            for i, v in enumerate(node.inputs):
                if v is not None and id(v) in seeds and id(v) not in packed:
                    packed.add(id(rw.pack(v)))
            ins = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in packed]
            if not ins:
                continue
            if _keeps_packed(node, ins):
                for o in packed_outputs(node):
                    packed.add(id(o))
                    o.shape = _packed_shape(o.shape)
                stats.add("nodes_on_real_tokens")
                continue
            trim = (self.options.trim_attention and node.domain == ops.MS_DOMAIN
                    and set(ins) <= {0, 1, 2} and _trimmable_masks(node))
            unpack = rw.unpack_trimmed if trim else rw.unpack
            if node.op_type == "MultiHeadAttention" and ins == [0, 1, 2] and rw.merge_qkv(node, unpack):
                stats.add("qkv_matmuls_merged")
                ins = []
            for i in ins:
                node.replace_input_with(i, unpack(node.inputs[i]))
            if trim:
                for i, axes in trim:
                    node.replace_input_with(i, rw.trimmed_mask(node.inputs[i], axes))
                packed.add(id(rw.pack(node.outputs[0], trimmed=True)))
                stats.add("attention_on_longest_row")
            elif node.domain == ops.MS_DOMAIN and node.op_type in _ATTENTION:
                packed.add(id(rw.pack(node.outputs[0])))
                stats.add("attention_on_padded_batch")
            else:
                stats.add(f"unpacked_for_{node.op_type}")
        for k, out in enumerate(graph.outputs):
            if id(out) in packed:
                graph.outputs[k] = rw.unpack_output(out)
                stats.add("outputs_unpacked")
        graph.sort()
        stats.add("packs", rw.packs)
        stats.add("unpacks", rw.unpacks)
        return rw.packs > 0


def _trimmable_masks(node: ir.Node) -> list[tuple[int, list[int]]] | None:
    """For a MultiHeadAttention without a past, the inputs to slice to the longest row and
    along which axes: key_padding_mask [B, S] on its last axis, attention_bias [B|1, N|1,
    S|1, S] on its last two (a size-1 axis stays 1). None where that cannot be said (another
    op, a past, a mask of another rank)."""
    if node.op_type != "MultiHeadAttention":
        return None
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    if ins[6] is not None or ins[7] is not None:
        return None
    found = []
    for i, rank, axes in ((4, 2, [-1]), (5, 4, [-2, -1])):
        v = ins[i]
        if v is None:
            continue
        if _rank(v) != rank:
            return None
        found.append((i, axes))
    return found


def _rank(v: ir.Value, depth: int = 3) -> int | None:
    """The rank of v where recorded, looking through Cast/Identity (a mask cast to int32)."""
    if v.shape is not None:
        return len(v.shape)
    p = v.producer()
    if depth and p is not None and p.op_type in ("Cast", "Identity") and p.domain in ("", "ai.onnx") and p.inputs[0]:
        return _rank(p.inputs[0], depth - 1)
    return None


def _problem(model: ir.Model, mask: ir.Value | None, name: str) -> str | None:
    if mask is None:
        return f"no graph input named {name!r}"
    if mask.shape is None or len(mask.shape) != 2:
        return f"{name!r} is not 2-D [batch, sequence]"
    if any(v.name.startswith(("past", "present")) for v in (*model.graph.inputs, *model.graph.outputs)):
        return "a KV-cache decoder (past/present tensors): its token count is not the mask's"
    if any(n.op_type in _DECODER_OPS for n in model.graph):
        return "GroupQueryAttention / RotaryEmbedding present (decoder attention)"
    if model.opset_imports.get("", 0) < 13:
        return f"opset {model.opset_imports.get('', 0)} < 13 (Squeeze/Unsqueeze with axes inputs)"
    return None


def _seeds(graph: ir.Graph, mask: ir.Value) -> set[int]:
    """The activations read by the Q/K/V MatMuls of each attention (shape [B, S, H] with B, S
    the mask's dims)."""
    seeds: set[int] = set()
    b, s = mask.shape[0], mask.shape[1]
    for node in graph:
        if node.domain != ops.MS_DOMAIN or node.op_type not in _ATTENTION:
            continue
        for i in _ATTENTION[node.op_type]:
            v = node.inputs[i] if i < len(node.inputs) else None
            x = _matmul_input(v) if node.op_type == "MultiHeadAttention" else _dequantized(v)
            # an attention op's input is [batch, sequence, hidden] by its contract; where the shape
            # is recorded it must be the mask's batch and sequence
            if x is not None and (x.shape is None or (len(x.shape) == 3 and x.shape[0] == b and x.shape[1] == s)):
                seeds.add(id(x))
    return seeds


def _dequantized(v: ir.Value | None) -> ir.Value | None:
    """x where v = DynamicQuantizeLinear(x)[0], else v."""
    p = v.producer() if v is not None else None
    if p is not None and p.op_type == "DynamicQuantizeLinear" and p.outputs[0] is v:
        return p.inputs[0]
    return v


def _matmul_input(v: ir.Value | None) -> ir.Value | None:
    """x in v = MatMul(x, W) with constant W, or its int8 forms MatMulIntegerToFloat /
    MatMulInteger of DynamicQuantizeLinear(x), behind up to 4 element-wise steps by constants
    or per-tensor scales (bias Add, ORT's scale Mul and Cast)."""
    p = v.producer() if v is not None else None
    for _ in range(4):
        if p is None or p.domain not in ("", "ai.onnx") or p.op_type not in ("Add", "Mul", "Cast"):
            break
        rest = [i for i in p.inputs if i is not None and not _per_tensor(i)]
        if len(rest) != 1:
            return None
        p = rest[0].producer()
    if p is None or len(p.inputs) < 2 or const_array(p.inputs[1]) is None:
        return None
    if p.op_type == "MatMulNBits":
        return p.inputs[0]
    if p.op_type == ops.MATMUL and p.domain in ("", "ai.onnx"):
        return p.inputs[0]
    if p.op_type in ("MatMulIntegerToFloat", "MatMulInteger"):
        x = _dequantized(p.inputs[0])
        return x if x is not p.inputs[0] else None
    return None


def _packed_shape(shape: ir.Shape | None) -> ir.Shape | None:
    """[B, S, H] -> [1, T, H]; other ranks unknown."""
    if shape is None or len(shape) != 3:
        return None
    return ir.Shape([1, "packed_tokens", shape[2]])


def _along_last_axis(v: ir.Value | None) -> bool:
    """A constant that broadcasts along the last axis only (scalar, [H], [1, .., 1, H])."""
    arr = const_array(v)
    return arr is not None and all(d == 1 for d in arr.shape[:-1])


def _per_tensor(v: ir.Value | None, depth: int = 3) -> bool:
    """A constant along the last axis, a DynamicQuantizeLinear's scale / zero point (scalars), or
    element-wise arithmetic of those (ORT's int8 graphs multiply the activation scale by the
    weight's)."""
    p = v.producer() if v is not None else None
    if p is not None and p.op_type == "DynamicQuantizeLinear" and v is not p.outputs[0]:
        return True
    if _along_last_axis(v):
        return True
    return (depth > 0 and p is not None and p.domain in ("", "ai.onnx") and p.op_type in (*_BINARY, "Cast")
            and all(i is not None and _per_tensor(i, depth - 1) for i in p.inputs))


def packed_outputs(node: ir.Node) -> list[ir.Value]:
    """The outputs that are per token when the node runs on packed rows (DynamicQuantizeLinear's
    scale and zero point are per tensor)."""
    return list(node.outputs[:1]) if node.op_type == "DynamicQuantizeLinear" else list(node.outputs)


def _keeps_packed(node: ir.Node, packed_inputs: list[int]) -> bool:
    """Whether the node works on each token by itself given which inputs are packed
    (DynamicQuantizeLinear ranges over the real tokens only: not the padded batch's range)."""
    op, dom = node.op_type, node.domain
    rest = [i for i, v in enumerate(node.inputs) if v is not None and i not in packed_inputs]
    if dom == ops.MS_DOMAIN and op == "MatMulNBits":  # packed codes, scales, zero points: all constants
        return packed_inputs == [0] and all(const_array(node.inputs[i]) is not None for i in rest)
    if dom == ops.MS_DOMAIN and op == "MatMulIntegerToFloat":
        w = const_array(node.inputs[1])
        return (packed_inputs == [0] and w is not None and w.ndim == 2
                and all(_per_tensor(node.inputs[i]) for i in rest if i != 1))
    if dom == ops.MS_DOMAIN:
        act = _TOKENWISE_MS.get(op)
        return act is not None and set(packed_inputs) == set(act) and all(_per_tensor(node.inputs[i]) for i in rest)
    if dom not in ("", "ai.onnx"):
        return False
    if op == ops.MATMUL:
        w = const_array(node.inputs[1])
        return packed_inputs == [0] and w is not None and w.ndim == 2
    if op == "MatMulInteger":
        w = const_array(node.inputs[1])
        return (packed_inputs == [0] and w is not None and w.ndim == 2
                and all(_per_tensor(node.inputs[i]) for i in rest if i != 1))
    if op in _BINARY:
        return all(_per_tensor(node.inputs[i]) for i in rest)
    if op in _UNARY or op == "DynamicQuantizeLinear":
        return packed_inputs == [0]
    if op in ("LayerNormalization", "Softmax", "LogSoftmax"):
        axis = node.attributes.get_int("axis", -1)
        return packed_inputs == [0] and axis in (-1, 2) and all(_along_last_axis(node.inputs[i]) for i in rest)
    return False


class _Rewriter:
    """Builds the shared index and the pack / unpack subgraphs (appended; the graph is sorted
    after the rewrite)."""

    def __init__(self, graph: ir.Graph, mask: ir.Value) -> None:
        self.graph, self.mask = graph, mask
        self.added: set[ir.Node] = set()
        self.packs = self.unpacks = 0
        self._unpacked: dict[int, ir.Value] = {}
        self._consts: dict[str, ir.Value] = {}
        c = self._const
        self._axis0 = c("axis0", [0])
        flat = self._node("Reshape", [mask, c("flat", [-1])])
        self.idx = self._node("Squeeze", [self._node("NonZero", [flat]), self._axis0])
        self.mask_shape = self._node("Shape", [mask])
        self._trim: dict[str, ir.Value] | None = None
        self._trimmed: dict[int, ir.Value] = {}
        self._inverse_full: ir.Value | None = None

    def _const(self, name: str, values) -> ir.Value:
        if name not in self._consts:
            self._consts[name] = constant(self.graph, f"remove_padding_{name}", np.asarray(values, np.int64))
        return self._consts[name]

    def _trim_values(self) -> dict[str, ir.Value]:
        """L = the last real position + 1 ([1]; at least 1), the real tokens' flat positions in
        the [B, L] layout, and the shapes that go with it (built once, on first use)."""
        if self._trim is None:
            c = self._const
            seq = self._node("Slice", [self.mask_shape, c("one", [1]), c("two", [2])])
            batch = self._node("Slice", [self.mask_shape, c("zero", [0]), c("one", [1])])
            pos = self._node("Mod", [self.idx, seq])
            last = self._node("ReduceMax", [self._node("Concat", [pos, c("zero", [0])], {"axis": 0})],
                              {"keepdims": 1})
            length = self._node("Add", [last, c("one", [1])])
            rows = self._node("Add", [self._node("Mul", [self._node("Div", [self.idx, seq]), length]), pos])
            cut = self._node("Slice", [self.mask, c("zero", [0]), length, c("one", [1])])
            self._trim = {"length": length, "rows": rows, "inverse": self._inverse(cut),
                          "shape": self._node("Concat", [batch, length], {"axis": 0})}
        return self._trim

    def _inverse(self, mask: ir.Value) -> ir.Value:
        """For each position of ``mask`` flattened, its row among the packed real tokens, or T
        (the zero row the unpack appends) for a padded one. Packed rows are in NonZero's
        row-major order, which a cumulative count of real positions reproduces."""
        c = self._const
        real = self._node("Not", [self._node("Equal", [self._node("Reshape", [mask, c("flat", [-1])]),
                                                       self._node("Cast", [c("zero", [0])], {"to": mask.dtype or ir.DataType.INT64})])])
        before = self._node("CumSum", [self._node("Cast", [real], {"to": ir.DataType.INT64}), c("zero_scalar", 0)],
                            {"exclusive": 1})
        tokens = self._node("Shape", [self.idx])
        return self._node("Where", [real, before, tokens])

    def trimmed_mask(self, v: ir.Value, axes: list[int]) -> ir.Value:
        """v sliced to the longest row along ``axes``."""
        t = self._trim_values()
        key = f"ends{len(axes)}"  # L repeated per axis: made once, shared by every attention
        if key not in t:
            t[key] = self._node("Concat", [t["length"]] * len(axes), {"axis": 0})
        ends = t[key]
        starts = self._const(f"zeros{len(axes)}", [0] * len(axes))
        out = self._node("Slice", [v, starts, ends, self._const("axes" + "_".join(map(str, axes)).replace("-", "m"), axes)])
        out.type = v.type
        return out

    def unpack_trimmed(self, p: ir.Value) -> ir.Value:
        """[1, T, H] → [B, L, H]: the batch cut to its longest row."""
        if id(p) not in self._trimmed:
            t = self._trim_values()
            self._trimmed[id(p)] = self._unpack_nodes(p, t["inverse"], t["shape"])
        return self._trimmed[id(p)]

    def _node(self, op: str, inputs: list, attrs: dict | None = None) -> ir.Value:
        n = ir.node(op, inputs, attributes=attrs or {})
        n.name = f"remove_padding/{op}_{len(self.added)}"
        self.added.add(n)
        self.graph.append(n)
        return n.outputs[0]

    def merge_qkv(self, mha: ir.Node, unpack=None) -> bool:
        """Q, K and V = MatMul(x, W_q / W_k / W_v) on one packed x, each read only by this
        attention: one MatMul by [W_q | W_k | W_v] on the packed rows, one unpack, a Split (one
        GEMM and one unpack instead of three each)."""
        mms = [v.producer() for v in mha.inputs[:3]]
        if any(m is None or m.op_type != ops.MATMUL or m.domain not in ("", "ai.onnx") for m in mms):
            return False
        x = mms[0].inputs[0]
        weights = [const_array(m.inputs[1]) for m in mms]
        if (any(m.inputs[0] is not x for m in mms) or len({id(m) for m in mms}) != 3
                or any(w is None or w.ndim != 2 or w.dtype != weights[0].dtype or w.shape[0] != weights[0].shape[0]
                       for w in weights)
                or any(len(m.outputs[0].uses()) != 1 or m.outputs[0].is_graph_output() for m in mms)):
            return False
        base = mms[0].name or "qkv"
        w = constant(self.graph, f"{base}_qkv_weight", np.concatenate(weights, axis=1))
        packed = self._node(ops.MATMUL, [x, w])
        mm = packed.producer()
        mm.name = f"{base}_qkv"
        copy_scope(mms[0], mm)
        packed.type = mms[0].outputs[0].type  # [1, T, N_q + N_k + N_v], not Q's width
        packed.shape = ir.Shape([1, "packed_tokens", sum(int(a.shape[1]) for a in weights)])
        sizes = constant(self.graph, "remove_padding_qkv_sizes", np.array([a.shape[1] for a in weights], np.int64))
        split = ir.node("Split", [(self.unpack if unpack is None else unpack)(packed), sizes], attributes={"axis": -1}, num_outputs=3)
        split.name = f"remove_padding/Split_{len(self.added)}"
        self.added.add(split)
        self.graph.append(split)
        for i, out in enumerate(split.outputs):
            mha.replace_input_with(i, out)
        for m in mms:
            self.graph.remove(m, safe=True)
        return True

    def pack(self, v: ir.Value, trimmed: bool = False) -> ir.Value:
        """Every reader of v now reads [1, T, H] (v itself stays the padded tensor, [B, L, H]
        when ``trimmed``)."""
        users = list(v.uses())
        index = self._trim_values()["rows"] if trimmed else self.idx
        rows = self._node("Gather", [self._node("Flatten", [v], {"axis": 2}), index], {"axis": 0})
        out = self._node("Unsqueeze", [rows, self._axis0])
        out.name = f"{v.name}_packed"
        out.type = v.type
        out.shape = _packed_shape(v.shape)
        for user, i in users:
            user.replace_input_with(i, out)
        self.packs += 1
        return out

    def _unpack_nodes(self, p: ir.Value, inverse=None, shape=None) -> ir.Value:
        """[1, T, W] → [B, S, W] (or [B, L, W] with the trimmed layout's inverse and shape): one
        zero row appended to the packed rows, then a Gather of each position's row."""
        if inverse is None:
            if self._inverse_full is None:
                self._inverse_full = self._inverse(self.mask)
            inverse, shape = self._inverse_full, self.mask_shape
        rows = self._node("Squeeze", [p, self._axis0])
        padded = self._node("Pad", [rows, self._const("one_row_after", [0, 0, 1, 0])])
        width = self._node("Shape", [p], {"start": 2})
        gathered = self._node("Gather", [padded, inverse], {"axis": 0})
        out = self._node("Reshape", [gathered, self._node("Concat", [shape, width], {"axis": 0})])
        out.type = p.type
        self.unpacks += 1
        return out

    def unpack(self, p: ir.Value) -> ir.Value:
        if id(p) not in self._unpacked:
            self._unpacked[id(p)] = self._unpack_nodes(p)
        return self._unpacked[id(p)]

    def unpack_output(self, p: ir.Value) -> ir.Value:
        """A graph output that became packed: an unpacked copy takes its name and place."""
        shape = p.shape
        out = self.unpack(p)
        out.shape = ir.Shape([self.mask.shape[0], self.mask.shape[1], shape[-1]]) if shape is not None else None
        name = p.name
        p.name = f"{name}_packed"
        out.name = name
        return out

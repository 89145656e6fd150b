"""What the compression planner (``plan``) can act on, and what a plan costs.

Units and their actions:

- ``heads:<i>``: attention block ``i`` (``_attention_blocks.find_blocks`` order) loses a fraction of
  its heads (KV groups on grouped-KV models);
- ``ffn:<i>``: FFN ``i`` (``prune_ffn.find_ffns`` order) loses a fraction of its neurons;
- ``svd:<node>``: a linear layer is factorized at a kept parameter ratio (whitened SVD);
- ``quant:<node>``: a linear layer's weight becomes int8 (``quantize-int8``) or, with ``int4``,
  4-bit block-wise (``quantize-nbits``, MatMulNBits): levels float → int8 → int4, one of them
  per layer (a layer is never both). A factorized layer's two factors get the layer's precision
  (both int8 or both int4, each factor quantized along its own input dimension);
- ``embeddings``: the embedding tables ``quantize-embedding`` would take become int8 or, with
  ``int4``, 4-bit block-wise (``quantize-gather-block``, GatherBlockQuantized; tables with an
  even hidden size), all together.

The cost of a plan is computed from shapes, not measured: the bytes and element count of every
initializer after the plan's passes, and the multiply-accumulates per token of the linear
layers plus the attention core at a nominal sequence length (the latency proxy; int8 and int4
change bytes, not MACs). int4 bytes are ``MatMulNBits``' storage (``_sensitivity.config_bytes``:
packed codes, float16 scales, packed zero points when asymmetric; K padded to whole blocks), its
"parameters" the stored elements (uint8 code and zero-point bytes, one per scale), as counted in
the initializers. Pruning and factorizing the same layer do not combine (:meth:`Units.conflicts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.passes import _lowrank as lr
from graphc.passes import _prune
from graphc.passes._quant import const_array, embedding_table
from graphc.passes._sensitivity import QuantConfig, config_bytes
from graphc.passes._ffn_blocks import find_ffns
from graphc.passes._attention_blocks import find_blocks

INT8_SCALE_BYTES = 2  # quantize-int8 and quantize-embedding as the recipes run them: float16 scales


@dataclass(frozen=True)
class Int4:
    """How a linear layer planned at 4 bits is quantized (``quantize-nbits`` options)."""

    block_size: int = 32
    symmetric: bool = False
    method: str = "mse"

    def storage(self, k: int, n: int) -> tuple[int, int]:
        """(bytes, elements) of a [K, N] weight as MatMulNBits stores it (scales float16)."""
        nbytes = config_bytes(n, k, QuantConfig(4, self.block_size), symmetric=self.symmetric,
                              scale_dtype="float16")
        scales = n * -(-k // self.block_size)
        return nbytes, nbytes - scales  # a float16 scale is 2 bytes, 1 element; the rest uint8

    def table_storage(self, rows: int, cols: int) -> tuple[int, int]:
        """(bytes, elements) of a [rows, cols] table as GatherBlockQuantized stores it: codes
        packed along cols (unpadded), float16 scales [rows, n_blocks], packed zero points."""
        n_blocks = -(-cols // self.block_size)
        codes = rows * -(-cols * 4 // 8)
        zeros = 0 if self.symmetric else rows * -(-n_blocks * 4 // 8)
        return codes + 2 * rows * n_blocks + zeros, codes + rows * n_blocks + zeros


@dataclass
class LinearRec:
    """A constant-weight float MatMul [K, N] the plan prices (and may factorize or quantize)."""

    name: str  # node name (unique)
    node: ir.Node
    weight: ir.Value
    k: int
    n: int
    bias: int  # bias elements (0: no bias)
    bias_name: str | None = None  # its initializer, when it is one read by this linear alone
    in_unit: str | None = None  # pruning unit that removes input channels (rows)
    out_unit: str | None = None  # pruning unit that removes output channels (columns)
    editable: bool = True  # a plain MatMul whose weight is an initializer read by it alone


@dataclass
class Unit:
    key: str
    kind: str  # heads, ffn, svd, quant, embedding
    # level 0 is "do nothing"; heads/ffn: fraction removed; svd: kept ratio; quant, embedding: bits (8, 4)
    levels: tuple[float, ...]
    total: int = 0  # heads/ffn: units (KV groups, neurons); svd/quant: unused
    min_keep: int = 1
    linears: list[str] = field(default_factory=list)  # records the unit touches
    index: int = 0  # heads/ffn: block or FFN index in graph order
    packed_bias: tuple[str | None, int] = (None, 0)  # heads: the fused op's Q/K/V bias (name if unshared, size)
    block_size: int = 0  # quant, embedding: the int4 block size

    def label(self, level: int) -> str:
        if level == 0:
            return "none"
        v = self.levels[level]
        if self.kind in ("heads", "ffn"):
            return f"prune {v:.0%} ({self.removed(level)}/{self.total})"
        if self.kind == "svd":
            return f"svd keep {v:.0%}"
        if v == 4:
            return f"int4/b{self.block_size}"
        return "int8"

    def bits(self, level: int) -> int:
        """quant and embedding units: the weight bits at ``level`` (32: float)."""
        return int(self.levels[level]) if self.kind in ("quant", "embedding") and level else 32

    def kind_at(self, level: int) -> str:
        """The kind of action ``level`` is (quant: int8 or int4; embedding: int8- or int4-embedding)."""
        if self.kind == "quant":
            return f"int{self.bits(level)}"
        return f"int{self.bits(level)}-embedding" if self.kind == "embedding" else self.kind

    def removed(self, level: int) -> int:
        if self.kind not in ("heads", "ffn") or level == 0:
            return 0
        return min(int(np.floor(self.levels[level] * self.total + 1e-9)), self.total - self.min_keep)

    def kept_ratio(self, level: int) -> float:
        return 1.0 if self.kind not in ("heads", "ffn") else (self.total - self.removed(level)) / self.total


@dataclass
class Cost:
    bytes: int
    params: int
    macs: int  # per token

    def as_dict(self) -> dict[str, int]:
        return {"bytes": self.bytes, "params": self.params, "macs": self.macs}


class Units:
    """The units of a model and its cost model."""

    def __init__(self, model: ir.Model, *, head_levels, ffn_levels, svd_levels, int8: bool, embeddings: bool,
                 seq: int, min_keep: int = 1, svd_min_elements: int = 1024, correct: bool = True,
                 int4: Int4 | None = None, int8_form: str = "u8s8") -> None:
        self.seq, self.correct, self.int4 = seq, correct, int4
        # the u8u8 form (saturating targets) stores a scalar uint8 zero point beside each int8 weight
        self.int8_zero_point = 1 if int8_form == "u8u8" else 0
        graph = model.graph
        self.linears: dict[str, LinearRec] = {}
        names = [n.name for n in graph]
        dup = {x for x in names if not x or names.count(x) > 1}
        for node in graph:
            lin = _prune.linear(node)
            if lin is None or node.name in dup:
                continue
            k, n = lin.weight.shape
            w = node.inputs[1]
            editable = (w.name in graph.initializers and len(list(w.uses())) == 1
                        and all(use[0] is node for use in w.uses()))
            bias = lin.bias_node.inputs[lin.bias_index] if lin.bias_node is not None else None
            own = (bias is not None and bias.name in graph.initializers and len(list(bias.uses())) == 1)
            self.linears[node.name] = LinearRec(node.name, node, w, k, n, n if lin.bias is not None else 0,
                                                bias.name if own else None, editable=editable)
        self.units: list[Unit] = []
        self.skipped: list[tuple[str, str]] = []
        self.blocks, _ = find_blocks(model)
        self.attention: list[tuple[str | None, int, int]] = []  # (unit key, heads, head_dim + v_head_dim)
        for i, b in enumerate(self.blocks):
            key = f"heads:{i}" if head_levels and b.kv_heads > min_keep else None
            self.attention.append((key, b.heads, b.head_dim + b.v_head_dim))
            if key is None:
                continue
            o = self.linears.get(b.o.node.name)
            if b.q is None or o is None or not o.editable:
                self.skipped.append((b.anchor.name, "heads: the output projection's weight is not an initializer "
                                     "read by it alone (or QKV is packed into the op)"))
                self.attention[-1] = (None, b.heads, b.head_dim + b.v_head_dim)
                continue
            qkv = [lin.node.name for lin in {id(x.node): x for x in (b.q, b.k, b.v)}.values()]
            touched = self._wire(key, qkv, b.o.node.name)
            packed = (None, 0)
            if b.kind == ops.MULTI_HEAD_ATTENTION and len(b.anchor.inputs) > 3 and b.anchor.inputs[3] is not None:
                v = b.anchor.inputs[3]
                c = const_array(v)
                if c is not None:
                    own = v.name in graph.initializers and len(list(v.uses())) == 1
                    packed = (v.name if own else None, int(c.size))
            self.units.append(Unit(key, "heads", (0.0, *head_levels), b.kv_heads, min_keep, touched, i, packed))
        self.ffns = find_ffns(graph)
        for i, f in enumerate(self.ffns):
            if not ffn_levels or f.width <= min_keep:
                continue
            down = self.linears.get(f.down.node.name)
            if down is None or not down.editable:
                self.skipped.append((f.down.node.name, "ffn: the down projection's weight is not an initializer "
                                     "read by it alone"))
                continue
            key = f"ffn:{i}"
            touched = self._wire(key, [up.node.name for up in f.ups], f.down.node.name)
            self.units.append(Unit(key, "ffn", (0.0, *ffn_levels), f.width, min_keep, touched, i))
        heads_out = {o.name for o in graph.outputs}
        for rec in self.linears.values():
            if not rec.editable:
                continue
            if svd_levels and rec.k * rec.n >= svd_min_elements and rec.node.outputs[0].name not in heads_out:
                self.units.append(Unit(f"svd:{rec.name}", "svd", (1.0, *svd_levels), linears=[rec.name]))
            # int4 where it stores less than the level before it (not a weight narrower than a block)
            float_bytes = rec.k * rec.n * (1 if int8 else 4) + (INT8_SCALE_BYTES * rec.n if int8 else 0)
            four = int4 is not None and int4.storage(rec.k, rec.n)[0] < float_bytes
            bits = (8.0,) * int8 + (4.0,) * four
            if bits:
                self.units.append(Unit(f"quant:{rec.name}", "quant", (0.0, *bits), linears=[rec.name],
                                       block_size=int4.block_size if int4 is not None else 0))
        self.tables: list[ir.Value] = []
        if embeddings:
            seen = set()
            for node in graph:
                weights = {r.weight.name for r in self.linears.values()}
                if (embedding_table(node, _NoStats(), 64) is not None and node.inputs[0].name in graph.initializers
                        and node.inputs[0].name not in weights):
                    if id(node.inputs[0]) not in seen:
                        seen.add(id(node.inputs[0]))
                        self.tables.append(node.inputs[0])
            if self.tables:
                # 4 bits: whole bytes a row (quantize-gather-block), and fewer bytes than int8
                four = int4 is not None and all(
                    int(t.const_value.shape[1]) % 2 == 0
                    and int4.table_storage(*(int(d) for d in t.const_value.shape))[0]
                    < int(t.const_value.shape[0]) * (int(t.const_value.shape[1]) + INT8_SCALE_BYTES)
                    for t in self.tables)
                self.units.append(Unit("embeddings", "embedding", (0.0, 8.0, *((4.0,) * four)),
                                       block_size=int4.block_size if four else 0))
        self.by_key = {u.key: u for u in self.units}
        self.base = self._fixed(model)

    # ------------------------------------------------------------------ cost
    def _wire(self, key: str, producers: list[str], consumer: str) -> list[str]:
        """Mark the linears whose outputs a unit slices (``producers``) and the one whose input
        it slices (``consumer``); the names of those that are linears here, in that order."""
        touched = []
        for name in producers:
            if name in self.linears:
                self.linears[name].out_unit = key
                touched.append(name)
        if consumer in self.linears:
            self.linears[consumer].in_unit = key
            touched.append(consumer)
        return touched

    def _fixed(self, model: ir.Model) -> Cost:
        """Bytes and elements of every initializer the plan does not price."""
        priced = {r.weight.name for r in self.linears.values()} | {t.name for t in self.tables}
        priced |= {r.bias_name for r in self.linears.values() if r.bias_name}
        priced |= {u.packed_bias[0] for u in self.units if u.packed_bias[0]}
        nbytes = params = 0
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is None or value.name in priced:
                continue
            nbytes += t.nbytes
            params += t.size
        return Cost(nbytes, params, 0)

    def cost(self, state: dict[str, int]) -> Cost:
        nbytes, params, macs = self.base.bytes, self.base.params, 0
        for r in self.linears.values():
            kin = self._kept(r.in_unit, state)
            kout = self._kept(r.out_unit, state)
            k, n = int(round(r.k * kin)), int(round(r.n * kout))
            svd = self.by_key.get(f"svd:{r.name}")
            quant = self.by_key.get(f"quant:{r.name}")
            bits = quant.bits(state.get(quant.key, 0)) if quant is not None else 32
            level = state.get(f"svd:{r.name}", 0) if svd is not None else 0
            if level:
                rank = lr.ratio_rank(r.k, r.n, svd.levels[level])
                shapes = [(k, rank), (rank, n)]
            else:
                shapes = [(k, n)]
            bias = int(round(r.bias * kout))
            for a, b in shapes:
                if bits == 8:
                    params += a * b + b + self.int8_zero_point
                    nbytes += a * b + INT8_SCALE_BYTES * b + self.int8_zero_point
                elif bits == 4:
                    stored, elements = self.int4.storage(a, b)
                    params += elements
                    nbytes += stored
                else:
                    params += a * b
                    nbytes += 4 * a * b
                macs += a * b
            # a bias of its own is replaced by the pruned / refitted one; a shared one stays and a
            # pruned layer gets its own copy; a layer without one gets one from the refit
            pruned_in, pruned_out = kin < 1, kout < 1
            if r.bias:
                extra = bias if (r.bias_name or pruned_in or pruned_out) else 0
            else:
                extra = n if (pruned_in and self.correct) else 0
            params += extra
            nbytes += 4 * extra
        for key, heads, width in self.attention:
            macs += self.seq * width * int(round(heads * self._kept(key, state)))
        for u in self.units:
            name, size = u.packed_bias
            if size and (name or state.get(u.key, 0)):
                extra = int(round(size * u.kept_ratio(state.get(u.key, 0))))
                params += extra
                nbytes += 4 * extra
        tables = self.by_key.get("embeddings")
        bits = tables.bits(state.get(tables.key, 0)) if tables is not None else 32
        for t in self.tables:
            rows, cols = (int(d) for d in t.const_value.shape)
            if bits == 8:
                nbytes += rows * cols + INT8_SCALE_BYTES * rows
                params += rows * cols + rows
            elif bits == 4:
                stored, elements = self.int4.table_storage(rows, cols)
                nbytes += stored
                params += elements
            else:
                nbytes += 4 * rows * cols
                params += rows * cols
        return Cost(nbytes, params, macs)

    def _kept(self, key: str | None, state: dict[str, int]) -> float:
        if key is None:
            return 1.0
        return self.by_key[key].kept_ratio(state.get(key, 0))

    def conflicts(self, state: dict[str, int], key: str, level: int) -> bool:
        """Whether moving ``key`` to ``level`` clashes with the state: a layer is pruned or
        factorized, not both."""
        if level == 0:
            return False
        unit = self.by_key[key]
        if unit.kind == "svd":
            r = self.linears[unit.linears[0]]
            return any(state.get(u, 0) > 0 for u in (r.in_unit, r.out_unit) if u is not None)
        if unit.kind in ("heads", "ffn"):
            return any(state.get(f"svd:{name}", 0) > 0 for name in unit.linears)
        return False


class _NoStats:
    def skip(self, what: str, reason: str) -> None:
        pass


def graph_macs(model: ir.Model, seq: int) -> int:
    """MACs per token of a float model as it stands: every constant-weight float MatMul
    (K × N) plus the attention core of each block found (``seq`` keys)."""
    macs = 0
    for node in model.graph:
        if node.op_type == ops.MATMUL and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            w = const_array(node.inputs[1])
            if w is not None and w.ndim == 2:
                macs += int(w.shape[0]) * int(w.shape[1])
    blocks, _ = find_blocks(model)
    for b in blocks:
        macs += seq * b.heads * (b.head_dim + b.v_head_dim)
    return macs


def layer_name(units: Units, unit) -> str:
    """The layer a unit acts on, for plan reports: its scope, or its node's name."""
    if unit.kind == "heads":
        node = units.blocks[unit.index].o.node
    elif unit.kind == "ffn":
        node = units.ffns[unit.index].down.node
    elif unit.linears:
        node = units.linears[unit.linears[0]].node
    else:
        return "embedding tables"
    return node.metadata_props.get("graphc.scope") or node.name


def cost_text(cost, units: Units) -> str:
    """A cost in words, MACs relative to the original model's."""
    ref = units.cost({})
    return (f"{cost.bytes:,} bytes, {cost.params:,} params, {cost.macs / max(ref.macs, 1):.3f} of the original "
            "MACs")

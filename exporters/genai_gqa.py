"""GroupQueryAttention in the form onnxruntime-genai serves fastest: rotary inside the op over a
shared past/present buffer.

``fuse-ort`` (``passes/_fusion_rules/gqa_kv.py``) leaves a KV-cache decoder with a contract any
caller can drive (``graphc.front.generate`` feeds each call's presents back as the next pasts): the
present is the past with this call's keys appended, rotary runs in separate ``RotaryEmbedding``
nodes on the model's ``position_ids`` and the model's mask goes into the op as an additive bias.
Each decode step then copies the whole cache into a new present and rebuilds the
[B, 1, S, total] mask. onnxruntime-genai's model builder writes the other form, and genai runs
it faster: with ``past_present_share_buffer = true`` genai allocates each cache once at the
maximum length and passes the same buffer as past and present, so the op appends the new keys
in place. This module rewrites a fused graph into that form, for genai folders only:

- ``do_rotary = 1`` with ``cos_cache``/``sin_cache`` initializers of ``context_length`` rows
  (computed as the graph computed them: ``cos(position · inv_freq)`` in float32) and the
  ``interleaved`` flag of the model's rotary nodes; the pre-rotary projections go straight in
  (after Qwen3's per-head norms, whose rotary runs on [B, heads, S, D] between Transposes, the
  normalized heads go in reshaped to [B, S, heads·D]);
- ``seqlens_k = ReduceSum(attention_mask) - 1`` and ``total_sequence_length =
  attention_mask.shape[1]`` (int32), as the builder computes them; no attention bias, causal.

The op then derives each token's position from ``seqlens_k`` (the past length plus its index),
which is what genai feeds as ``position_ids`` for a batch without padding: the same tokens as
the separate rotary, and the same semantics as the builder's folders for padded batches.

Layers the metadata or HF config lists as without rotary (``no_rope_layers``: SmolLM3's every fourth layer)
go in with ``do_rotary = 0`` and no caches, provided nothing rotates their Q and K in the graph; so
does every layer of a model where nothing rotates any attention's Q and K (GPT-2's absolute
positions: the model keeps reading ``position_ids``, which genai feeds).

A sliding window shorter than the context (the model's ``graphc.arch.sliding_window`` and
``layer_types``, or its HF config) becomes ``local_window_size`` on the layers that slide, the
mask's job before (measured: genai's tokens equal PyTorch's past the window).

Rotary the op cannot take in (not a ``RotaryEmbedding`` over the graph's ``position_ids``: left
as primitive ops, scaled or precomputed caches, rotated dims or a head size that is not a
multiple of 16) stays outside it, as the model's own ops on the ``position_ids`` genai feeds
(``do_rotary = 0`` on that layer, the input kept): the buffer is shared all the same.

All or nothing otherwise: when any attention cannot take this form (no GroupQueryAttention, an
attention window nothing says, a past read by anything but its attention) the graph is left as it
was and the reason is returned, so the folder keeps separate buffers
(``past_present_share_buffer = false``), slower but exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from graphc.core import ops

MS = "com.microsoft"
STEP = "genai-shared-buffer"  # recorded on each rewritten node


@dataclass
class _Reshaped:
    """A [B, S, n·D] value the rewrite makes: ``Reshape(source, shape)`` of the [B, S, n, D]
    value a per-head rotary read (Qwen3's normalized heads), standing for ``like``."""

    source: ir.Value
    shape: ir.Value
    like: ir.Value
    swap: bool = False  # source is [B, n, S, D] (Gemma-3 normalizes after the Transpose): swap first


@dataclass
class _Plan:
    """One GroupQueryAttention and what its rewritten form reads."""

    node: ir.Node
    query: ir.Value | _Reshaped  # [B, S, H·D] before rotary
    key: ir.Value | _Reshaped  # [B, S, Hkv·D] before rotary
    freq: np.ndarray | None  # inv_freq, [D / 2]; None: no rotary inside the op (NoPE, or rotary outside)
    interleaved: int
    window: int = -1  # the op's local_window_size: a sliding layer's window, -1 for none
    outside: str = ""  # why this layer's rotary stays outside the op (its own ops, before Q and K go in)


class _Refused(Exception):
    """A reason the graph keeps separate rotary and buffers."""


def shared_buffer_form(model: ir.Model, context_length: int, hf_config: dict[str, Any] | None = None,
                       notes: list[str] | None = None) -> str | None:
    """Rewrite ``model`` in place into genai's shared-buffer GroupQueryAttention form.

    Returns None when rewritten, else why not (the graph is then unchanged). ``notes`` receives
    what the form leaves as it was: layers whose rotary stays outside the op, and why."""
    if already_shared(model):
        _pack_queries(model, [n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention" and n.domain == MS])
        return None
    try:
        plans, mask = _plan(model, hf_config or {}, context_length)
    except _Refused as reason:
        return str(reason)
    outside = [plan for plan in plans if plan.outside]
    if outside and notes is not None:
        notes.append(f"rotary stays outside GroupQueryAttention on {len(outside)} of {len(plans)} layers "
                     f"(the model's own ops, on the positions genai feeds): {outside[0].outside}")
    _rewrite(model, plans, mask, context_length)
    return None


def already_shared(model: ir.Model) -> bool:
    """The graph is in the shared-buffer form already (onnxruntime-genai's model builder writes
    it; so does this module): every attention a GroupQueryAttention with rotary inside (or none,
    in a layer without rotary), no
    ``position_ids`` input, and each past read by its attention alone (or by a ``Shape`` that
    leaves out its length), so that nothing sees how long the buffer is (the windows, where any,
    are the ops' own)."""
    graph = model.graph
    nodes = [n for n in graph.all_nodes() if n.op_type == "GroupQueryAttention" and n.domain == MS]
    if nodes and all(n.metadata_props.get(ops.META_PASS) == STEP for n in nodes):
        return True  # this module's own form (rotary outside the op on some layers keeps position_ids)
    if not nodes or any(v.name == "position_ids" for v in graph.inputs):
        return False
    rotary = [n for n in nodes if n.attributes.get_int("do_rotary", 0)]
    if not rotary:
        return False
    for node in nodes:
        if node in rotary:
            if len(node.inputs) < 9 or node.inputs[7] is None or node.inputs[8] is None:
                return False
        elif any(v is not None and _rotated(v) for v in node.inputs[:2]):  # rotary outside the op
            return False
    pasts = [v for v in graph.inputs if (v.name or "").startswith("past_key_values.")]
    return bool(pasts) and all(
        (user.op_type == "GroupQueryAttention" and user.domain == MS and index in (3, 4))
        or (user.op_type == "Shape" and user.domain == "" and _reads_no_length(user))
        for past in pasts for user, index in past.uses())


def sliding_window(model: ir.Model, hf: dict[str, Any]) -> tuple[int, list[str]] | None:
    """The attention window the model's metadata (``graphc.arch.sliding_window``) or its HF
    config names (0: none) and the layers' kinds (transformers' ``layer_types``; empty: every
    layer slides); None when neither is there to say."""
    from graphc.exporters.metadata import read_arch_facts

    facts = read_arch_facts(model)
    if facts is None and not hf:
        return None
    windows = [facts.sliding_window if facts is not None else 0]
    if hf.get("use_sliding_window", True):
        windows.append(int(hf.get("sliding_window") or 0))
    kinds = facts.layer_types.split(",") if facts is not None and facts.layer_types else list(hf.get("layer_types") or [])
    return min([w for w in windows if w > 0], default=0), kinds


def _layer(node: ir.Node) -> int | None:
    """The layer of an attention: the ``i`` of its past's name ``past_key_values.{i}.key``."""
    parts = (node.inputs[3].name or "").split(".") if len(node.inputs) > 3 and node.inputs[3] is not None else []
    return int(parts[1]) if len(parts) == 3 and parts[0] == "past_key_values" and parts[1].isdigit() else None


def _plan(model: ir.Model, hf: dict[str, Any], context_length: int) -> tuple[list[_Plan], ir.Value]:
    graph = model.graph
    known = sliding_window(model, hf)
    if known is None:  # another exporter's graph: a sliding window would be in its mask, unseen here
        raise _Refused("the model's attention window is not known (no graphc metadata, no config.json beside it)")
    window, kinds = known
    inputs = {v.name: v for v in graph.inputs}
    mask = inputs.get("attention_mask")
    if mask is None:
        raise _Refused("the decoder has no attention_mask input to derive seqlens_k from")
    nodes = [n for n in graph.all_nodes() if n.op_type == "GroupQueryAttention" and n.domain == MS]
    if not nodes:
        raise _Refused("attention is not GroupQueryAttention (compress with a fuse or int4 recipe for it)")
    nope = _nope_layers(model, hf)
    unrotated = not any(_rotated(v) for n in nodes for v in n.inputs[:2] if v is not None)
    plans = [_plan_one(n, graph, inputs.get("position_ids"), unrotated or _layer(n) in nope) for n in nodes]
    if window and window < context_length:  # a window as long as the context never drops a token
        for plan in plans:  # the op's local window: the model's sliding layers, as its mask had them
            layer = _layer(plan.node)
            if layer is None or (kinds and layer >= len(kinds)):
                raise _Refused(f"{plan.node.name}: the model has a sliding window and this attention's layer is not known")
            kind = kinds[layer] if kinds else "sliding_attention"
            if kind not in ("sliding_attention", "full_attention"):
                raise _Refused(f"{plan.node.name}: layer {layer} attends as {kind!r}")
            if kind == "sliding_attention":
                plan.window = window
    _check_pasts_read_only_by(graph, plans, mask)
    return plans, mask


def _nope_layers(model: ir.Model, hf: dict[str, Any]) -> set[int]:
    """Layers that run without rotary, as the model's metadata (``graphc.arch.rope_layers``) or
    its HF config (``no_rope_layers``: 1 where a layer uses rotary, 0 where not; SmolLM3) say."""
    from graphc.exporters.metadata import read_arch_facts

    facts = read_arch_facts(model)
    flags: Any = facts.rope_layers.split(",") if facts is not None and facts.rope_layers else hf.get("no_rope_layers")
    if not isinstance(flags, list):
        return set()
    return {i for i, use in enumerate(flags) if not int(use)}


def _plan_one(node: ir.Node, graph: ir.Graph, position_ids: ir.Value | None, nope: bool = False) -> _Plan:
    if node.graph is not graph:
        raise _Refused(f"{node.name}: attention inside a subgraph")
    a = node.attributes
    if a.get_int("do_rotary", 0) or a.get_int("local_window_size", -1) != -1:  # a softcap stays as it is
        raise _Refused(f"{node.name}: attention already has rotary or a local window")
    ins = list(node.inputs) + [None] * (12 - len(node.inputs))
    if any(v is None for v in ins[:5]) or any(v is not None for v in ins[7:10] + ins[11:]):
        raise _Refused(f"{node.name}: not query, key, value and the past without rotary caches")
    past_key, past_value = ins[3], ins[4]
    if not (past_key.is_graph_input() and past_value.is_graph_input()):
        raise _Refused(f"{node.name}: its past keys and values are not graph inputs")
    if not all(out.is_graph_output() for out in node.outputs[1:3]):
        raise _Refused(f"{node.name}: its presents are not graph outputs")
    head = _head_size(node)
    if nope:  # the config says no rotary here (or nothing rotates anywhere): the graph must agree
        if any(_rotated(v) for v in ins[:2]):
            raise _Refused(f"{node.name}: its layer has no rotary in the config, yet its query or key is rotated")
        return _Plan(node, ins[0], ins[1], None, 0)
    try:
        if head % 16:
            raise _Refused(f"head size {head} is not a multiple of 16 (ONNX Runtime's rotary inside the op)")
        (q_rot, query), (k_rot, key) = (_whole_head_rotary(v, head, position_ids, node.name) for v in ins[:2])
        if (q_rot.inputs[2] is not k_rot.inputs[2] or q_rot.inputs[3] is not k_rot.inputs[3]
                or _rotary_dims(q_rot, head) != _rotary_dims(k_rot, head)
                or q_rot.attributes.get_int("interleaved", 0) != k_rot.attributes.get_int("interleaved", 0)):
            raise _Refused(f"{node.name}: query and key rotate with different caches")
        freq = _inv_freq(q_rot.inputs[2], q_rot.inputs[3], _rotary_dims(q_rot, head))
    except _Refused as why:  # the model's own rotary stays, on the positions genai feeds; the buffer is shared
        return _Plan(node, ins[0], ins[1], None, 0, outside=str(why))
    return _Plan(node, query, key, freq, q_rot.attributes.get_int("interleaved", 0))


def _rotated(value: ir.Value) -> bool:
    """Some rotary (fused, per head, or primitive ``Sin``/``Cos`` products) upstream of ``value``
    within its attention's input chain: the nearest ops up to a MatMul."""
    seen, stack = set(), [value]
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in seen or node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            continue
        seen.add(id(node))
        if node.op_type in ("RotaryEmbedding", "Sin", "Cos"):
            return True
        stack.extend(v for v in node.inputs if v is not None and v.const_value is None)
    return False


def _head_size(node: ir.Node) -> int:
    past = node.inputs[3]
    if past.shape is None or len(past.shape) != 4 or not isinstance(past.shape[3], int):
        raise _Refused(f"{node.name}: the past's head size is not static")
    return past.shape[3]


def _is(node: ir.Node | None, op: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op and node.domain == domain


def _swaps_heads(node: ir.Node | None) -> bool:
    """A Transpose between [B, S, n, D] and [B, n, S, D]."""
    return _is(node, "Transpose") and list(node.attributes.get_ints("perm", [])) == [0, 2, 1, 3]


def _per_head_rotary(value: ir.Value) -> tuple[ir.Node, _Reshaped] | None:
    """``value = Reshape(Transpose(RotaryEmbedding(Transpose(x))))`` with x [B, S, n, D] (a rotary
    on [B, n, S, D], as after Qwen3's per-head norms): the rotary and x as [B, S, n·D]. Or the
    rotary's input is already [B, n, S, D] (Gemma-3's norm runs after the Transpose): that input,
    swapped back and reshaped."""
    reshape = value.producer()
    if not _is(reshape, "Reshape") or len(reshape.inputs) != 2 or reshape.inputs[1] is None:
        return None
    back = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    rot = back.inputs[0].producer() if _swaps_heads(back) and back.inputs[0] is not None else None
    if not _is(rot, "RotaryEmbedding", MS) or len(rot.inputs) != 4 or rot.inputs[0] is None:
        return None
    there = rot.inputs[0].producer()
    if _swaps_heads(there):
        source, swap = there.inputs[0], False
    else:  # normalized per head after the Transpose: the rotary's own input, swapped back
        source, swap = rot.inputs[0], True
    if source is None or source.shape is None or len(source.shape) != 4:
        return None
    return rot, _Reshaped(source, reshape.inputs[1], value, swap)


def _whole_head_rotary(value: ir.Value, head: int, position_ids: ir.Value | None,
                       where: str) -> tuple[ir.Node, ir.Value | _Reshaped]:
    """The ``RotaryEmbedding`` that produced ``value`` [B, S, heads·D], rotating the whole head at
    the graph's own ``position_ids`` with an unscaled output; and its input as [B, S, heads·D]
    (the op's query or key before rotary). The rotary reads [B, S, heads·D], or [B, heads, S, D]
    between Transposes (:func:`_per_head_rotary`)."""
    rot = value.producer()
    pre: ir.Value | _Reshaped | None = None
    if _is(rot, "RotaryEmbedding", MS) and len(rot.inputs) == 4:
        pre = rot.inputs[0]
        if pre is None or pre.shape is None or len(pre.shape) != 3:
            raise _Refused(f"{where}: rotary input is not [B, S, heads·D]")
    elif (per_head := _per_head_rotary(value)) is not None:
        rot, pre = per_head
    else:
        raise _Refused(f"{where}: query or key is not rotated by a RotaryEmbedding the op can take in "
                       "(partial rotary, or rotary left as primitive ops)")
    dims = _rotary_dims(rot, head)
    if dims % 16:
        raise _Refused(f"{where}: rotary over {dims} of {head} dims (ONNX Runtime's rotary inside the op takes "
                       "a multiple of 16)")
    if rot.attributes.get_int("is_packed_batching", 0) or rot.attributes.get_float("scale", 1.0) != 1.0:
        raise _Refused(f"{where}: rotary over packed batches or with a scale")
    pos = rot.inputs[1]
    while pos is not None and pos.producer() is not None and pos.producer().op_type in ("Cast", "Expand"):
        pos = pos.producer().inputs[0]
    if position_ids is None or pos is not position_ids:
        raise _Refused(f"{where}: rotary positions are not the graph's position_ids")
    return rot, pre


def _rotary_dims(rot: ir.Node, head: int) -> int:
    """The dims of each head a ``RotaryEmbedding`` rotates: all, or the first ``rotary_embedding_dim``
    (partial rotary: Phi-4-mini's 96 of 128; the op inside takes it from its caches' width)."""
    dims = rot.attributes.get_int("rotary_embedding_dim", 0)
    return dims if 0 < dims <= head else head


def _inv_freq(cos: ir.Value, sin: ir.Value, head: int) -> np.ndarray:
    """inv_freq from ``Cos(MatMul(positions, inv_freq))`` / ``Sin(same)`` (``rotary_cache.py``'s
    caches), or from constant caches of consecutive positions."""
    c, s = cos.producer(), sin.producer()
    if c is not None and s is not None and c.op_type == "Cos" and s.op_type == "Sin" and c.inputs[0] is s.inputs[0]:
        angles = c.inputs[0].producer()
        freq = _matmul_weight(angles) if angles is not None else None
        if freq is not None and freq.shape[0] == 1 and 2 * freq.size == head:
            return freq.reshape(-1)
    raise _Refused("rotary caches are not cos/sin of positions × inv_freq over the rotated dims "
                   "(scaled or precomputed caches)")


def _matmul_weight(node: ir.Node) -> np.ndarray | None:
    """The constant [K, N] weight of a ``MatMul``, or of a ``MatMulNBits`` dequantized (a
    quantizer may have taken the [1, D/2] inv_freq for a linear layer: the caches are then
    what that graph computed)."""
    if node.op_type == "MatMul" and node.domain == "":
        return _constant(node.inputs[1])
    if node.op_type != "MatMulNBits" or node.domain != MS or len(node.inputs) > 4:
        return None
    from graphc.passes._blockquant import BlockQuant, unpack

    a = node.attributes
    k, n, bits, block = (a.get_int(name, 0) for name in ("K", "N", "bits", "block_size"))
    packed, scales = _constant(node.inputs[1]), _constant(node.inputs[2])
    zero_value = node.inputs[3] if len(node.inputs) > 3 else None
    zeros = _constant(zero_value) if zero_value is not None else None
    if packed is None or scales is None or (zero_value is not None and zeros is None) or bits not in (2, 4, 8):
        return None
    blocks = -(-k // block)
    q = unpack(packed.reshape(n, blocks, -1), bits, block)
    zero = (unpack(zeros.reshape(n, -1), bits, blocks) if zeros is not None
            else np.full((n, blocks), 1 << (bits - 1), np.uint8))
    quant = BlockQuant(q, scales.reshape(n, blocks), zero, bits, block, k, zeros is None)
    return quant.dequantize().T


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant as float32 (through one Cast, as fp16 scales are stored)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Cast" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
        return node.inputs[0].const_value.numpy().astype(np.float32)
    return None


def _check_pasts_read_only_by(graph: ir.Graph, plans: list[_Plan], mask: ir.Value) -> None:
    """A shared buffer holds ``max_length`` rows, most of them not yet written: any node that
    would still read a past (its shape included) after the rewrite would see them."""
    def values(v: ir.Value | _Reshaped) -> list[ir.Value]:
        return [v.source, v.shape] if isinstance(v, _Reshaped) else [v]

    new_inputs = {id(p.node): [*values(p.query), *values(p.key), *p.node.inputs[2:5], mask] for p in plans}
    live: set[int] = set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        for v in new_inputs.get(id(node), node.inputs):
            if v is not None and v.producer() is not None:
                stack.append(v.producer())
    attention = {id(p.node) for p in plans}
    for p in plans:
        for past in p.node.inputs[3:5]:
            for user, _ in past.uses():
                if id(user) in live and id(user) not in attention and not _reads_no_length(user):
                    raise _Refused(f"{past.name} is also read by {user.op_type} {user.name!r}")


def _reads_no_length(node: ir.Node) -> bool:
    """A ``Shape`` of a past that leaves out its sequence axis (2): batch, heads and head size
    are the same in a shared buffer."""
    if node.op_type != "Shape" or node.domain != "":
        return False
    start = node.attributes.get_int("start", 0) % 4
    end = node.attributes.get_int("end", 4)
    end = end % 4 if end < 0 else min(end, 4)
    return not start <= 2 < end


def _rewrite(model: ir.Model, plans: list[_Plan], mask: ir.Value, context_length: int) -> None:
    graph = model.graph
    first = plans[0].node
    tape = ir.tape.Tape()
    axis = tape.op("Constant", [], {"value": ir.tensor(np.array([1], np.int64))})
    one = tape.op("Constant", [], {"value": ir.tensor(np.array([1], ir.DataType(mask.dtype or ir.DataType.INT64).numpy()))})
    length = tape.op("ReduceSum", [mask, axis], {"keepdims": 0})
    seqlens = tape.op("Cast", [tape.op("Sub", [length, one])], {"to": ir.DataType.INT32})
    width = tape.op("Shape", [mask], {"start": 1, "end": 2})
    total = tape.op("Cast", [tape.op("Squeeze", [width])], {"to": ir.DataType.INT32})
    taken = {v.name for n in graph.all_nodes() for v in n.outputs} | {v.name for v in graph.inputs} | set(graph.initializers)
    for i, node in enumerate(tape.nodes):  # unnamed values would take names the graph already uses
        node.name = _fresh(f"genai_seqlens_{i}", taken)
        node.outputs[0].name = _fresh(f"genai_seqlens_{i}_{node.op_type.lower()}", taken)
        node.metadata_props[ops.META_PASS] = STEP
    seqlens.name, total.name = _fresh("seqlens_k", taken), _fresh("total_sequence_length", taken)
    graph.insert_before(first, tape.nodes)
    caches: dict[bytes, tuple[ir.Value, ir.Value]] = {}
    for i, plan in enumerate(plans):
        node = plan.node
        cos = sin = None
        if plan.freq is not None:
            key = plan.freq.tobytes()
            if key not in caches:
                caches[key] = _caches(graph, plan.freq, context_length, node.inputs[0].dtype, taken)
            cos, sin = caches[key]
        query, key_in = (_made(graph, node, v, taken) for v in (plan.query, plan.key))
        node.resize_inputs(9 if cos is not None else 7)
        for index, value in ((0, query), (1, key_in), (5, seqlens), (6, total), (7, cos), (8, sin)):
            if value is not None:
                node.replace_input_with(index, value)
        node.attributes.pop("causal", None)  # the op's default: causal
        node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", int(cos is not None))
        node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", plan.interleaved)
        if plan.window > 0:
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", plan.window)
        node.metadata_props[ops.META_PASS] = STEP
        for present in node.outputs[1:3]:
            present.shape = ir.Shape([present.shape[0], present.shape[1], "present_sequence_length", present.shape[3]])
        _drop_reshape_round_trips(node, query)
    common.RemoveUnusedNodesPass()(model)  # the separate rotary goes: Q and K have one reader each
    _pack_queries(model, [plan.node for plan in plans])
    unused = [v for v in graph.inputs if v.name == "position_ids" and not v.uses()]
    for value in unused:  # genai then feeds no positions (the op derives them)
        graph.inputs.remove(value)


def _made(graph: ir.Graph, before: ir.Node, value: ir.Value | _Reshaped, taken: set[str]) -> ir.Value:
    """``value``, or the Reshape a :class:`_Reshaped` stands for (inserted before ``before``)."""
    if isinstance(value, ir.Value):
        return value
    source, made = value.source, []
    if value.swap:
        swapped = ir.Value(name=_fresh(f"{value.like.name}_heads_last", taken), type=value.source.type)
        made.append(ir.Node("", "Transpose", [source], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])],
                            outputs=[swapped], name=_fresh(f"{before.name}_heads_last", taken)))
        source = swapped
    out = ir.Value(name=_fresh(f"{value.like.name}_pre_rotary", taken), shape=value.like.shape, type=value.like.type)
    made.append(ir.Node("", "Reshape", [source, value.shape], outputs=[out],
                        name=_fresh(f"{before.name}_pre_rotary", taken)))
    for node in made:
        node.metadata_props[ops.META_PASS] = STEP
    graph.insert_before(before, made)
    return out


def _pack_queries(model: ir.Model, nodes: list[ir.Node]) -> None:
    """:func:`_packed_qkv` on each attention; the Splits it bypassed go."""
    if sum(_packed_qkv(node) for node in nodes):
        common.RemoveUnusedNodesPass()(model)


def _packed_qkv(node: ir.Node) -> bool:
    """Query, key and value that are one ``Split`` of one projection (``pack-nbits``' packed
    Q/K/V ``MatMulNBits``) go in as the op's packed input, as the builder's folders feed it: the
    Split's copies go."""
    q, k, v = node.inputs[:3]
    split = q.producer() if q is not None else None
    if split is None or split.op_type != "Split" or split.domain != "" or len(split.outputs) != 3:
        return False
    if list(split.outputs) != [q, k, v] or any(len(o.uses()) != 1 or o.is_graph_output() for o in split.outputs):
        return False
    source = split.inputs[0]
    rank = len(source.shape) if source is not None and source.shape is not None else 0
    if source is None or rank != 3 or split.attributes.get_int("axis", 0) not in (-1, 2):
        return False
    node.replace_input_with(0, source)
    node.replace_input_with(1, None)
    node.replace_input_with(2, None)
    node.metadata_props["graphc.genai.packed_qkv"] = "1"
    return True


def _drop_reshape_round_trips(node: ir.Node, query: ir.Value) -> None:
    """The value goes in, and the output comes out, through Reshape pairs that end where they
    started ([B, S, n·D] → [B, S, n, D] → [B, S, n·D], left by the Transposes that cancelled
    around the fused op): each costs a kernel call per layer and decode step for nothing."""
    source = _round_trip(node.inputs[2])
    if source is not None:
        node.replace_input_with(2, source)
    out = node.outputs[0]
    users = [user for user, _ in out.uses()]
    if len(users) != 1 or users[0].op_type != "Reshape" or users[0].domain != "":
        return
    for user, _ in list(users[0].outputs[0].uses()):
        if user.op_type == "Reshape" and user.domain == "" and _round_trip(user.outputs[0], query) is not None:
            end = user.outputs[0]
            if not end.is_graph_output():
                out.shape = end.shape
                if out.type is None:  # a contrib op's output shape inference left untyped
                    out.type = end.type
                ir.convenience.replace_all_uses_with(end, out)


def _round_trip(value: ir.Value | None, start: ir.Value | None = None) -> ir.Value | None:
    """``x`` when ``value = Reshape(Reshape(x))`` has ``x``'s (or ``start``'s) known shape."""
    second = value.producer() if value is not None else None
    first = second.inputs[0].producer() if second is not None and second.op_type == "Reshape" else None
    if first is None or first.op_type != "Reshape" or second.domain or first.domain:
        return None
    source = first.inputs[0]
    reference = start if start is not None else source
    return source if _same_shape(reference.shape, value.shape) else None


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Equal by construction: static dims equal, symbolic dims named alike by shape inference."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... : the first not yet in ``taken`` (then taken)."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _caches(graph: ir.Graph, freq: np.ndarray, rows: int, dtype: ir.DataType | None,
            taken: set[str]) -> tuple[ir.Value, ir.Value]:
    """cos/sin caches [rows, D/2], computed in float32 as the graph did (then in the model's dtype)."""
    angles = np.arange(rows, dtype=np.float32)[:, None] * freq[None, :]
    np_type = ir.DataType(dtype).numpy() if dtype is not None else np.float32
    values = []
    for name, fn in (("cos_cache", np.cos), ("sin_cache", np.sin)):
        tensor = ir.tensor(fn(angles).astype(np_type), name=_fresh(name, taken))
        value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        values.append(value)
    return values[0], values[1]

"""Inputs synthesized from a model's signature for validation and calibration when no real
data is at hand: ids inside the vocabulary, masks with a padded row, images in a plausible
range, KV-cache decoders' past and present, each bounded in bytes (value_checks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphc.core.errors import ValidationError
from graphc.checks.value_checks import SYNTH_BYTES_LIMIT, check_synth_size

# Symbolic dims get these sizes when inputs are synthesized.
SYNTH_BATCH = 2
SYNTH_SEQ = 16
SYNTH_PAST = 5  # KV-cache decoders: past_sequence; total_sequence = past + sequence

_NP_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.BOOL: np.bool_,
}


def _vocab_size(model: ir.Model, input_value: ir.Value) -> int | None:
    for user, _ in input_value.uses():
        if user.op_type in ("Gather", "GatherBlockQuantized") and user.inputs[0] is not None:
            shape = user.inputs[0].shape
            if shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
                return shape[0]
        if user.op_type == "Cast" and user.outputs:
            found = _vocab_size(model, user.outputs[0])
            if found:
                return found
    return None


PAST_PREFIX = "past_key_values."  # KV-cache decoder inputs (graphc.exporters.decoder)


def is_kv_decoder(model: ir.Model) -> bool:
    return any((v.name or "").startswith(PAST_PREFIX) for v in model.graph.inputs)


_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention")


def _attention_of(value: ir.Value) -> ir.Node | None:
    """The com.microsoft attention op that reads a past input."""
    return next((u for u, _ in value.uses() if u.op_type in _ATTENTION_OPS and u.domain == "com.microsoft"), None)


def past_kv_heads(value: ir.Value) -> int | None:
    """The KV heads of a past input whose dim 1 is symbolic, from the attention op reading it."""
    attn = _attention_of(value)
    if attn is None:
        return None
    return attn.attributes.get_int("kv_num_heads", 0) or attn.attributes.get_int("num_heads", 0) or None


def past_head_size(value: ir.Value) -> int | None:
    """The head size of a past key/value input [batch, kv_heads, past, head] whose last dim is
    symbolic (onnxruntime-genai's model builder names it ``kv_cache_dim``): from the attention
    op that reads it, its query projection's width over its heads (Q, K and V packed into the
    query when the op has no key input). None when no such op or constant weight says it."""
    attn = _attention_of(value)
    if attn is None or not attn.inputs:
        return None
    heads = attn.attributes.get_int("num_heads", 0)
    kv_heads = attn.attributes.get_int("kv_num_heads", heads)
    width = _projected_width(attn.inputs[0])
    packed = len(attn.inputs) < 2 or attn.inputs[1] is None
    parts = heads + 2 * kv_heads if packed else heads
    return width // parts if heads and width and width % parts == 0 else None


def _projected_width(value: ir.Value | None, depth: int = 0) -> int | None:
    """The last dim of ``value``: static, or the output width of the constant-weight MatMul
    (or MatMulNBits) that makes it, through a bias Add."""
    if value is None or depth > 3:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return int(value.shape[-1])
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "MatMul" and len(node.inputs) > 1 and node.inputs[1] is not None:
        w = node.inputs[1]
        if w.const_value is not None and w.shape is not None and isinstance(w.shape[-1], int):
            return int(w.shape[-1])
    if node.op_type == "MatMulNBits":
        n = node.attributes.get_int("N", 0)
        return n or None
    if node.op_type == "Add":
        return next((w for x in node.inputs if (w := _projected_width(x, depth + 1))), None)
    return None


def _past_dims(value: ir.Value, batch: int, past: int, seq: int) -> list[int]:
    """A past input's dims where symbolic: the batch, the past length (``past + seq`` for a dim
    named total), and for [batch, kv_heads, past, head] the KV heads and head size from the
    attention op that reads it."""
    shape = list(value.shape or [])
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif i == 0:
            dims.append(batch)
        elif len(shape) == 4 and i in (1, 3):
            size = past_kv_heads(value) if i == 1 else past_head_size(value)
            if size is None:
                raise ValidationError(f"cannot tell the {'KV heads' if i == 1 else 'head size'} of input "
                                      f"{value.name!r} (dim {d!r}): give its shape with --input-shape or the inputs "
                                      "with --inputs")
            dims.append(size)
        elif "total" in str(d).lower():
            dims.append(past + seq)
        else:
            dims.append(past)
    return dims


def complete_decoder_feeds(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Text feeds (input_ids, attention_mask) made into prefill calls of a KV-cache decoder:
    positions from the mask, an empty past. Other models' feeds are returned as they are."""
    if not is_kv_decoder(model):
        return list(feeds)
    out = []
    for feed in feeds:
        feed = dict(feed)
        batch = feed["input_ids"].shape[0]
        for value in model.graph.inputs:
            if value.name in feed:
                continue
            if value.name == "position_ids" and "attention_mask" in feed:
                feed[value.name] = np.clip(np.cumsum(feed["attention_mask"], axis=1) - 1, 0, None).astype(np.int64)
            elif value.name.startswith(PAST_PREFIX) and value.shape is not None:
                dims = _past_dims(value, batch, 0, 0)
                feed[value.name] = np.zeros(dims, _NP_TYPES.get(value.dtype, np.float32))
        out.append(feed)
    return out


def synthesize_inputs(
    model: ir.Model, *, count: int = 4, seed: int = 0, batch: int = SYNTH_BATCH, seq: int = SYNTH_SEQ,
    shapes: Mapping[str, Sequence[int]] | None = None, decode_past: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Plausible feeds from the input signature (ids within the vocabulary, masks of ones,
    images [N, 1|3, H, W] uniform on [-1, 1] at 64x64 where H and W are free; symbolic batch
    and sequence dims take ``batch`` and ``seq``; ``shapes`` fixes an input's dims).
    ``decode_past``: a KV-cache decoder's feeds are all decode steps, one new token after a
    past of that many positions (else prefill and decode calls in turn)."""
    rng = np.random.default_rng(seed)
    synth_batch, synth_seq = batch, seq
    feeds = []
    kv = is_kv_decoder(model)
    for k in range(count):
        # KV-cache decoders get the calls they are made for, prefill (no past) and decode (one
        # token after a past), in turn: ORT's GroupQueryAttention refuses several new tokens
        # after a past at batch > 1
        past, seq = ((0, synth_seq) if k % 2 == 0 else (SYNTH_PAST, 1)) if kv else (SYNTH_PAST, synth_seq)
        if kv and decode_past is not None:
            past, seq = decode_past, 1
        feed: dict[str, np.ndarray] = {}
        for value in model.graph.inputs:
            if value.name in model.graph.initializers:
                continue
            dtype = _NP_TYPES.get(value.dtype) if value.dtype is not None else np.float32
            if value.dtype == ir.DataType.STRING:
                dtype = np.str_
            if dtype is None:
                raise ValidationError(f"cannot synthesize input {value.name!r} of type {value.dtype}: "
                                      "give the inputs (--inputs)")
            image = _is_image(value)
            dims = []
            if kv and value.name.startswith(PAST_PREFIX) and value.shape is not None:
                dims = _past_dims(value, synth_batch, past, seq)
            for i, d in enumerate([] if dims else value.shape or []):
                if isinstance(d, int) and d >= 0:  # -1 (Paddle, tf2onnx) means unknown
                    dims.append(d)
                else:
                    dname = str(d).lower() if d is not None else ""
                    if "past" in dname:
                        dims.append(past)
                    elif "total" in dname:
                        dims.append(past + seq)
                    elif image and i >= 2:
                        dims.append(SYNTH_IMAGE)
                    else:
                        dims.append(synth_batch if ("batch" in dname or (i == 0 and "seq" not in dname)) else seq)
            if shapes and value.name in shapes:
                dims = list(shapes[value.name])
            budget = SYNTH_BYTES_LIMIT - sum(a.nbytes for a in feed.values())
            check_synth_size(value.name, dims, dtype, budget)
            name = value.name.lower()
            if dtype is np.str_:
                words = ("the", "model", "reads", "plain", "text", "here", "again", "words")
                arr = np.array([" ".join(rng.choice(words, 6)) for _ in range(int(np.prod(dims)))],
                               dtype=object).reshape(dims)
            elif np.issubdtype(dtype, np.integer):
                if "mask" in name:
                    arr = np.ones(dims, dtype=dtype)
                    if len(dims) == 2 and dims[0] > 1 and dims[1] > 2:
                        arr[1:, dims[1] // 2 :] = 0  # a padded row exercises masking
                elif "type" in name:
                    arr = np.zeros(dims, dtype=dtype)
                elif "position" in name:
                    start = past if kv else 0
                    arr = np.broadcast_to(np.arange(start, start + dims[-1], dtype=dtype), dims).copy()
                else:
                    high = _vocab_size(model, value) or 100
                    arr = rng.integers(0, high, size=dims, dtype=np.int64).astype(dtype)
            elif dtype == np.bool_:
                arr = np.ones(dims, dtype=dtype)
            elif image:  # normalized pixels: (x / 255 - mean) / std lies within about [-2, 2]
                arr = rng.uniform(-1.0, 1.0, dims).astype(dtype)
            else:
                arr = rng.standard_normal(dims).astype(dtype)
            feed[value.name] = arr
        feeds.append(feed)
    return feeds


SYNTH_IMAGE = 64  # free H and W of a synthesized image (a multiple of 32: detectors downsample by 32)


def _is_image(value: ir.Value) -> bool:
    """A float [N, C, H, W] input with 1, 3 or 4 channels read by a Conv (through cheap ops)."""
    shape = value.shape
    if value.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16) or shape is None or len(shape) != 4:
        return False
    if shape[1] not in (1, 3, 4):
        return False
    frontier, seen = [value], 0
    while frontier and seen < 8:
        v = frontier.pop()
        for user, _ in v.uses():
            seen += 1
            if user.op_type in ("Conv", "ConvInteger", "QLinearConv"):
                return True
            if user.op_type in ("Mul", "Add", "Sub", "Div", "Cast", "Transpose", "Pad", "Identity"):
                frontier.extend(user.outputs)
    return False

"""Greedy generation through ONNX Runtime with a KV-cache decoder (graphc export --kv-cache).

Prefill runs the prompt with a zero-length past; each decode step feeds the last token and
the presents back as the past. Works for float32 and compressed decoders alike (the cache
dtype is read from the session). Batch rows must have the same prompt length (no padding).
Those are the only calls a decoder fused by ``fuse-ort`` needs: its GroupQueryAttention (ONNX
Runtime) refuses several new tokens after a past at batch > 1, which this never sends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from graphc.core.errors import GraphcError, InvalidModelError

_PAST = "past_key_values."


@dataclass
class Generation:
    tokens: np.ndarray  # [batch, new tokens]
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # wall time of each decode step

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second per row (the first token comes from the prefill)."""
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0


class Decoder:
    """An ONNX Runtime session over a KV-cache decoder, with greedy generation."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None, session=None) -> None:
        from graphc.core.session import make_session

        self.path = model
        self.session = session or make_session(model, threads=threads, what="KV-cache decoder")
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(_PAST)]
        missing = {"input_ids", "attention_mask", "position_ids"} - set(inputs)
        if missing == {"position_ids"} and self.past_names and "input_ids" in inputs:
            # graphc.exporters.genai_gqa's form: past and present are one buffer genai allocates
            raise InvalidModelError(
                "a genai folder's model in the shared past/present buffer form: generate with onnxruntime-genai "
                "(graphc.exporters.genai.generate), or compress without --genai for graphc.front.generate", path=model)
        if missing or not self.past_names:
            raise InvalidModelError(
                "not a KV-cache decoder (export one with `graphc export ... --kv-cache`): "
                f"no {', '.join(sorted(missing)) or 'past_key_values.* inputs'}", path=model)
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        absent = [n for n in ["logits", *self.present_names] if n not in outputs]
        if absent:
            raise InvalidModelError(f"KV-cache decoder without output {absent[0]!r}", path=model)
        first = inputs[self.past_names[0]]
        self.cache_dtype = np.float16 if "float16" in first.type else np.float32
        self.kv_heads, self.head_dim = (d if isinstance(d, int) else None for d in (first.shape[1], first.shape[3]))
        if self.kv_heads is None or self.head_dim is None:
            raise InvalidModelError(f"input {first.name!r} has no static kv_heads/head_dim axes: {first.shape}", path=model)

    def step(self, ids: np.ndarray, past: list[np.ndarray], total: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: logits of the last position and the new cache."""
        batch, seq = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.broadcast_to(np.arange(total - seq, total, dtype=np.int64), (batch, seq)).copy(),
            **dict(zip(self.past_names, past)),
        }
        try:
            logits, *present = self.session.run(["logits", *self.present_names], feed)
        except Exception as e:  # noqa: BLE001 - ORT's errors are one class per kind
            raise GraphcError(f"decoder run failed: {str(e).splitlines()[0][:300]}") from None
        return logits[:, -1], present

    def greedy(self, input_ids: np.ndarray, max_new_tokens: int, *, eos_token_id: int | None = None) -> Generation:
        """Greedy decoding of ``max_new_tokens`` tokens after the prompt ``input_ids`` [batch, seq]."""
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        batch, total = ids.shape
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        t = time.perf_counter()
        last, past = self.step(ids, [empty] * len(self.past_names), total)
        out = Generation(np.zeros((batch, 0), np.int64), prefill_s=time.perf_counter() - t)
        tokens = []
        for i in range(max_new_tokens):
            token = last.argmax(-1).astype(np.int64)
            tokens.append(token)
            if i == max_new_tokens - 1 or (eos_token_id is not None and (token == eos_token_id).all()):
                break
            total += 1
            t = time.perf_counter()
            last, past = self.step(token[:, None], past, total)
            out.step_s.append(time.perf_counter() - t)
        out.tokens = np.stack(tokens, axis=1)
        return out

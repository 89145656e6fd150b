"""Generation through ONNX Runtime with a KV-cache decoder (graphc export --kv-cache): greedy,
or sampled with a temperature, top-k and top-p (:mod:`graphc.front.sampling`).

Prefill runs the prompt with a zero-length past; each decode step feeds the last token and
the presents back as the past. Works for float32 and compressed decoders alike (the cache
dtype is read from the session). Batch rows must have the same prompt length (no padding).
Those are the only calls a decoder fused by ``fuse-ort`` needs: its GroupQueryAttention (ONNX
Runtime) refuses several new tokens after a past at batch > 1, which this never sends.

A model in the shared past/present buffer form (a ``--genai`` folder's, or onnxruntime-genai's
model builder's: ``graphc.exporters.genai_gqa``) is driven as onnxruntime-genai drives it: one
cache buffer per past, allocated once for every position the call feeds and bound
(ONNX Runtime's I/O binding) as both the past input and the present output, so that each step's
keys and values are written in place and nothing is copied back; the attention mask grows by a
column a step (its length is the op's total length). Its KV heads and head size come from the
past inputs' shapes, or from ``genai_config.json`` beside the model where those are symbolic.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from graphc.core.errors import GraphcError, InvalidModelError
from graphc.front.sampling import Sampling, check_repetition_penalty, greedy, penalize_repeats

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
        self.shared = bool(self.past_names) and _shared_buffer_form(model)
        self.position_ids = "position_ids" in inputs
        missing = {"input_ids", "attention_mask", "position_ids"} - set(inputs)
        if self.shared:
            missing.discard("position_ids")  # positions come from the attention mask (rotary inside the op)
        if missing or not self.past_names:
            raise InvalidModelError(
                "not a KV-cache decoder (export one with `graphc export ... --kv-cache`): "
                f"no {'past_key_values.* inputs' if not self.past_names else ', '.join(sorted(missing))}", path=model)
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        absent = [n for n in ["logits", *self.present_names] if n not in outputs]
        if absent:
            raise InvalidModelError(f"KV-cache decoder without output {absent[0]!r}", path=model)
        first = inputs[self.past_names[0]]
        self.cache_dtype = np.float16 if "float16" in first.type else np.float32
        self.kv_heads, self.head_dim = (d if isinstance(d, int) else None for d in (first.shape[1], first.shape[3]))
        genai = _genai_section(model) if self.shared else {}
        if self.kv_heads is None or self.head_dim is None:  # symbolic in the builder's graphs: its config says
            decoder = genai.get("decoder") if isinstance(genai.get("decoder"), dict) else {}
            self.kv_heads = self.kv_heads or decoder.get("num_key_value_heads")
            self.head_dim = self.head_dim or decoder.get("head_size")
        # the positions a shared-buffer model takes (its rotary caches' rows), where its folder says
        self.context_length = _positive_int(genai.get("context_length"))
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
        return self.decode(input_ids, max_new_tokens, eos_token_id=eos_token_id)

    def decode(self, input_ids: np.ndarray, max_new_tokens: int, *, eos_token_id: int | None = None,
               sampling: Sampling | None = None, repetition_penalty: float = 1.0) -> Generation:
        """``max_new_tokens`` tokens after the prompt ``input_ids`` [batch, seq], each the arg max
        of the last logits, or drawn as ``sampling`` says, after a ``repetition_penalty`` (1: none)
        on the tokens the row holds so far (:mod:`graphc.front.sampling`)."""
        pick = sampling.picker() if sampling is not None else greedy
        penalty = check_repetition_penalty(repetition_penalty)
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        batch, total = ids.shape
        if self.shared:
            length = total + max(max_new_tokens - 1, 0)  # positions ever fed: the last new token is not
            if self.context_length and length > self.context_length:
                raise GraphcError(f"a prompt of {total} tokens and {max_new_tokens} new ones pass the model's "
                                  f"context of {self.context_length} positions")
            steps = _SharedSteps(self, batch, length)
            step = steps.step
        else:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
            past = [empty] * len(self.past_names)

            def step(new: np.ndarray, total: int) -> np.ndarray:
                nonlocal past
                last, past = self.step(new, past, total)
                return last

        t = time.perf_counter()
        last = step(ids, total)
        out = Generation(np.zeros((batch, 0), np.int64), prefill_s=time.perf_counter() - t)
        tokens, seen = [], ids  # seen: each row's tokens so far, for the repetition penalty
        for i in range(max_new_tokens):
            if penalty != 1:
                last = penalize_repeats(last, seen, penalty)
            token = pick(last)
            tokens.append(token)
            if penalty != 1:
                seen = np.concatenate([seen, token[:, None]], axis=1)
            if i == max_new_tokens - 1 or (eos_token_id is not None and (token == eos_token_id).all()):
                break
            total += 1
            t = time.perf_counter()
            last = step(token[:, None], total)
            out.step_s.append(time.perf_counter() - t)
        out.tokens = np.stack(tokens, axis=1)
        return out


class _SharedSteps:
    """Calls on a shared-buffer model (see the module doc): each past bound with its present to
    one buffer of ``length`` positions, written in place by the attention op."""

    def __init__(self, decoder: Decoder, batch: int, length: int) -> None:
        import onnxruntime as ort

        self.decoder = decoder
        self.binding = decoder.session.io_binding()
        shape = (batch, decoder.kv_heads, length, decoder.head_dim)
        # one zeroed buffer per cache (a Python reference keeps each alive while bound)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, decoder.cache_dtype))
                        for _ in decoder.past_names]
        for past, buf in zip(decoder.past_names, self.buffers):
            self.binding.bind_ortvalue_input(past, buf)
        self.length = length

    def _bind_outputs(self) -> None:
        """The logits (ONNX Runtime allocates them: their length changes from the prompt to a
        step) and each present in its past's buffer."""
        self.binding.clear_binding_outputs()
        self.binding.bind_output("logits")
        for present, buf in zip(self.decoder.present_names, self.buffers):
            self.binding.bind_ortvalue_output(present, buf)

    def step(self, ids: np.ndarray, total: int) -> np.ndarray:
        """One call: the logits of the last position; the caches grow in place."""
        batch, seq = ids.shape
        if total > self.length:
            raise GraphcError(f"shared cache of {self.length} positions is full at {total}")
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                "attention_mask": np.ones((batch, total), np.int64)}
        if self.decoder.position_ids:  # rotary outside the op on some layers reads them
            feed["position_ids"] = np.broadcast_to(np.arange(total - seq, total, dtype=np.int64), (batch, seq)).copy()
        for name, value in feed.items():
            self.binding.bind_cpu_input(name, value)
        self._bind_outputs()
        try:
            self.decoder.session.run_with_iobinding(self.binding)
        except Exception as e:  # noqa: BLE001 - ORT's errors are one class per kind
            raise GraphcError(f"decoder run failed: {str(e).splitlines()[0][:300]}") from None
        logits = self.binding.get_outputs()[0].numpy()
        return logits[:, -1]


def _shared_buffer_form(model: str | os.PathLike) -> bool:
    """The model's graph (read without its weights) is in the shared past/present buffer form."""
    import onnx
    import onnx_ir as ir

    from graphc.exporters.genai_gqa import already_shared

    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(os.fspath(model), load_external_data=False)
    except (OSError, TypeError, ValueError, DecodeError):
        return False
    return already_shared(ir.serde.deserialize_model(proto))


def _genai_section(model: str | os.PathLike) -> dict:
    """The ``model`` section of the ``genai_config.json`` beside the model ({} when there is none)."""
    from graphc.exporters.genai import model_section

    return model_section(Path(os.fspath(model)).parent)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass
class GenerateResult:
    """What :func:`generate` made: the new tokens (and their text when the prompt was text)."""

    tokens: list[int]
    text: str | None
    prefill_ms: float
    decode_tokens_per_s: float
    shared_buffers: bool  # the caches were shared buffers written in place (a genai folder's model)
    model: str
    sampling: Sampling | None = None  # None: greedy; else the settings, the seed drawn included

    def to_dict(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "text": self.text, "prefill_ms": round(self.prefill_ms, 1),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "shared_buffers": self.shared_buffers,
                "sampling": asdict(self.sampling) if self.sampling is not None else None}


def generate(model: str | os.PathLike, prompt: str | list[int], max_new_tokens: int = 32, *,
             threads: int | None = None, stop_at_eos: bool = True, temperature: float | None = None,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             repetition_penalty: float = 1.0, min_p: float = 0.0) -> GenerateResult:
    """Generation with a KV-cache decoder through ONNX Runtime: greedy, unless a ``temperature``
    above 0, a ``top_k``, a ``top_p`` below 1 or a ``min_p`` above 0 asks for sampling
    (temperature 1 where only the filters are given; 0 is greedy). ``seed`` makes the draws repeatable; without one a seed is
    drawn and reported in the result's ``sampling``, so that any run can be repeated.
    ``repetition_penalty`` (greedy or sampled; 1: none) makes the tokens already in the text less likely.

    ``model``: a KV-cache ``.onnx`` (``graphc export --kv-cache``, compressed or not) or a folder
    holding one as ``model.onnx`` (a ``--genai`` folder, onnxruntime-genai's model builder's).
    ``prompt``: token ids, or text tokenized with the ``tokenizer.json`` beside the model (the
    new tokens then come back as text too). Stops after the end-of-sequence token that the
    folder's ``genai_config.json``, ``generation_config.json`` or ``config.json`` names, unless
    ``stop_at_eos`` is False."""
    path = _model_file(Path(os.fspath(model)))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GraphcError(f"max_new_tokens={max_new_tokens!r}: a whole number >= 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise GraphcError(f"threads={threads!r}: a whole number >= 1")
    tokenizer = None
    if isinstance(prompt, str):
        from graphc.checks import tokenizer_file

        tokenizer = tokenizer_file.load(path.parent)
        if tokenizer is None:
            raise InvalidModelError("no tokenizer.json beside the model that graphc can read: give token ids",
                                    path=path)
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise GraphcError("the prompt is empty")
    sampling = _sampling(temperature, top_k, top_p, seed, min_p)
    check_repetition_penalty(repetition_penalty)
    decoder = Decoder(path, threads=threads)
    eos = _eos_token(path.parent) if stop_at_eos else None
    out = decoder.decode(np.array([ids], np.int64), max_new_tokens, eos_token_id=eos, sampling=sampling,
                         repetition_penalty=repetition_penalty)
    tokens = out.tokens[0].tolist()
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    return GenerateResult(tokens, text, out.prefill_s * 1e3, out.decode_tokens_per_s, decoder.shared, str(path),
                          sampling)


def _sampling(temperature: float | None, top_k: int, top_p: float, seed: int | None,
              min_p: float = 0.0) -> Sampling | None:
    """None (greedy) unless sampling is asked for; a seed drawn when none is given."""
    asked = (temperature is not None and temperature != 0) or top_k != 0 or top_p != 1 or min_p != 0
    if temperature == 0 or not asked:
        Sampling(top_k=top_k, top_p=top_p, seed=seed, min_p=min_p)  # bad values are refused even when unused
        return None
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    return Sampling(temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p, seed=seed,
                    min_p=min_p)


def _model_file(path: Path) -> Path:
    """The .onnx of ``path``: itself, or a folder's ``genai_config.json`` decoder file / ``model.onnx``."""
    import json

    if path.is_dir():
        name = "model.onnx"
        config = path / "genai_config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text())["model"]["decoder"]["filename"]
            except (OSError, ValueError, KeyError, TypeError):
                raise InvalidModelError("genai_config.json does not name the decoder's file", path=config) from None
        path = path / name
    if not path.is_file():
        raise InvalidModelError("no such model file (give a .onnx or a folder with model.onnx)", path=path)
    return path


def _eos_token(folder: Path) -> int | None:
    """The end-of-sequence token id the folder's configs name (the first, where they list several)."""
    import json

    for name in ("genai_config.json", "generation_config.json", "config.json"):
        try:
            value = json.loads((folder / name).read_text())
            value = (value["model"] if name == "genai_config.json" else value)["eos_token_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None

"""The user's texts as feeds (``--calibration-data`` texts, ``--tokenizer DIR``), and the task
metrics that judge a text model on them.

The tokenizer is the model's own, found in this order: ``--tokenizer DIR`` (the user said so);
the model spec's (``graphc.model_recipe`` metadata); tokenizer files beside the .onnx
(``tokenizer.json`` or ``tokenizer_config.json``: a genai folder, or files copied there); the
Hugging Face folder ``graphc export`` recorded in the metadata (``graphc.source_folder``).

A causal LM (``input_ids`` in, ``logits`` out, no other kind in its metadata) gets its texts joined
and cut into windows of ``max_length`` tokens (the tail is a shorter window), as perplexity is
measured; an encoder gets one row per text, padded to the batch's longest (or to a fixed
sequence length), truncated at ``max_length``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import CalibrationDataError, GraphcError, MissingDependencyError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SOURCE_FOLDER_KEY = ops.META_SOURCE_FOLDER
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def is_causal_lm(model: ir.Model) -> bool:
    """A text model with a ``logits`` output, taken as next-token scores (perplexity means
    something) unless the metadata names another kind: graphc's exporters give ``logits`` to
    causal LMs only among text models (a recipe export such as smollm2 writes no kind)."""
    from graphc.checks.synth import is_kv_decoder

    kind = model.metadata_props.get(f"{ops.META_ARCH_PREFIX}kind", "")
    has_ids = any(v.name == "input_ids" for v in model.graph.inputs)
    logits = any(v.name == "logits" for v in model.graph.outputs)
    return logits and has_ids and (kind in ("", "decoder") or is_kv_decoder(model))


def check_text_model(model: ir.Model, where: Path) -> None:
    """Texts fit a model that takes ``input_ids`` and otherwise only inputs text can fill."""
    from graphc.checks.synth import PAST_PREFIX

    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    if "input_ids" not in names:
        raise CalibrationDataError(f"texts need a model that takes input_ids; this one takes {', '.join(names) or 'nothing'}",
                                   path=where)
    other = [n for n in names if n not in _TEXT_INPUTS and not n.startswith(PAST_PREFIX)]
    if other:
        raise CalibrationDataError(f"texts cannot fill input {other[0]!r} of this model", path=where)


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def find_tokenizer(model: ir.Model, model_path: Path | None, explicit: str | Path | None, model_name: str) -> tuple[Any, str]:
    """(tokenizer, where it came from); a one-line error naming the model when none is found."""
    if explicit is not None:
        folder = Path(explicit)
        if not _has_files(folder):
            raise CalibrationDataError(f"--tokenizer: no {' or '.join(TOKENIZER_FILES)} in this folder", path=folder)
        return _load(str(folder)), str(folder)
    name = model.metadata_props.get(ops.META_MODEL_SPEC)
    if name:
        try:
            from graphc.models import get_model_spec

            recipe = get_model_spec(name)
            return recipe.tokenizer(), f"model spec {name}"
        except (ImportError, GraphcError, AttributeError):
            pass
    candidates = [model_path.parent] if model_path is not None else []
    if model.metadata_props.get(SOURCE_FOLDER_KEY):
        candidates.append(Path(model.metadata_props[SOURCE_FOLDER_KEY]))
    for folder in candidates:
        if _has_files(folder):
            return _load(str(folder)), str(folder)
    raise CalibrationDataError(f"{model_name}: no tokenizer found for this model (no model spec, no tokenizer.json "
                               "beside it): pass --tokenizer DIR (a folder with tokenizer.json)")


@functools.cache
def _load(folder: str) -> Any:
    from graphc.checks import tokenizer_file
    from graphc.core.arch import hf_offline

    light = tokenizer_file.load(folder)  # the same ids without importing transformers (and torch)
    if light is not None:
        return light
    hf_offline()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("tokenizing texts needs transformers (pip install graphc[export])") from None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises assorted errors
        raise CalibrationDataError(f"cannot load the tokenizer: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                                   path=folder) from None


def _ids(tokenizer: Any, texts: Sequence[str], special: bool, max_length: int | None = None) -> list[list[int]]:
    """Token ids per text; ``max_length`` truncates as the tokenizer does (keeping [SEP] and the like)."""
    cut = {"truncation": True, "max_length": max_length} if max_length else {}
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special, **cut)["input_ids"]]


def _fixed_seq(model: ir.Model) -> int | None:
    for value in model.graph.inputs:
        if value.name == "input_ids" and value.shape is not None and len(value.shape) == 2:
            d = value.shape[1]
            return d if isinstance(d, int) and d > 0 else None
    return None


def text_feeds(model: ir.Model, tokenizer: Any, texts: Sequence[str], *, batch: int, max_length: int,
               where: Path) -> list[dict[str, np.ndarray]]:
    """Feeds for the model's text inputs (see the module docstring), KV-cache pasts empty."""
    from graphc.core.inputs import check_feed
    from graphc.checks.synth import complete_decoder_feeds

    fixed = _fixed_seq(model)
    length = fixed or max_length
    if is_causal_lm(model):
        ids = [t for row in _ids(tokenizer, ["\n\n".join(texts)], False) for t in row]
        rows = [ids[i:i + length] for i in range(0, len(ids), length)]
        rows = [r for r in rows if len(r) >= 2 and (fixed is None or len(r) == fixed)]
        full = [r for r in rows if len(r) == length]
        groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[r] for r in rows if len(r) < length]
    else:
        rows = _ids(tokenizer, texts, True, length)
        groups = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    if not groups:
        raise CalibrationDataError(f"the texts give no window of {length} tokens", path=where)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    vocab = model.metadata_props.get(f"{ops.META_ARCH_PREFIX}vocab_size")
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    names = {v.name for v in inputs}
    out = []
    for group in groups:
        width = fixed or max(len(r) for r in group)
        ids = np.full((len(group), width), pad, np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for i, r in enumerate(group):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        if vocab and vocab.isdigit() and int(ids.max()) >= int(vocab):
            raise CalibrationDataError(f"the tokenizer gives token id {int(ids.max())}, beyond the model's vocabulary of "
                                       f"{vocab}: it is not this model's tokenizer (pass --tokenizer)", path=where)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)}
        out.append({k: v for k, v in feed.items() if k in names})
    out = complete_decoder_feeds(model, out)
    for feed in out:
        check_feed(feed, inputs, where)  # casts int32 inputs; names the file if a dim does not fit
    return out


# --------------------------------------------------------------------------- task metrics


def perplexity_task(feeds: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]],
                    outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any] | None:
    """Perplexity of the rewritten model's ``logits`` vs the original's on the same windows
    (token-weighted): the figure ``--max-ppl-rise`` gates."""
    from graphc.checks import measure

    if not feeds or "input_ids" not in feeds[0] or "logits" not in reference[0] or "logits" not in outputs[0]:
        return None
    ref = measure.perplexity(_replay(feeds, reference, "logits"), feeds)
    got = measure.perplexity(_replay(feeds, outputs, "logits"), feeds)
    return {"metric": "perplexity", "reference": round(ref.perplexity, 4), "value": round(got.perplexity, 4),
            "relative_rise": round(measure.relative_rise(got.perplexity, ref.perplexity), 5),
            "tokens": got.tokens, "windows": got.windows}


def _replay(feeds, outputs, name: str):
    by_feed = {id(f): o[name] for f, o in zip(feeds, outputs)}
    return lambda feed: by_feed[id(feed)]


def embedding_cosine_task(feeds: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]],
                          outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any] | None:
    """Cosine of the rewritten model's sentence embeddings to the original's, sentence by
    sentence: ``sentence_embedding`` when the model has it, else ``last_hidden_state``
    mean-pooled over the attention mask."""
    from graphc.checks import measure

    if not feeds or not reference:
        return None
    if "sentence_embedding" in reference[0] and "sentence_embedding" in outputs[0]:
        ref = np.concatenate([r["sentence_embedding"] for r in reference])
        got = np.concatenate([o["sentence_embedding"] for o in outputs])
        of = "sentence_embedding"
    elif "last_hidden_state" in reference[0] and "last_hidden_state" in outputs[0] and "attention_mask" in feeds[0]:
        ref = np.concatenate([measure.mean_pool(r["last_hidden_state"], f["attention_mask"]) for f, r in zip(feeds, reference)])
        got = np.concatenate([measure.mean_pool(o["last_hidden_state"], f["attention_mask"]) for f, o in zip(feeds, outputs)])
        of = "mean-pooled last_hidden_state"
    else:
        return None
    stats = measure.cosine_stats(got, ref)
    return {"metric": "embedding_cosine", "of": of, "mean": round(stats.mean, 6), "min": round(stats.min, 6),
            "sentences": stats.count}


def text_task(model: ir.Model):
    """The task metric for a text model on the user's texts."""
    return perplexity_task if is_causal_lm(model) else embedding_cosine_task

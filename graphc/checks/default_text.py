"""Real text for a text model without a model spec: paragraphs of Wikipedia articles (the
offline data package the model specs read) tokenized by the model's own tokenizer, found
beside the .onnx or in the folder ``graphc export`` read.

A model judged on synthesized token ids is judged on noise: a decoder's perplexity means
nothing there, an encoder's embeddings of random ids say little about its embeddings of
sentences, and a plan measured on random ids spends bytes where real text does not need them.
With a tokenizer at hand, calibration takes the Wikipedia calibration split and validation the
evaluation split (disjoint articles):

- a causal LM: windows of the joined text, judged by the perplexity rise. The shape follows the
  SmolLM2 model spec, whose numbers were measured (models/smollm2.py): calibration windows of
  512 tokens, one a feed, up to 128 of them (GPTQ's Hessians want tens of thousands of tokens);
  validation 2 feeds of 4 windows of 128 tokens;
- a text encoder: one paragraph a row (truncated at 128 tokens), 16 a feed, judged by the
  cosine of the pooled embeddings, as the MiniLM model spec is (64 validation paragraphs,
  calibration capped at 16 feeds).

Windows are cut shorter where the model's ``config.json`` allows fewer positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphc.core.errors import GraphcError

SOURCE_PREFIX = "Wikipedia text"
CALIBRATION_LENGTH = 512
CALIBRATION_MAX_FEEDS = 128
VALIDATION_TEXTS = 8
VALIDATION_BATCH = 4
VALIDATION_LENGTH = 128
VALIDATION_MAX_FEEDS = 2
ENCODER_BATCH = 16
ENCODER_LENGTH = 128
ENCODER_VALIDATION_TEXTS = 64
ENCODER_CALIBRATION_MAX_FEEDS = 16


def _max_positions(model: ir.Model) -> int | None:
    """The longest sequence the model serves: its Hugging Face config's, else the rows of the
    rotary caches inside the graph (another exporter's decoder, e.g. onnxruntime-genai's model
    builder, whose GroupQueryAttention refuses a longer one)."""
    return _config_positions(model) or _rotary_positions(model)


# (op type, index of its cos cache input): rotary tables of this many rows cap the positions
_ROTARY_CACHE_INPUT = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}


def _rotary_positions(model: ir.Model) -> int | None:
    rows = []
    for node in model.graph:
        at = _ROTARY_CACHE_INPUT.get(node.op_type)
        if at is None or node.domain != "com.microsoft" or len(node.inputs) <= at or node.inputs[at] is None:
            continue
        if node.op_type == "GroupQueryAttention" and not node.attributes.get_int("do_rotary", 0):
            continue
        shape = node.inputs[at].shape
        if shape is not None and len(shape) == 2 and isinstance(shape[0], int) and shape[0] > 1:
            rows.append(int(shape[0]))
    return min(rows) if rows else None


def _config_positions(model: ir.Model) -> int | None:
    from graphc.checks.text_data import SOURCE_FOLDER_KEY

    folder = model.metadata_props.get(SOURCE_FOLDER_KEY)
    if not folder:
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = text.get(key) if isinstance(text, dict) else None
        if isinstance(value, int) and value > 1:
            return value
    return None


def text_feeds(model: ir.Model, model_path: Path | None, split: str,
               count: int) -> tuple[list[dict[str, np.ndarray]], str] | None:
    """(feeds, source) of ``split`` ("calibration": up to ``count`` paragraphs; "validation")
    for a text model (inputs text can fill) with a findable tokenizer and the text package
    installed; else None."""
    from graphc.checks import text_data

    if not any(v.name == "input_ids" for v in model.graph.inputs):
        return None
    try:
        text_data.check_text_model(model, Path(model_path or "model"))
        tok, where = text_data.find_tokenizer(model, model_path, None, "model")
        from graphc.models import data

        texts = data.wiki_text("calibration" if split == "calibration" else "eval")
    except (GraphcError, ImportError, OSError):
        return None
    limit = _max_positions(model)
    causal = text_data.is_causal_lm(model)
    if causal and split == "calibration":
        length, batch, texts, cap = CALIBRATION_LENGTH, 1, texts[:max(count, 1)], CALIBRATION_MAX_FEEDS
    elif causal:
        length, batch, texts, cap = VALIDATION_LENGTH, VALIDATION_BATCH, texts[:VALIDATION_TEXTS], VALIDATION_MAX_FEEDS
    elif split == "calibration":
        length, batch, texts, cap = ENCODER_LENGTH, ENCODER_BATCH, texts[:max(count, 1)], ENCODER_CALIBRATION_MAX_FEEDS
    else:
        length, batch, texts, cap = ENCODER_LENGTH, ENCODER_BATCH, texts[:ENCODER_VALIDATION_TEXTS], None
    length = min(length, limit or length)
    try:
        feeds = text_data.text_feeds(model, tok, texts, batch=batch, max_length=length, where=Path(where))[:cap]
    except GraphcError:
        return None
    rows = sum(len(f["input_ids"]) for f in feeds)
    longest = max(f["input_ids"].shape[1] for f in feeds)
    what = f"{rows} windows of up to {longest} tokens" if causal else f"{rows} paragraphs of up to {longest} tokens"
    return feeds, f"{SOURCE_PREFIX}: {what} (the model's tokenizer: {where})"


def task_for(model: ir.Model, input_source: str) -> Any:
    """The task metric for feeds this module made (perplexity for a causal LM, pooled-embedding
    cosine for an encoder), else None."""
    if input_source.startswith(SOURCE_PREFIX):
        from graphc.checks.text_data import text_task

        return text_task(model)
    return None

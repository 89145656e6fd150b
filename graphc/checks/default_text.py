"""Real text for a causal LM without a model spec: paragraphs of Wikipedia articles (the
offline data package the model specs read) tokenized by the model's own tokenizer, found
beside the .onnx or in the folder ``graphc export`` read.

A decoder judged on synthesized token ids is judged on noise: its perplexity means nothing
and a 4-bit plan measured on random ids spends bytes where real text does not need them. With
a tokenizer at hand, calibration takes windows of the Wikipedia calibration split (articles
disjoint from the evaluation split) and validation measures the perplexity rise on windows of
the evaluation split. The shape follows the SmolLM2 model spec, whose numbers were measured
(models/smollm2.py): calibration windows of 512 tokens, one a feed, up to 128 of them (GPTQ's
Hessians want tens of thousands of tokens); validation 2 feeds of 4 windows of 128 tokens.
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


def _max_positions(model: ir.Model) -> int | None:
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


def decoder_text_feeds(model: ir.Model, model_path: Path | None, split: str,
                       count: int) -> tuple[list[dict[str, np.ndarray]], str] | None:
    """(feeds, source) of ``split`` ("calibration": up to ``count`` paragraphs; "validation")
    for a causal LM with a findable tokenizer and the text package installed; else None."""
    from graphc.checks import text_data

    if not text_data.is_causal_lm(model):
        return None
    try:
        tok, where = text_data.find_tokenizer(model, model_path, None, "model")
        from graphc.models import data

        texts = data.wiki_text("calibration" if split == "calibration" else "eval")
    except (GraphcError, ImportError, OSError):
        return None
    limit = _max_positions(model)
    try:
        if split == "calibration":
            length = min(CALIBRATION_LENGTH, limit or CALIBRATION_LENGTH)
            texts = texts[:max(count, 1)]
            feeds = text_data.text_feeds(model, tok, texts, batch=1, max_length=length, where=Path(where))
            feeds = feeds[:CALIBRATION_MAX_FEEDS]
        else:
            length = min(VALIDATION_LENGTH, limit or VALIDATION_LENGTH)
            texts = texts[:VALIDATION_TEXTS]
            feeds = text_data.text_feeds(model, tok, texts, batch=VALIDATION_BATCH, max_length=length,
                                         where=Path(where))[:VALIDATION_MAX_FEEDS]
    except GraphcError:
        return None
    windows = sum(len(f["input_ids"]) for f in feeds)
    longest = max(f["input_ids"].shape[1] for f in feeds)
    return feeds, (f"{SOURCE_PREFIX}: {len(texts)} paragraphs, {windows} windows of up to {longest} tokens "
                   f"(the model's tokenizer: {where})")


def task_for(input_source: str) -> Any:
    """The task metric for feeds this module made (perplexity), else None."""
    if input_source.startswith(SOURCE_PREFIX):
        from graphc.checks.text_data import perplexity_task

        return perplexity_task
    return None

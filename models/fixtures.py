"""Tiny randomly initialised models for fast tests (never for judging quality)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from graphc.models.base import hf_offline

TINY_VOCAB = 100
TINY_MAX_POSITIONS = 128


def tiny_bert(seed: int = 0) -> Any:
    """BertModel: hidden 32, 2 layers, 4 heads, intermediate 64, vocab 100."""
    hf_offline()
    import torch
    from transformers import AutoModel, BertConfig

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=TINY_VOCAB, max_position_embeddings=TINY_MAX_POSITIONS,
    )
    torch.manual_seed(seed)
    return AutoModel.from_config(config, dtype=torch.float32).eval()


def tiny_llama(seed: int = 0) -> Any:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads, 2 KV heads, intermediate 64, vocab 100."""
    hf_offline()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=TINY_VOCAB, max_position_embeddings=TINY_MAX_POSITIONS,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# A folder where export_tiny keeps each distinct export and copies it from on later calls (the
# test suite sets it, shared by its worker processes: the same tiny models are exported by many
# test modules). Unset: every call exports.
CACHE_ENV = "GRAPHC_TINY_EXPORT_CACHE"


def export_tiny(
    kind: Literal["bert", "llama"], path: str | os.PathLike, *, seed: int = 0, batch: int = 2, seq: int = 16,
    dynamo: bool = True,
    attn_implementation: str | None = None,
) -> Any:
    """Export a tiny model to ``path``; returns the ExportResult. ``attn_implementation``
    ("sdpa", "eager") overrides transformers' default attention code. With :data:`CACHE_ENV`
    set, an export with the same arguments made before (by any process) is copied instead."""
    args = dict(seed=seed, batch=batch, seq=seq, dynamo=dynamo, attn_implementation=attn_implementation)
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return _export_tiny(kind, path, **args)
    return _cached(Path(cache), f"{kind}-s{seed}-b{batch}-q{seq}-{'dynamo' if dynamo else 'legacy'}-{attn_implementation}",
                   lambda where: _export_tiny(kind, where, **args), Path(path))


def _cached(cache: Path, key: str, export: Any, path: Path) -> Any:
    """The export under ``cache/key`` (made there under a file lock when missing), copied to ``path``."""
    import dataclasses
    import pickle
    import shutil

    from filelock import FileLock

    folder = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{key}.lock")):
        if not (folder / "result.pickle").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = export(folder / "model.onnx")
            (folder / "result.pickle").write_bytes(pickle.dumps(result))
    result = pickle.loads((folder / "result.pickle").read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for f in result.files or [result.path]:
        name = path.name if Path(f).name == "model.onnx" else Path(f).name
        shutil.copyfile(folder / Path(f).name, path.parent / name)
        files.append(path.parent / name)
    return dataclasses.replace(result, path=path, files=files)


def _export_tiny(kind: str, path: str | os.PathLike, *, seed: int, batch: int, seq: int, dynamo: bool,
                 attn_implementation: str | None) -> Any:
    from graphc.exporters.hf import export_module, text_example_inputs, wrap_causal_lm, wrap_encoder
    from graphc.exporters.metadata import arch_facts_from_config

    if kind == "bert":
        model = tiny_bert(seed)
        module, inputs, outputs = wrap_encoder(model), ("input_ids", "attention_mask", "token_type_ids"), ("last_hidden_state",)
    elif kind == "llama":
        model = tiny_llama(seed)
        module, inputs, outputs = wrap_causal_lm(model), ("input_ids", "attention_mask"), ("logits",)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose 'bert' or 'llama'")
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    example = text_example_inputs(inputs, vocab_size=TINY_VOCAB, batch=batch, seq=seq, seed=seed)
    return export_module(
        module, example, path, arch_facts_from_config(model.config), output_names=outputs, dynamo=dynamo
    )

"""Export a causal LM with its KV cache: one graph for prefill and decode.

Inputs: ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past + sequence],
``position_ids`` [batch, sequence], and for each layer ``past_key_values.{i}.key`` /
``.value`` [batch, kv_heads, past_sequence, head_dim]. Outputs: ``logits`` and
``present.{i}.key`` / ``.value`` (the past with this call's keys and values appended). Prefill
is the same graph called with a zero-length past; decode feeds one token and the presents
back. The names follow ONNX Runtime GenAI's and Optimum's convention. Only the dynamo exporter
is used: the legacy exporter cannot trace transformers 5.x caches.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from graphc.core.errors import ExportError, GraphcError
from graphc.exporters import metadata as meta
from graphc.exporters.hf import ExportResult, Progress, _first_line, _say, quiet, require_torch
from graphc.exporters.spec import is_spec

KV_CACHE_KEY = "graphc.decoder.kv_cache"  # model metadata: "past_key_values.{i}.key" naming


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key before value, layer by layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def wrap_decoder_with_cache(model: Any) -> Any:
    """``(input_ids, attention_mask, position_ids, *past)`` -> ``(logits, *present)`` for an HF
    causal LM, with the flat past tensors turned into a transformers DynamicCache."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class DecoderWithCache(torch.nn.Module):
        scope_prefix = "model."

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: ANN001, ANN201
            # a full cache on every layer, never transformers' sliding one (built from the config):
            # the present is always past + new, and a sliding window is applied in the mask. Traced
            # with the sliding cache, the graph failed at run time once the text passed the window
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache(model).eval()


def example_inputs(config: Any, *, batch: int = 2, seq: int = 3, past: int = 4, seed: int = 0) -> tuple:
    """Positional torch example inputs for tracing (a non-empty past, so that no axis is 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=gen) for _ in range(2 * config.num_hidden_layers)]
    return ids, mask, positions, cache


def export_decoder(
    source: Any, out_path: str | os.PathLike, *, opset: int | None = None, progress: Progress | None = None,
) -> ExportResult:
    """Export a causal LM with KV cache. ``source``: a transformers causal LM, or a model
    recipe (instance or name) whose ``load_hf()`` gives one."""
    require_torch()
    start = time.perf_counter()
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ExportError("output folder does not exist", path=out_path)
    recipe_name, model = _load(source, progress)
    config = model.config
    can_generate = getattr(model, "can_generate", None)
    if (not hasattr(config, "num_hidden_layers") or getattr(config, "is_encoder_decoder", False)
            or not (callable(can_generate) and can_generate())):
        raise ExportError(f"{type(model).__name__} is not a decoder-only causal LM; --kv-cache exports those only",
                          path=out_path)
    facts = meta.arch_facts_from_config(config)
    past_names, present_names = cache_names(config.num_hidden_layers)
    module = wrap_decoder_with_cache(model)
    args = example_inputs(config)
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names]
    shapes = ({0: "batch", 1: "sequence"}, {0: "batch", 1: "total_sequence"}, {0: "batch", 1: "sequence"},
              [{0: "batch", 2: "past_sequence"} for _ in past_names])
    _say(progress, "exporting with torch.onnx (dynamo) with the KV cache")
    import torch

    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                output_names=["logits", *present_names], opset_version=opset, verbose=False, optimize=True,
            )
    except Exception as e:  # noqa: BLE001 - torch.export raises many error types
        raise ExportError(f"KV-cache export failed: {type(e).__name__}: {_first_line(e)}", path=out_path) from None
    graph_model = program.model
    _say(progress, "checking parity with PyTorch")
    parity = check_cache_parity(graph_model, module, config)
    if not parity.ok:
        raise ExportError(f"the exported graph does not match PyTorch: {parity.describe()}; nothing written",
                          path=out_path)
    _say(progress, f"writing {out_path}")
    meta.compact_node_metadata(graph_model, strip_prefix=module.scope_prefix, all_nodes=True)
    meta.write_model_metadata(graph_model, exporter="dynamo", arch_facts=facts, recipe=recipe_name)
    graph_model.metadata_props[KV_CACHE_KEY] = "past_key_values.{i}.key/value -> present.{i}.key/value"
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "config.json").is_file():
        from graphc.core import ops  # the folder, so that --calibration-data finds the tokenizer (graphc.checks.text_data)

        graph_model.metadata_props[ops.META_SOURCE_FOLDER] = os.fspath(Path(source).resolve())
    from graphc.core.io import save_model

    files = save_model(graph_model, out_path)
    return ExportResult(
        path=out_path, exporter="dynamo", input_names=tuple(v.name for v in graph_model.graph.inputs),
        output_names=tuple(v.name for v in graph_model.graph.outputs), arch_facts=facts, recipe=recipe_name,
        files=files, seconds=time.perf_counter() - start, parity=parity,
    )


def check_cache_parity(graph_model: Any, module: Any, config: Any) -> Any:
    """Logits and presents of the graph vs PyTorch on a decode step (batch 3, past 5, one new
    token, a padded row) and a prefill (batch 1, no past, 6 tokens)."""
    import numpy as np

    from graphc.exporters.parity import check_parity

    names = [v.name for v in graph_model.graph.inputs]
    feeds = []
    for batch, seq, past, seed in ((3, 1, 5, 1), (1, 6, 0, 2)):
        ids, mask, positions, cache = example_inputs(config, batch=batch, seq=seq, past=past, seed=seed)
        if batch > 1:
            mask[-1, : past // 2] = 0  # a left-padded row
        values = [ids, mask, positions, *cache]
        feeds.append({n: v.numpy() for n, v in zip(names, values)})

    def run(feed: dict) -> list:
        import torch

        tensors = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names]
        with quiet(), torch.no_grad():
            out = module(tensors[0], tensors[1], tensors[2], tensors[3:])
        return [t.detach().float().numpy() for t in out]

    return check_parity(graph_model, run, feeds, what="a decode step (batch 3, past 5, 1 token, a padded row) "
                        "and a prefill (batch 1, no past, 6 tokens)")


def _load(source: Any, progress: Progress | None) -> tuple[str | None, Any]:
    if isinstance(source, (str, os.PathLike)):
        if not (Path(source) / "config.json").is_file():
            raise ExportError("not a Hugging Face folder with config.json", path=os.fspath(source))
        _require_decoder_family(Path(source))
        return None, _load_folder(Path(source))
    if not is_spec(source):
        return None, source.eval()
    load = getattr(source, "load_hf", None)
    if load is None:
        raise ExportError(f"model spec {source.name!r} has no causal LM to export with a KV cache")
    _say(progress, f"loading {source.name}")
    try:
        with quiet():
            return source.name, load()
    except GraphcError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises assorted errors
        raise ExportError(f"cannot load the {source.name!r} model: {type(e).__name__}: {_first_line(e)}") from None


def _require_decoder_family(folder: Path) -> None:
    """One-line refusal for a folder whose model_type is not a supported decoder family."""
    from graphc.exporters import families
    from graphc.exporters.hf import require_torch

    require_torch()
    from transformers import AutoConfig

    try:
        with quiet():
            config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises assorted errors
        raise ExportError(f"cannot load config.json: {_first_line(e)}", path=folder) from None
    family = families.family_for(config, path=folder / "config.json")
    if family.kind != families.DECODER:
        decoders = [t for f in families.FAMILIES if f.kind == families.DECODER for t in f.model_types]
        article = "an" if family.kind[0] in "aeiou" else "a"
        raise ExportError(f"--kv-cache exports decoder-only causal LMs ({', '.join(decoders)}); model_type "
                          f"{config.model_type!r} is {article} {family.kind} model", path=folder / "config.json")


def _load_folder(folder: Path) -> Any:
    from graphc.core.arch import hf_offline

    hf_offline()
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with quiet():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - transformers raises assorted errors
        raise ExportError(f"cannot load a causal LM from it: {type(e).__name__}: {_first_line(e)}", path=folder) from None

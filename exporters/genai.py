"""onnxruntime-genai folders: a KV-cache decoder that ``og.Model`` loads and generates with.

A folder holds ``model.onnx`` (+ its external data), ``genai_config.json`` and the tokenizer's
files. graphc's KV-cache export already uses genai's default I/O names (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` → ``logits``,
``present.{i}.key/value``) and computes each present as the past with this call's keys and
values appended, also after ``fuse-ort`` turns its attention into GroupQueryAttention (see
``passes/_fusion_rules/gqa_kv.py``): the contract ``graphc.front.generate`` drives. A fused graph is
written in the form genai serves fastest instead (``genai_gqa.py``: rotary inside the op over
a shared past/present buffer, ``past_present_share_buffer = true``); a graph that cannot take
that form keeps separate buffers (``false``: genai feeds each call's presents back as the next
past) and the reason becomes a notice.

The architecture facts come from the model's metadata (written at export), the I/O names from
the graph itself; the tokenizer files from the Hugging Face folder (or the model spec's
converted folder, or a genai folder the input model came from). A folder genai cannot load is
never left behind: when onnxruntime-genai is installed, the written folder is loaded with
``og.Model`` and one greedy step is generated before the call returns.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from graphc.core.errors import ExportError

CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")
# genai's model types (its "type"); GPT-2 goes as the generic "decoder": genai's "gpt2" type
# expects the legacy combined past ("past_%d", keys and values stacked), not graphc's names
_KINDS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
          "gemma3_text": "gemma3_text", "gemma3": "gemma3_text", "gemma2": "gemma2", "gemma": "gemma",
          "phi": "phi", "gpt2": "decoder", "olmo": "olmo", "granite": "granite"}


def output_folder(output: str | os.PathLike) -> Path:
    """``-o`` for a genai folder: a directory (created), never a file path ending in .onnx."""
    path = Path(output)
    if path.suffix == ".onnx":
        raise ExportError("--genai writes a folder (model.onnx, genai_config.json, tokenizer files): give -o a "
                          "folder, not a .onnx file", path=path)
    if path.exists() and not path.is_dir():
        raise ExportError("--genai output exists and is not a folder", path=path)
    if path.is_dir() and any(path.iterdir()):
        raise ExportError("--genai output folder is not empty (graphc never replaces files it did not write)", path=path)
    return path


def check_decoder(model: Any, path: str | os.PathLike) -> dict[str, str]:
    """The decoder's genai I/O names, or a one-line ExportError when the graph is no KV-cache
    decoder (an encoder, or a decoder exported without ``--kv-cache``)."""
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    if not any(n.startswith("past_key_values.") for n in inputs) or "logits" not in outputs:
        raise ExportError("--genai needs a causal LM exported with its KV cache (graphc export --kv-cache): this model "
                          f"has inputs {', '.join(inputs[:4])} and outputs {', '.join(outputs[:3])}", path=path)
    names = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
             "past_value_names": "past_key_values.%d.value"}
    for optional in ("attention_mask", "position_ids"):
        if optional in inputs:
            names[optional] = optional
    return names


def genai_config(model: Any, tokenizer_folder: Path | None, *, context_length: int | None = None,
                 shared_buffer: bool = False) -> dict[str, Any]:
    """genai_config.json for a graphc KV-cache decoder (facts from the model's metadata);
    ``shared_buffer``: the graph is in ``genai_gqa``'s shared-buffer form."""
    from graphc.exporters.metadata import read_arch_facts

    arch = read_arch_facts(model)
    facts: dict[str, Any] = dict(arch.__dict__) if arch is not None else {}
    hf = _hf_config(tokenizer_folder)
    # a genai folder the model came from (graphc's, or another tool's such as the model
    # builder's): its context (sizes the rotary caches), and its facts where the model's metadata
    # and a Hugging Face config are silent
    src = model_section(tokenizer_folder)
    dec = src.get("decoder", {})
    if context_length is None:
        context_length = src.get("context_length")
    layers = sum(1 for v in model.graph.inputs if v.name.endswith(".key") and v.name.startswith("past_key_values."))
    heads = facts.get("num_heads") or hf.get("num_attention_heads") or dec.get("num_attention_heads")
    kv_heads = facts.get("num_kv_heads") or hf.get("num_key_value_heads") or dec.get("num_key_value_heads") or heads
    head_dim = (facts.get("head_dim") or hf.get("head_dim") or (hf.get("hidden_size", 0) // max(heads or 1, 1))
                or dec.get("head_size"))
    hidden = facts.get("hidden_size") or hf.get("hidden_size") or dec.get("hidden_size")
    vocab = facts.get("vocab_size") or hf.get("vocab_size") or src.get("vocab_size")
    missing = [k for k, v in {"num_heads": heads, "head_dim": head_dim, "hidden_size": hidden, "vocab_size": vocab}.items()
               if not v]
    if missing:
        raise ExportError(f"--genai: the model does not say its {', '.join(missing)} (no graphc metadata, no config.json)")
    gen = {}
    if tokenizer_folder is not None and (tokenizer_folder / "generation_config.json").is_file():
        gen = json.loads((tokenizer_folder / "generation_config.json").read_text())

    def token(key: str, default: int) -> Any:
        value = gen.get(key, hf.get(key, src.get(key)))
        return default if value is None else value

    inputs = check_decoder(model, "model")
    return {
        "model": {
            "bos_token_id": token("bos_token_id", 1),
            "eos_token_id": token("eos_token_id", 2),
            "pad_token_id": token("pad_token_id", 0) if not isinstance(token("pad_token_id", 0), list) else 0,
            "context_length": int(context_length or hf.get("max_position_embeddings") or facts.get("max_positions") or 2048),
            "vocab_size": int(vocab),
            "type": (_KINDS.get(str(hf.get("model_type") or facts.get("model_type")), "llama")
                     if hf.get("model_type") or facts.get("model_type") else src.get("type", "llama")),
            "decoder": {
                # 0: ONNX Runtime's own default, one intra-op thread per physical core. Without the
                # key genai sets half the logical cores (at most 16), which assumes two hardware
                # threads a core: one thread on a 2-core machine without SMT (cloud vCPUs, ARM), a
                # decode ~1.6x slower there (docs/genai.md)
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    "intra_op_num_threads": 0},
                "filename": MODEL_FILE,
                "head_size": int(head_dim),
                "hidden_size": int(hidden),
                "num_attention_heads": int(heads),
                "num_key_value_heads": int(kv_heads),
                "num_hidden_layers": int(layers),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": int(context_length or hf.get("max_position_embeddings") or 2048),
                   "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": shared_buffer,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def tokenizer_source(model: Any, model_path: Path | None, hf_folder: Path | None) -> Path | None:
    """Where the tokenizer files are: the HF folder (for a model spec, its converted folder:
    the caller finds it, ``graphc.models.hf_folder_of``), or a genai folder the model sits in."""
    if hf_folder is not None and hf_folder.is_dir():
        return hf_folder
    if model_path is not None and (model_path.parent / CONFIG).is_file():
        return model_path.parent
    return None


def spec_folder(spec: Any) -> Path | None:
    """A model spec's Hugging Face folder (SmolLM2's converted one), or None."""
    folder = getattr(spec, "hf_folder", None)
    try:
        return Path(folder()) if callable(folder) else None
    except Exception:  # noqa: BLE001 - a spec whose folder cannot be made: no tokenizer files
        return None


def write_folder(model: Any, folder: Path, *, source: Path | None, check: bool = True,
                 context_length: int | None = None, shared_buffer: bool = True,
                 notices: list[str] | None = None) -> list[Path]:
    """Write ``model`` as a genai folder (model.onnx + data, genai_config.json, tokenizer files);
    load it with og.Model when onnxruntime-genai is installed. On any failure the folder's new
    files are removed. Returns the files written.

    ``shared_buffer``: first rewrite ``model`` in place into genai's shared-buffer form
    (``genai_gqa.py``); where it cannot take that form, why is appended to ``notices``."""
    from graphc.exporters.genai_gqa import shared_buffer_form
    from graphc.core.io import save_model

    check_decoder(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        config = genai_config(model, source, context_length=context_length)
        if shared_buffer:
            notes: list[str] = []
            reason = shared_buffer_form(model, config["model"]["context_length"], _hf_config(source), notes)
            if notices is not None:
                notices.extend(f"genai folder: {note}" for note in notes)
            if reason is None:
                config = genai_config(model, source, context_length=context_length, shared_buffer=True)
            elif notices is not None:
                notices.append(f"genai folder keeps separate past/present buffers and rotary (slower decode): {reason}")
        written += save_model(model, folder / MODEL_FILE)
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        written.append(folder / CONFIG)
        if source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file() and not (folder / name).exists():
                    shutil.copyfile(source / name, folder / name)
                    written.append(folder / name)
        if check:
            load_check(folder)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def rewrite_folder(source: str | os.PathLike, output: str | os.PathLike) -> list[str]:
    """Write the genai folder ``source`` again as ``output`` with this version's writer (the
    shared-buffer form where the graph allows it), without recompressing. Returns the notices."""
    import onnx_ir as ir

    src = Path(source)
    config = json.loads((src / CONFIG).read_text())
    model = ir.load(src / config["model"]["decoder"]["filename"])
    folder = output_folder(output)
    notices: list[str] = []
    write_folder(model, folder, source=src, context_length=config["model"].get("context_length"), notices=notices)
    return notices


def model_section(folder: Path | None) -> dict[str, Any]:
    """The ``model`` section of the genai_config.json in ``folder`` ({} when there is none)."""
    if folder is None or not (folder / CONFIG).is_file():
        return {}
    try:
        section = json.loads((folder / CONFIG).read_text()).get("model", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


def _hf_config(folder: Path | None) -> dict[str, Any]:
    if folder is not None and (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    return {}


def load_check(folder: Path) -> bool:
    """Load the folder with onnxruntime-genai and generate one greedy token (True), or
    return False when onnxruntime-genai is not installed. A failure is a one-line ExportError."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return False
    import numpy as np

    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=8, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([[1, 2, 3]], dtype=np.int32))
        generator.generate_next_token()
    except Exception as e:  # noqa: BLE001 - genai raises its own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"onnxruntime-genai cannot run the folder: {first}", path=folder) from None
    return True


def generate(folder: str | os.PathLike, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai for one prompt (batch 1)."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(os.fspath(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def export_folder(source: Any, output: str | os.PathLike, export_decoder, **kwargs: Any):
    """``graphc export SOURCE -o FOLDER --kv-cache --genai``: the KV-cache export, written as a
    genai folder. ``export_decoder`` is graphc.exporters.decoder.export_decoder."""
    import tempfile

    import onnx_ir as ir

    folder = output_folder(output)
    with tempfile.TemporaryDirectory(prefix="graphc-genai-") as tmp:
        result = export_decoder(source, Path(tmp) / MODEL_FILE, **kwargs)
        model = ir.load(Path(tmp) / MODEL_FILE)
        hf = Path(os.fspath(source)) if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() else spec_folder(source)
        created = not folder.exists()
        try:
            result.files = write_folder(model, folder, source=tokenizer_source(model, None, hf),
                                        notices=result.notices)
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise
    result.path = folder / MODEL_FILE
    return result

"""The architecture families ``graphc export HF_FOLDER`` knows, and how each is loaded and fed.

A folder's ``model_type`` picks its family; the family says the modality (token ids or
``pixel_values``), which transformers class loads it, what the exported graph takes and
returns, and which axes are dynamic. Anything else is refused in one line that names the
``model_type`` and lists the supported ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graphc.core.arch import ArchFacts
from graphc.core.errors import ExportError, GraphcError

if TYPE_CHECKING:
    import torch

ENCODER, VISION, DECODER = "encoder", "vision", "decoder"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class Family:
    """One architecture family. ``towers``: (model_type, transformers class) that loads the
    vision tower of an image-text model (CLIP with its projection: ``image_embeds``)."""

    name: str
    model_types: tuple[str, ...]
    kind: str
    towers: tuple[tuple[str, str], ...] = ()

    @property
    def modality(self) -> str:
        return "vision" if self.kind == VISION else "text"


FAMILIES: tuple[Family, ...] = (
    Family("BERT", ("bert",), ENCODER),
    Family("RoBERTa", ("roberta",), ENCODER),
    Family("XLM-RoBERTa", ("xlm-roberta",), ENCODER),
    Family("DeBERTa-v2", ("deberta-v2",), ENCODER),
    Family("DistilBERT", ("distilbert",), ENCODER),
    Family("ELECTRA", ("electra",), ENCODER),
    Family("MPNet", ("mpnet",), ENCODER),
    Family("ModernBERT", ("modernbert",), ENCODER),
    Family("ViT", ("vit",), VISION),
    Family("DINOv2", ("dinov2",), VISION),
    Family("CLIP vision tower", ("clip_vision_model", "clip"), VISION,
           towers=(("clip_vision_model", "CLIPVisionModel"), ("clip", "CLIPVisionModelWithProjection"))),
    Family("SigLIP vision tower", ("siglip_vision_model", "siglip"), VISION,
           towers=(("siglip_vision_model", "SiglipVisionModel"), ("siglip", "SiglipVisionModel"))),
    Family("Llama", ("llama",), DECODER),
    Family("Qwen2", ("qwen2",), DECODER),
    Family("Qwen3", ("qwen3",), DECODER),
    Family("Mistral", ("mistral",), DECODER),
    Family("Phi-3", ("phi3",), DECODER),
    Family("Gemma-3 (text)", ("gemma3_text",), DECODER),
    Family("GPT-2", ("gpt2",), DECODER),
    Family("Granite", ("granite",), DECODER),
    Family("OLMo-2", ("olmo2",), DECODER),
    Family("SmolLM3", ("smollm3",), DECODER),
    Family("StableLM", ("stablelm",), DECODER),
    Family("Phi (1, 1.5, 2)", ("phi",), DECODER),
    Family("StarCoder2", ("starcoder2",), DECODER),
    Family("Falcon", ("falcon",), DECODER),
    Family("Gemma-2", ("gemma2",), DECODER),
    Family("Cohere", ("cohere",), DECODER),
    Family("GPT-NeoX", ("gpt_neox",), DECODER),
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(config: Any, *, path: str | os.PathLike | None = None) -> Family:
    """The family of a transformers config; ExportError (one line) for anything else."""
    model_type = str(getattr(config, "model_type", "") or "unknown")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(
            f"model_type {model_type!r} is an encoder-decoder model; graphc exports encoder-only, vision and "
            "decoder-only models, not the encoder + decoder-with-past graphs it needs", path=path)
    raise ExportError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
                      path=path)


@dataclass(frozen=True)
class Plan:
    """What to export from a folder: the wrapped module, its graph's inputs, outputs and
    dynamic axes, and the facts for the metadata."""

    module: Any
    family: Family
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    axes: Mapping[str, Mapping[int, str]]
    facts: ArchFacts
    notices: tuple[str, ...] = ()
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)  # more model metadata


def plan_folder(folder: str | os.PathLike) -> Plan:
    """Load an HF folder (fp32, eval) and plan its export. The family comes from config.json's
    ``model_type``; a sentence-transformers folder gets its pooling (and normalization)."""
    from graphc.exporters.hf import quiet, require_torch

    require_torch()
    import torch
    import transformers

    folder = Path(folder)
    with quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(os.fspath(folder))
        except Exception as e:  # noqa: BLE001 - transformers raises assorted errors
            raise ExportError(f"cannot load config.json: {_first_line(e)}", path=folder) from None
    family = family_for(config, path=folder / "config.json")
    from graphc.exporters import sentence

    # text models only; a decoder with pooling is an embedding model (e.g. last-token pooling)
    pooling = sentence.read_folder(folder) if family.modality == "text" else None
    cls = transformers.AutoModel if pooling is not None else _model_class(transformers, family, config)
    with quiet():
        try:
            kwargs = {}
            if family.towers and hasattr(config, "vision_config"):  # an image-text folder: its vision part
                tower_config = cls.config_class.from_pretrained(os.fspath(folder))
                if getattr(config, "projection_dim", None):  # the joint model's projection width
                    tower_config.projection_dim = config.projection_dim
                kwargs["config"] = tower_config
            model = cls.from_pretrained(os.fspath(folder), dtype=torch.float32, **kwargs).eval()
        except GraphcError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"cannot load the {family.name} model: {_first_line(e)}", path=folder) from None
    facts = _facts(model.config, family)
    if family.kind == VISION:
        return dataclasses.replace(_vision_plan(model, family, facts), metadata=_normalization(folder))
    if family.kind == DECODER and pooling is None:
        from graphc.exporters.hf import wrap_causal_lm, wrap_encoder

        if _is_causal(cls):
            return Plan(wrap_causal_lm(model), family, ("input_ids", "attention_mask"), ("logits",),
                        _text_axes(2), facts)
        return Plan(wrap_encoder(model, token_type_ids=False), family, ("input_ids", "attention_mask"),
                    ("last_hidden_state",), _text_axes(2), facts,
                    (f"{', '.join(config.architectures or ['the model'])} has no LM head: "
                     "exported last_hidden_state",))
    params = inspect.signature(model.forward).parameters
    types = "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 0
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if types else ())
    if pooling is not None:
        return Plan(sentence.wrap(model, pooling, types), family, names,
                    ("last_hidden_state", "sentence_embedding"), _text_axes(len(names)), facts,
                    (f"sentence-transformers folder: {pooling.describe()}",))
    from graphc.exporters.hf import wrap_encoder

    return Plan(wrap_encoder(model, token_type_ids=types), family, names, ("last_hidden_state",),
                _text_axes(len(names)), facts)


def example_inputs(plan: Plan, *, batch: int = 2, seq: int = 16, seed: int = 0, padded: bool = False,
                   torch_tensors: bool = True) -> dict[str, Any]:
    """Inputs for tracing (torch) or parity (numpy): random ids within the vocabulary, a mask
    of ones (``padded``: the last row's second half masked), zero token types; random normal
    pixels at the model's image size."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    if plan.family.kind == VISION:
        size, channels = plan.facts.image_size, _channels(plan.module)
        feed["pixel_values"] = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    else:
        vocab = max(plan.facts.vocab_size, 2)
        for name in plan.input_names:
            if name == "input_ids":
                feed[name] = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
            elif name == "attention_mask":
                feed[name] = np.ones((batch, seq), dtype=np.int64)
                if padded and batch > 1:
                    feed[name][-1, seq // 2:] = 0
            else:
                feed[name] = np.zeros((batch, seq), dtype=np.int64)
    if not torch_tensors:
        return feed
    import torch

    return {k: torch.from_numpy(v) for k, v in feed.items()}


def torch_outputs(module: torch.nn.Module, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The wrapped module's outputs on a numpy feed, as numpy arrays (the parity reference)."""
    import torch

    from graphc.exporters.hf import quiet

    with quiet(), torch.no_grad():
        out = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().float().numpy() for t in out]


# --------------------------------------------------------------------------- internals


def _model_class(transformers: Any, family: Family, config: Any) -> Any:
    towers = dict(family.towers)
    if config.model_type in towers:
        return getattr(transformers, towers[config.model_type])
    if family.kind == DECODER:
        archs = list(getattr(config, "architectures", None) or [])
        if not archs or any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
            return transformers.AutoModelForCausalLM
    if family.kind == VISION and any(a.endswith("ForImageClassification") for a in config.architectures or []):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def _is_causal(cls: Any) -> bool:
    return cls.__name__ == "AutoModelForCausalLM" or cls.__name__.endswith(_CAUSAL_SUFFIXES)


def _facts(config: Any, family: Family) -> ArchFacts:
    from graphc.exporters.metadata import arch_facts_from_config

    size = getattr(config, "image_size", 0) or 0
    size = size[0] if isinstance(size, (list, tuple)) else size
    return dataclasses.replace(arch_facts_from_config(config), modality=family.modality, kind=family.kind,
                               image_size=int(size) if family.kind == VISION else 0)


def _text_axes(count: int) -> dict[str, dict[int, str]]:
    names = ("input_ids", "attention_mask", "token_type_ids")[:count]
    return {n: {0: "batch", 1: "sequence"} for n in names}


def _vision_plan(model: Any, family: Family, facts: ArchFacts) -> Plan:
    if facts.image_size <= 0:
        raise ExportError(f"the {family.name} config has no image_size")
    if type(model).__name__.endswith("ForImageClassification"):
        outputs: tuple[str, ...] = ("logits",)
    else:  # those the model returns, in this order
        outputs = ("image_embeds", "last_hidden_state", "pooler_output")
    module = _vision_wrapper()(model, outputs).eval()
    probe = example_inputs(Plan(module, family, ("pixel_values",), outputs, {}, facts), batch=1)
    import torch

    with torch.no_grad():
        got = module.model(pixel_values=probe["pixel_values"])
    present = tuple(o for o in outputs if getattr(got, o, None) is not None)
    module.outputs = present
    return Plan(module, family, ("pixel_values",), present, {"pixel_values": {0: "batch"}}, facts)


def _normalization(folder: Path) -> dict[str, str]:
    """The pixel mean and std of the folder's image processor (``preprocessor_config.json``),
    as model metadata for validation on real images; empty when the folder has none."""
    from graphc.checks.images import MEAN_KEY, STD_KEY

    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        return {}
    if config.get("do_normalize") is False:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    else:
        mean, std = config.get("image_mean"), config.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return {}
    return {MEAN_KEY: ",".join(f"{float(v):g}" for v in mean), STD_KEY: ",".join(f"{float(v):g}" for v in std)}


def _channels(module: Any) -> int:
    config = module.model.config
    return int(getattr(config, "num_channels", 3) or 3)


_VISION_WRAPPER: list[type] = []


def _vision_wrapper() -> type:
    if _VISION_WRAPPER:
        return _VISION_WRAPPER[0]
    import torch

    class VisionWrapper(torch.nn.Module):
        scope_prefix = "model."

        def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]) -> None:
            super().__init__()
            self.model = model
            self.outputs = outputs

        def forward(self, pixel_values):  # noqa: ANN001, ANN201
            out = self.model(pixel_values=pixel_values)
            return tuple(getattr(out, name) for name in self.outputs)

    _VISION_WRAPPER.append(VisionWrapper)
    return VisionWrapper


def _first_line(error: BaseException) -> str:
    from graphc.exporters.hf import _first_line as first

    return first(error)


def read_json(path: Path) -> Any:
    """A JSON file, or ExportError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read it: {e}", path=path) from None

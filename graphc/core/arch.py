"""Architecture facts an exported model carries in its metadata (``graphc.arch.*``), and the
switch that keeps transformers off the network. Core: imported by exporters/ and models/."""

from __future__ import annotations

from dataclasses import dataclass


def hf_offline() -> None:
    """Keep transformers / huggingface_hub off the network (call before importing them)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class ArchFacts:
    """Architecture facts written into the exported model's metadata (graphc.arch.*).

    ``modality``: "text" (token inputs) or "vision" (``pixel_values``); ``kind``: "encoder",
    "decoder" (causal LM) or "vision"; ``image_size``: the square input side of a vision model
    (0 for text); ``sliding_window``: the attention window of a decoder that has one (0: none).
    Fields with defaults may be absent from older models' metadata.
    """

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    modality: str = "text"
    kind: str = ""
    image_size: int = 0
    # tokens a query attends back over (Mistral, Gemma-3's local layers); 0: the whole context
    sliding_window: int = 0
    # transformers' per-layer attention kinds, comma-separated ("sliding_attention,full_attention,
    # ..."); "" with a sliding window: every layer slides
    layer_types: str = ""
    # 1 where a layer applies rotary, 0 where it does not (transformers' ``no_rope_layers``:
    # SmolLM3), comma-separated; "": every layer as the model's attention says
    rope_layers: str = ""

    def to_metadata(self) -> dict[str, str]:
        return {f"graphc.arch.{k}": str(v) for k, v in self.__dict__.items()}

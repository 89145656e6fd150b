"""Tiny random-config models of every architecture family graphc exports, saved as Hugging
Face folders (for breadth tests and the families benchmark; never for judging quality)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphc.models.base import hf_offline

TINY_VOCAB = 100
_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
_TEXT = {"vocab_size": TINY_VOCAB, "max_position_embeddings": 128}
_VISION = {"image_size": 32, "patch_size": 8}
_GQA = {"num_key_value_heads": 2}
# the special token ids some configs default to lie outside the tiny vocabulary
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as t

    return {
        "bert": lambda: t.BertConfig(**_SMALL, **_TEXT),
        "roberta": lambda: t.RobertaConfig(**_SMALL, vocab_size=TINY_VOCAB, max_position_embeddings=130, pad_token_id=1),
        "xlm-roberta": lambda: t.XLMRobertaConfig(**_SMALL, vocab_size=TINY_VOCAB, max_position_embeddings=130,
                                                  pad_token_id=1),
        # DeBERTa-v3's attention: relative positions (log buckets) both ways, no absolute positions
        "deberta-v2": lambda: t.DebertaV2Config(**_SMALL, **_TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                position_buckets=16, max_relative_positions=-1,
                                                norm_rel_ebd="layer_norm", share_att_key=True,
                                                position_biased_input=False),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=TINY_VOCAB, max_position_embeddings=128, dim=32, n_layers=2,
                                                 n_heads=4, hidden_dim=64),
        "electra": lambda: t.ElectraConfig(**_SMALL, **_TEXT, embedding_size=16),
        # relative position buckets added to every layer's scores (all-mpnet-base-v2's encoder)
        "mpnet": lambda: t.MPNetConfig(**_SMALL, **_TEXT),
        # rotary, bias-free norms, GeGLU; layer 1 attends within a local window of 8 tokens
        "modernbert": lambda: t.ModernBertConfig(**_SMALL, **_TEXT, global_attn_every_n_layers=2, local_attention=8,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                 sep_token_id=2),
        "vit": lambda: t.ViTConfig(**_SMALL, **_VISION),
        "dinov2": lambda: t.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                         **_VISION),
        "clip_vision_model": lambda: t.CLIPVisionConfig(**_SMALL, **_VISION, projection_dim=16),
        "siglip_vision_model": lambda: t.SiglipVisionConfig(**_SMALL, **_VISION),
        "llama": lambda: t.LlamaConfig(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        "qwen2": lambda: t.Qwen2Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        "qwen3": lambda: t.Qwen3Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS, head_dim=8),
        "mistral": lambda: t.MistralConfig(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        "phi3": lambda: t.Phi3Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        "gemma3_text": lambda: t.Gemma3TextConfig(**_SMALL, **_TEXT, **_GQA, **_TOKENS, head_dim=8,
                                                  sliding_window=64),
        "gpt2": lambda: t.GPT2Config(vocab_size=TINY_VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=1, eos_token_id=2),
        # Llama-like, with multipliers on embeddings, residuals, attention and logits
        "granite": lambda: t.GraniteConfig(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        # norms after attention and MLP (not before), Q and K normalized over the projection
        "olmo2": lambda: t.Olmo2Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        # every second layer without rotary (NoPE), as SmolLM3's every fourth
        "smollm3": lambda: t.SmolLM3Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS, no_rope_layer_interval=2),
        # LayerNorm with bias, rotary over a quarter of each head
        "stablelm": lambda: t.StableLmConfig(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        # Phi-2: attention and MLP in parallel off one LayerNorm, partial rotary, GELU
        "phi": lambda: t.PhiConfig(**_SMALL, **_TEXT, **_TOKENS),
        # LayerNorm with bias, GELU MLP, sliding window
        "starcoder2": lambda: t.Starcoder2Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        # Falcon's new decoder architecture: fused QKV with grouped KV heads, parallel attention and MLP
        "falcon": lambda: t.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=TINY_VOCAB,
                                         new_decoder_architecture=True, num_kv_heads=2, bos_token_id=1, eos_token_id=2),
        # attention logits soft-capped (tanh), local and global layers alternating
        "gemma2": lambda: t.Gemma2Config(**_SMALL, **_TEXT, **_GQA, **_TOKENS, head_dim=8, sliding_window=64),
        # Cohere (Command R): parallel attention and MLP off one bias-free LayerNorm, rotary on
        # interleaved pairs of dims, scaled logits, tied embeddings
        "cohere": lambda: t.CohereConfig(**_SMALL, **_TEXT, **_GQA, **_TOKENS),
        # GPT-NeoX (Pythia): one packed QKV projection, rotary over a quarter of each head, attention
        # and MLP in parallel off two LayerNorms
        "gpt_neox": lambda: t.GPTNeoXConfig(**_SMALL, **_TEXT, **_TOKENS),
        "t5": lambda: t.T5Config(vocab_size=TINY_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0),
    }


ENCODERS = ("bert", "roberta", "xlm-roberta", "deberta-v2", "distilbert", "electra", "mpnet", "modernbert")
VISION = ("vit", "dinov2", "clip_vision_model", "siglip_vision_model")
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text", "gpt2", "granite", "olmo2", "smollm3",
            "stablelm", "phi", "starcoder2", "falcon", "gemma2", "cohere", "gpt_neox")
FAMILIES = ENCODERS + VISION + DECODERS


def tiny_config(model_type: str) -> Any:
    """The tiny random config of ``model_type`` (a key of :data:`FAMILIES`, or ``"t5"``)."""
    hf_offline()
    return _configs()[model_type]()


def save_tiny(model_type: str, folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build the tiny model of ``model_type`` with random weights (seeded) and save it as an
    HF folder (config.json + safetensors); decoders get their causal-LM head."""
    hf_offline()
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = tiny_config(model_type)
    auto = AutoModelForCausalLM if model_type in DECODERS else AutoModel
    if getattr(config, "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def save_tiny_sentence_transformer(folder: str | os.PathLike, *, pooling: str | tuple[str, ...] = "mean",
                                   normalize: bool = True, seed: int = 0, model_type: str = "bert") -> Path:
    """A tiny text model (BERT by default) as a sentence-transformers folder: ``modules.json``,
    ``1_Pooling/config.json`` (``pooling``: one or several of "mean", "cls", "max",
    "mean_sqrt_len", "lasttoken") and, with ``normalize``, a Normalize module."""
    hf_offline()
    if model_type in DECODERS:  # an embedding model: the base model, no LM head
        import torch
        from transformers import AutoModel

        torch.manual_seed(seed)
        AutoModel.from_config(tiny_config(model_type), dtype=torch.float32).save_pretrained(folder)
        folder = Path(folder)
    else:
        folder = save_tiny(model_type, folder, seed=seed)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    chosen = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens",
              "lasttoken": "lasttoken"}
    wanted = {chosen[p] for p in ((pooling,) if isinstance(pooling, str) else pooling)}
    pooling_config = {"word_embedding_dimension": 32, **{f"pooling_mode_{m}": m in wanted for m in chosen.values()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    return folder


def save_tiny_tokenizer(folder: str | os.PathLike, *, vocab_size: int = TINY_VOCAB) -> Path:
    """A BPE tokenizer of ``vocab_size`` tokens (the tiny configs' vocabulary) trained on a few
    Wikipedia paragraphs, saved as tokenizer.json + tokenizer_config.json: what a model folder
    carries, so that graphc finds the model's own tokenizer."""
    hf_offline()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from graphc.models import data

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], limit_alphabet=vocab_size // 2,
                                  show_progress=False)
    tok.train_from_iterator(data.wiki_text("calibration")[:200], trainer)
    folder = Path(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    return folder

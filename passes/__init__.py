"""Built-in passes. Importing this package registers them (graphc.registry)."""

from graphc.passes import (  # noqa: F401
    attention_mask_index,
    awq_scale,
    cleanup,
    fp16_constants,
    fuse_ort,
    lowrank_embedding,
    mixed_precision,
    plan_compression,
    prune_ffn,
    prune_heads,
    quantize_activations,
    quantize_attention,
    quantize_embedding,
    quantize_gather_block,
    quantize_int8,
    quantize_nbits,
    remove_padding,
    split_vocab,
    svd_linear,
    trim_outputs,
)

"""Op names, domains and opset needs, in one place."""

from __future__ import annotations

ONNX_DOMAIN = ""
ONNX_ML_DOMAIN = "ai.onnx.ml"
MS_DOMAIN = "com.microsoft"
KNOWN_DOMAINS = frozenset({ONNX_DOMAIN, "ai.onnx", ONNX_ML_DOMAIN, MS_DOMAIN, "ai.onnx.preview.training"})

# Standard ops
MATMUL = "MatMul"
GEMM = "Gemm"
GATHER = "Gather"
ADD = "Add"
MUL = "Mul"
CAST = "Cast"
DYNAMIC_QUANTIZE_LINEAR = "DynamicQuantizeLinear"
MATMUL_INTEGER = "MatMulInteger"

# com.microsoft contrib ops
MATMUL_INTEGER_TO_FLOAT = "MatMulIntegerToFloat"
DYNAMIC_QUANTIZE_MATMUL = "DynamicQuantizeMatMul"
MATMUL_NBITS = "MatMulNBits"
GATHER_BLOCK_QUANTIZED = "GatherBlockQuantized"
ATTENTION = "Attention"
MULTI_HEAD_ATTENTION = "MultiHeadAttention"
SKIP_LAYER_NORM = "SkipLayerNormalization"
BIAS_GELU = "BiasGelu"

# Opset the rewritten graphs need at least (DynamicQuantizeLinear: 11; QDQ blocked: 21).
MIN_DEFAULT_OPSET = 17
MS_OPSET = 1

# Metadata keys graphc writes.
META_PREFIX = "graphc."
META_PASS = "graphc.pass"  # node metadata: the pass that created the node
META_MODEL_SPEC = "graphc.model_recipe"  # model metadata: the models/ spec the model came from (key kept from earlier files)
META_ARCH_PREFIX = "graphc.arch."  # model metadata: architecture facts from the exporter
META_SOURCE_FOLDER = "graphc.source_folder"  # model metadata: the HF folder graphc export read (its tokenizer)

"""Built-in passes. Importing this package registers them (graphc.registry)."""

from graphc.passes import cleanup, fp16_constants, fuse_ort, quantize_embedding, quantize_int8, trim_outputs  # noqa: F401

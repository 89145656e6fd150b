"""Built-in passes. Importing this package registers them (graphc.registry)."""

from graphc.passes import cleanup, fuse_ort, quantize_embedding, quantize_int8, trim_outputs  # noqa: F401

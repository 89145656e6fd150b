"""Exporters: torch / Hugging Face models to ONNX with graphc metadata (needs graphc[export])."""

from graphc.exporters.hf import (
    ExportResult,
    export,
    export_hf_folder,
    export_module,
    load_hf_folder,
    wrap_causal_lm,
    wrap_encoder,
)
from graphc.exporters.metadata import (
    EXPORTER_KEY,
    SCOPE_KEY,
    arch_facts_from_config,
    compact_node_metadata,
    read_arch_facts,
    write_model_metadata,
)

__all__ = [
    "EXPORTER_KEY",
    "SCOPE_KEY",
    "ExportResult",
    "arch_facts_from_config",
    "compact_node_metadata",
    "export",
    "export_hf_folder",
    "export_module",
    "load_hf_folder",
    "read_arch_facts",
    "wrap_causal_lm",
    "wrap_encoder",
    "write_model_metadata",
]

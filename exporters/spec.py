"""What an exporter needs of a known model: ``graphc.models``' specs (MiniLM, SmolLM2) have
these methods. The exporters never import ``graphc.models`` (the models build on the
exporters' wrappers, one direction only); a caller with a model's name resolves it first
(``graphc.models.get_model_spec``, as ``graphc.export`` does)."""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from graphc.core.arch import ArchFacts


@runtime_checkable
class ExportSpec(Protocol):
    name: str
    output_names: tuple[str, ...]

    def load_torch(self) -> Any: ...

    def example_inputs(self, batch: int = 2, seq: int = 16) -> dict[str, Any]: ...

    def arch_facts(self) -> ArchFacts: ...


def is_spec(source: Any) -> bool:
    """A model spec object, not a path or a torch module."""
    return not isinstance(source, (str, os.PathLike)) and isinstance(source, ExportSpec)

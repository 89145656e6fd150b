"""graphc: ONNX graph-level compression and export compiler for transformer models.

The API (``compress``, ``validate``, ``export``, ...) is imported on first use, so that
``import graphc`` and ``graphc --help`` stay fast (ONNX, onnx_ir and ONNX Runtime load
only when a model is touched).

Layers: ``graphc.core`` (errors, ops, io, passes' base, registry, manager, recipes,
sessions, calibration, target), ``graphc.checks`` (validation and its feeds, attribution,
inspection, provenance), ``graphc.front`` (API, command line, demo), ``graphc.report``;
``graphc.passes``, ``graphc.exporters`` and ``graphc.models`` beside them. This module only
re-exports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphc.core.errors import GraphcError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphc")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "0+unknown"


__version__ = _version()

__all__ = ["CompressResult", "GraphcError", "__version__", "compress", "export", "generate", "validate", "inspect",
           "list_passes", "list_recipes"]

_LAZY = {"CompressResult": "graphc.front.api", "compress": "graphc.front.api", "export": "graphc.front.api",
         "validate": "graphc.front.api", "generate": "graphc.front.generate"}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from graphc.front.api import CompressResult, compress, export, validate
    from graphc.front.generate import generate


def __getattr__(name: str):
    """The API functions and graphc's subpackages (``graphc.core``, ``graphc.checks``,
    ``graphc.front``, ``graphc.passes``, ...), imported on first access (PEP 562)."""
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it here too
    raise AttributeError(f"module 'graphc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def inspect(model, diff=None) -> dict:
    """Ops, parameters and bytes by op type and by layer; with ``diff``, what changed."""
    from graphc.checks import inspection as _inspect
    from graphc.front.api import to_ir

    info = _inspect.inspect_model(to_ir(model)[0])
    if diff is None:
        return info.to_dict()
    return _inspect.diff(info, _inspect.inspect_model(to_ir(diff)[0]))


def list_passes() -> dict:
    from graphc.core.registry import all_passes

    return {name: cls.summary for name, cls in all_passes().items()}


def list_recipes() -> list:
    from graphc.core.recipes import list_recipes as _lr

    return [r.to_dict() for r in _lr()]

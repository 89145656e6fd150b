"""graphc: ONNX graph-level compression and export compiler for transformer models."""

from typing import TYPE_CHECKING

from graphc.errors import GraphcError

if TYPE_CHECKING:
    from graphc.api import CompressResult, compress, export, validate

_FROM_API = ("CompressResult", "compress", "export", "validate")


def __getattr__(name: str):
    # The API (onnx, onnx_ir, ONNX Runtime: a second or two) loads on first use, so that the
    # ``graphc`` command reaches its own Ctrl-C handling before importing anything heavy.
    if name in _FROM_API:
        from graphc import api

        # importing graphc.api binds the submodule graphc.validate here; the function wins, as before
        globals().update({n: getattr(api, n) for n in _FROM_API})
        return globals()[name]
    raise AttributeError(f"module 'graphc' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = ["CompressResult", "GraphcError", "__version__", "compress", "export", "validate", "inspect", "list_passes", "list_recipes"]


def inspect(model, diff=None) -> dict:
    """Ops, parameters and bytes by op type and by layer; with ``diff``, what changed."""
    from graphc import inspection as _inspect
    from graphc.api import to_ir

    info = _inspect.inspect_model(to_ir(model)[0])
    if diff is None:
        return info.to_dict()
    return _inspect.diff(info, _inspect.inspect_model(to_ir(diff)[0]))


def list_passes() -> dict:
    from graphc.registry import all_passes

    return {name: cls.summary for name, cls in all_passes().items()}


def list_recipes() -> list:
    from graphc.recipes import list_recipes as _lr

    return [r.to_dict() for r in _lr()]

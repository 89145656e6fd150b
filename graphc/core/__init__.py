"""The compiler's core: typed errors, op names and metadata keys, loading and saving models,
the pass base class, registry and manager, recipes, ONNX Runtime sessions, calibration
statistics, the deployment target, and where a run may write. Nothing here imports
``graphc.checks`` or ``graphc.front``."""


def __getattr__(name: str):
    """Submodules on first access (``import graphc; graphc.core.io``), as the package does."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

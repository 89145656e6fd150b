"""Checking a result against its original: validation with ONNX Runtime, the feeds it runs on
(the user's, real texts and images, synthesized), task metrics, per-layer attribution,
inspection and provenance. Built on ``graphc.core``; never imports ``graphc.front``."""


def __getattr__(name: str):
    """Submodules on first access (``import graphc; graphc.core.io``), as the package does."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

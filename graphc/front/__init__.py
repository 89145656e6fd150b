"""What users call: the Python API, the ``graphc`` command, the demo, ``--recipe auto`` and
greedy generation. Built on ``graphc.core`` and ``graphc.checks``."""


def __getattr__(name: str):
    """Submodules on first access (``import graphc; graphc.core.io``), as the package does."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

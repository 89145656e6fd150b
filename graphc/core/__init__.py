"""The compiler's core: typed errors, op names and metadata keys, loading and saving models,
the pass base class, registry and manager, recipes, ONNX Runtime sessions, calibration
statistics, the deployment target, and where a run may write. Nothing here imports
``graphc.checks`` or ``graphc.front``."""


def submodules_on_access(package: str):
    """A PEP 562 ``__getattr__`` for ``package``: its submodules imported on first access
    (``import graphc; graphc.core.io``); ``graphc.checks`` and ``graphc.front`` use it too."""

    def get(name: str):
        import importlib

        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return get


__getattr__ = submodules_on_access(__name__)

"""Pass registry: stable names → pass classes."""

from __future__ import annotations

from graphc.core.errors import RecipeError
from graphc.core.pass_base import GraphcPass

_PASSES: dict[str, type[GraphcPass]] = {}


def register(cls: type[GraphcPass]) -> type[GraphcPass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _PASSES[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import graphc.passes  # noqa: F401 - importing registers the built-in passes


def get_pass(name: str) -> type[GraphcPass]:
    _ensure_loaded()
    try:
        return _PASSES[name]
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_PASSES))}") from None


def all_passes() -> dict[str, type[GraphcPass]]:
    _ensure_loaded()
    return dict(sorted(_PASSES.items()))

"""Pass options checked against their ``Options`` dataclass's annotations, the way a TOML
recipe or ``--set`` gives them: ``bool`` wants true/false, ``int`` a whole number, ``float`` any
number, ``str`` a string, ``tuple[...]``/``list[...]`` an array (of such items), a union any of
its members. Annotations this does not know (``Any``, classes) accept anything."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any

_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any or hint is None or hint is type(None):
        return hint is Any or value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return len(args) != 1 or all(_matches(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a type this check does not model


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin in (tuple, list, collections.abc.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"an array of {_PLURAL.get(args[0], _describe(args[0]))}" if len(args) == 1 else "an array"
    if hint is type(None):
        return "none"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def type_errors(options_cls: type, options: dict[str, Any]) -> list[str]:
    """One message per option whose value does not fit its annotation."""
    try:
        hints = typing.get_type_hints(options_cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return []
    return [f"option {name} must be {_describe(hints[name])}, not {_shown(value)}"
            for name, value in options.items() if name in hints and not _matches(value, hints[name])]


def _shown(value: Any) -> str:
    """A value as the recipe wrote it: its TOML kind and (shortened) text."""
    kind = {dict: "a table", list: "an array", tuple: "an array", bool: "a boolean", str: "a string",
            int: "an integer", float: "a number"}.get(type(value))
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{kind} ({text})" if kind else text

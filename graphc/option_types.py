"""Pass options are typed: a recipe value of the wrong type is refused, in one line, when the
recipe loads (before any work), instead of being taken for something else (``per_channel =
"no"`` is a non-empty string, which Python would read as true) or failing deep inside a pass.

Accepted: a bool option takes ``true``/``false`` only; an int option an integer; a float
option a number (integers too); a str option a string; a ``tuple[X, ...]`` option an array
of X.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _shown(value: Any) -> str:
    kind = {dict: "a table", list: "an array", tuple: "an array", bool: "a boolean", str: "a string"}.get(type(value))
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{kind} ({text})" if kind else text


@functools.cache
def _hints(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def check_option_types(options_cls: type, options: dict[str, Any]) -> str | None:
    """The first mistyped option, described in one line; None if all are well typed."""
    hints = _hints(options_cls)
    for f in dataclasses.fields(options_cls):
        if f.name not in options:
            continue
        value, hint = options[f.name], hints.get(f.name)
        if hint in _NAMES:
            if not _is(value, hint):
                return f"option {f.name} must be {_NAMES[hint]}, not {_shown(value)}"
        elif typing.get_origin(hint) is tuple:
            args = typing.get_args(hint)
            item = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else None
            if not isinstance(value, (list, tuple)):
                return f"option {f.name} must be an array, not {_shown(value)}"
            if item in _NAMES:
                bad = next((v for v in value if not _is(v, item)), _MISSING)
                if bad is not _MISSING:
                    return f"option {f.name} must be an array of {_NAMES[item].split(' (')[0]}s, holding {_shown(bad)}"
    return None


_MISSING = object()

"""Symbolic sums in one order, so that fusion checks see equal lengths as equal.

The dynamo exporter names the length of a KV-cache concatenation ``past_sequence + sequence``
on the key side and ``sequence + past_sequence`` on the value side; onnxscript's SDPA rule
compares dimensions by name and stops there. A dimension that is a plain sum of named sizes
(``a + b + c``, nothing else) is rewritten with its terms sorted; any other expression is
left alone.
"""

from __future__ import annotations

import re

import onnx_ir as ir

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def canonical(dim: int | ir.SymbolicDim | None) -> int | ir.SymbolicDim | None:
    """``dim`` with the terms of a plain sum of names sorted; anything else unchanged."""
    if not isinstance(dim, ir.SymbolicDim) or dim.value is None or "+" not in dim.value:
        return dim
    terms = [t.strip() for t in dim.value.split("+")]
    if not all(_NAME.fullmatch(t) for t in terms):
        return dim
    text = " + ".join(sorted(terms))
    return dim if text == dim.value else ir.SymbolicDim(text)


def same(a: int | ir.SymbolicDim | None, b: int | ir.SymbolicDim | None) -> bool:
    """Known and equal, up to the order of a sum's terms."""
    if a is None or b is None or (isinstance(a, ir.SymbolicDim) and a.value is None):
        return False
    return canonical(a) == canonical(b)


def canonicalize(model: ir.Model) -> int:
    """Rewrite every value's shape in place; returns how many shapes changed."""
    changed = 0
    values = list(model.graph.inputs)
    values += [v for node in model.graph.all_nodes() for v in node.outputs]
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims = [canonical(d) for d in shape]
        if any(new is not old for new, old in zip(dims, shape)):
            value.shape = ir.Shape(dims)
            changed += 1
    return changed

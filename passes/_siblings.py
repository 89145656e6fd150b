"""Sibling projections: MatMul weights that read the same input, planned as one layer.

A transformer block's Q, K and V projections read one normalized hidden state, and so do a
gated MLP's gate and up projections. ``mixed-precision`` with ``siblings = true`` gives such a
group one probe (every member quantized together, replaced together) and one choice of bits and
block size, so that ``pack-nbits`` can then store the group as one ``MatMulNBits``: fewer, larger
kernel calls, which is what batch-1 decoding is bound by besides the weights' bytes.

:class:`Siblings` stands in for a :class:`~graphc.passes._sensitivity.Layer` wherever the
planner reads one: its quantizer view is the members' [rows, cols] views stacked (rows are
quantized independently, so bytes and errors add up), its nodes are all the members' readers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphc.passes import _sensitivity as sens


class Siblings:
    """Weights [K, N_i] read by MatMuls of one input, as one [sum N_i, K] layer."""

    kind = "matmul"
    tied = False
    transposed = False  # its view is built by stacking, not read from one stored array

    def __init__(self, members: Sequence[sens.Layer]) -> None:
        self.members = list(members)
        self.name = " + ".join(m.name for m in self.members)
        self.nodes = [n for m in self.members for n in m.nodes]

    @property
    def value(self) -> ir.Value:
        """The first member's weight (its name keys the group's probe and Hessian)."""
        return self.members[0].value

    @property
    def shape(self) -> tuple[int, int]:
        return sum(m.shape[0] for m in self.members), self.members[0].shape[1]

    @property
    def params(self) -> int:
        return sum(m.params for m in self.members)

    def view(self) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([m.view() for m in self.members], axis=0))

    @property
    def member_keys(self) -> tuple[tuple[str, bool], ...]:
        return tuple((m.value.name, m.transposed) for m in self.members)


def group(layers: Sequence[sens.Layer]) -> list[sens.Layer | Siblings]:
    """``layers`` with the MatMul weights that read one input (and are read by nothing else)
    merged into :class:`Siblings`, in the order of each group's first member."""
    by_input: dict[int, list[sens.Layer]] = {}
    for layer in layers:
        key = _input_key(layer)
        if key is not None:
            by_input.setdefault(key, []).append(layer)
    out: list[sens.Layer | Siblings] = []
    placed: set[int] = set()
    for layer in layers:
        key = _input_key(layer)
        members = by_input.get(key, []) if key is not None else []
        if len(members) < 2:
            out.append(layer)
        elif key not in placed:
            placed.add(key)
            out.append(Siblings(members))
    return out


def flatten(units: Sequence[sens.Layer | Siblings]) -> list[sens.Layer]:
    """The weights of planned units, each once."""
    return [m for u in units for m in (u.members if isinstance(u, Siblings) else [u])]


def _input_key(layer: sens.Layer) -> int | None:
    """id() of the input a plain MatMul weight's single reader multiplies (None: not groupable:
    a table, a tied head, a weight read by several nodes)."""
    if layer.kind != "matmul" or layer.tied or len(layer.nodes) != 1 or not layer.transposed:
        return None
    x = layer.nodes[0].inputs[0]
    return id(x) if x is not None else None

"""Choosing one quantization option per layer to meet a size budget or an error budget.

Each layer offers options (a configuration, its bytes, its predicted output error). Errors of
layers are taken to add (see ``_sensitivity``), so this is a multiple-choice knapsack, solved
by dynamic programming over the bytes above each layer's cheapest option, counted in units of
at most ``resolution`` steps across the span that matters (each option's extra bytes rounded
*up* to whole units, so a plan never exceeds its budget; on SmolLM2's 211 weights a unit is
~0.5 KB). Unlike a greedy walk along each layer's convex hull, the optimum is monotone in the
budget: a layer whose better option is one large step (an LM head from 4 to 8 bits) is
upgraded exactly when that buys more than the many small steps the same bytes would pay for.

- size budget (``max_bytes``): the least predicted error within the bytes; bytes the rounding
  left are then spent by single upgrades that still fit;
- error budget (``max_error``): the fewest bytes whose predicted error is within the budget;
- both: the size plan, which must also meet the error budget.

A budget no assignment can meet raises a :class:`~graphc.core.errors.PassError` saying what the
cheapest (or the most accurate) assignment would need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphc.core.errors import PassError


@dataclass(frozen=True)
class Option:
    label: str  # e.g. "int4/b32"
    nbytes: int
    error: float  # predicted output error with only this layer at this option


def plan(
    layers: Sequence[Sequence[Option]], *, max_bytes: int | None = None, max_error: float | None = None,
    fixed_bytes: int = 0, pass_name: str = "mixed-precision", resolution: int = 50_000,
) -> list[int]:
    """The index of the chosen option of each layer. ``fixed_bytes``: bytes outside the
    layers that count against ``max_bytes``."""
    if max_bytes is None and max_error is None:
        raise PassError("a plan needs max_bytes or max_error", pass_name=pass_name)
    if any(not opts for opts in layers):
        raise PassError("a layer has no quantization option to choose from", pass_name=pass_name)
    sizes = [[math.ceil(o.nbytes) for o in opts] for opts in layers]  # whole bytes (estimates may be fractional)
    base = [min(n) for n in sizes]
    least = math.ceil(fixed_bytes) + sum(base)
    if max_bytes is not None and least > max_bytes:
        raise PassError(
            f"max_bytes={max_bytes:,} cannot be met: the smallest option of every layer needs {least:,} bytes "
            f"({fixed_bytes:,} of them outside the planned layers)", pass_name=pass_name,
        )
    best_error = sum(min(o.error for o in opts) for opts in layers)
    if max_error is not None and best_error > max_error:
        raise PassError(
            f"max_error={max_error:g} cannot be met: even the most accurate option of every layer is predicted "
            f"at {best_error:.6g}", pass_name=pass_name,
        )
    most = sum(max(n) - b for n, b in zip(sizes, base))
    span = min(most, math.floor(max_bytes) - least) if max_bytes is not None else most
    unit = max(1, math.ceil(span / resolution))
    # cost in units of each option above its layer's cheapest, rounded up; cheapest first so
    # that ties keep the fewer bytes
    costs = [[-(-(n - b) // unit) for n in ns] for ns, b in zip(sizes, base)]
    top = sum(max(c) for c in costs)  # every layer at its dearest option
    if max_bytes is not None:
        top = min(top, (math.floor(max_bytes) - least) // unit)
    orders = [sorted(range(len(opts)), key=lambda j, opts=opts: (opts[j].nbytes, opts[j].error)) for opts in layers]
    best = np.zeros(top + 1)  # least error of the layers so far within b units, b = 0..top
    choice = np.zeros((len(layers), top + 1), dtype=np.int16)
    for i, opts in enumerate(layers):
        nxt = np.full(top + 1, np.inf)
        for j in orders[i]:
            c = costs[i][j]
            if c > top:
                continue
            cand = best[: top + 1 - c] + opts[j].error
            better = cand < nxt[c:]
            nxt[c:][better] = cand[better]
            choice[i, c:][better] = j
        best = nxt
    if max_bytes is not None:
        b = top
    else:  # the fewest units whose least error meets the budget (best never rises with b)
        b = int(np.argmax(best <= max_error * (1 + 1e-12)))
    pick = [0] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        j = int(choice[i, b])
        pick[i] = j
        b -= costs[i][j]
    if max_bytes is not None:
        used = fixed_bytes + sum(layers[i][j].nbytes for i, j in enumerate(pick))
        _fill(layers, pick, max_bytes - used)
        err = sum(layers[i][j].error for i, j in enumerate(pick))
        if max_error is not None and err > max_error:
            raise PassError(
                f"max_bytes={max_bytes:,} and max_error={max_error:g} cannot both be met: the least error within "
                f"the bytes is predicted at {err:.6g}", pass_name=pass_name,
            )
    return pick


def _fill(layers: Sequence[Sequence[Option]], pick: list[int], left: int) -> None:
    """Spend bytes the hull steps could not: any single option change that fits and lowers
    the error most, repeatedly."""
    while True:
        best = None
        for i, opts in enumerate(layers):
            cur = opts[pick[i]]
            for j, o in enumerate(opts):
                extra = o.nbytes - cur.nbytes
                gain = cur.error - o.error
                if extra <= left and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, j, extra)
        if best is None:
            return
        _, i, j, extra = best
        pick[i] = j
        left -= extra

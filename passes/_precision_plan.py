"""Choosing one quantization option per layer to meet a size budget or an error budget.

Each layer offers options (a configuration, its bytes, its predicted output error). Errors of
layers are taken to add (see ``_sensitivity``), so this is a multiple-choice knapsack. It is
solved the way bit-allocation usually is (Lagrangian / convex-hull greedy): each layer starts
at its cheapest option; the upgrade with the largest error decrease per added byte, along each
layer's lower convex hull of (bytes, error), is taken while it fits; then any single upgrade
that still fits the bytes left and lowers the error most is taken, until none does.

- size budget (``max_bytes``): the least predicted error within the bytes;
- error budget (``max_error``): the fewest bytes (along the hull) whose predicted error is
  within the budget;
- both: the size plan, which must also meet the error budget.

A budget no assignment can meet raises a :class:`~graphc.errors.PassError` saying what the
cheapest (or the most accurate) assignment would need.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from graphc.errors import PassError


@dataclass(frozen=True)
class Option:
    label: str  # e.g. "int4/b32"
    nbytes: int
    error: float  # predicted output error with only this layer at this option


def _hull(options: Sequence[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), by increasing bytes, decreasing error."""
    order = sorted(range(len(options)), key=lambda i: (options[i].nbytes, options[i].error))
    frontier: list[int] = []
    for i in order:  # Pareto front: each next one strictly more accurate
        if not frontier or options[i].error < options[frontier[-1]].error:
            if frontier and options[i].nbytes == options[frontier[-1]].nbytes:
                frontier[-1] = i
            else:
                frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[i]
            # b lies above the segment a-c: drop it (slopes must flatten as bytes grow)
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def plan(
    layers: Sequence[Sequence[Option]], *, max_bytes: int | None = None, max_error: float | None = None,
    fixed_bytes: int = 0, pass_name: str = "mixed-precision",
) -> list[int]:
    """The index of the chosen option of each layer. ``fixed_bytes``: bytes outside the
    layers that count against ``max_bytes``."""
    if max_bytes is None and max_error is None:
        raise PassError("a plan needs max_bytes or max_error", pass_name=pass_name)
    if any(not opts for opts in layers):
        raise PassError("a layer has no quantization option to choose from", pass_name=pass_name)
    hulls = [_hull(opts) for opts in layers]
    pick = [h[0] for h in hulls]
    pos = [0] * len(layers)

    def total_bytes() -> int:
        return fixed_bytes + sum(layers[i][p].nbytes for i, p in enumerate(pick))

    def total_error() -> float:
        return sum(layers[i][p].error for i, p in enumerate(pick))

    least = total_bytes()
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
    budget = max_bytes
    used = least
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if pos[i] + 1 < len(hulls[i]):
            a, b = layers[i][hulls[i][pos[i]]], layers[i][hulls[i][pos[i] + 1]]
            slope = (a.error - b.error) / max(b.nbytes - a.nbytes, 1)
            heapq.heappush(heap, (-slope, i))

    for i in range(len(layers)):
        push(i)
    while heap:
        if max_bytes is None and total_error() <= max_error:  # error budget met at the fewest bytes
            break
        _, i = heapq.heappop(heap)
        nxt = hulls[i][pos[i] + 1]
        extra = layers[i][nxt].nbytes - layers[i][pick[i]].nbytes
        if budget is not None and used + extra > budget:
            continue  # this layer's next step does not fit; its later ones are dearer still
        pick[i], pos[i] = nxt, pos[i] + 1
        used += extra
        push(i)
    if max_bytes is not None:
        _fill(layers, pick, max_bytes - used)
        err = total_error()
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

"""Greedy choice of planner actions within an error budget and size / MAC targets.

Each unit has levels (level 0: nothing done) with a predicted error each, measured with that
action alone. The errors of actions on different units are assumed to add (the planner's
additivity assumption: to first order the output perturbations of separate layers are
uncorrelated, so their contributions to 1 - cosine add; interactions show in the measured
error after the plan, which the pass checks). Costs (bytes, parameters, MACs) are not additive
(int8 of a pruned layer saves less) and are recomputed exactly for every candidate step.

From nothing done, each step moves one unit to a higher level: the step with the least added
error per unit of cost saved (cost saved relative to the original, summed over the targets
still unmet; with no target, over bytes and MACs), among the steps that keep the predicted
error within ``max_error`` and do not clash (a layer is pruned or factorized, not both).

- targets given: steps until every target is met (least error on the way); if none fits
  before they are met, :class:`Infeasible`; without an error budget it stops there;
- with an error budget: then steps on while any fits (the most bytes and MACs saved within
  the error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphc.passes._plan.units import Cost, Units

METRICS = ("bytes", "params", "macs")


@dataclass(frozen=True)
class Budgets:
    max_error: float | None = None
    max_bytes: int | None = None
    max_params: int | None = None
    max_macs: int | None = None

    def targets(self) -> dict[str, int]:
        return {m: v for m, v in (("bytes", self.max_bytes), ("params", self.max_params), ("macs", self.max_macs))
                if v is not None}


@dataclass
class Plan:
    state: dict[str, int]
    error: float  # predicted: the sum of the chosen actions' errors
    cost: Cost
    steps: list[dict] = field(default_factory=list)  # in the order taken


class Infeasible(Exception):
    """The targets cannot be met within the error budget (``reach``: the plan reached)."""

    def __init__(self, unmet: dict[str, int], reach: Plan) -> None:
        super().__init__(unmet)
        self.unmet, self.reach = unmet, reach


def _unmet(cost: Cost, targets: dict[str, int]) -> dict[str, int]:
    return {m: v for m, v in targets.items() if getattr(cost, m) > v}


def search(units: Units, errors: dict[str, list[float]], budgets: Budgets) -> Plan:
    """The plan (see the module doc). ``errors[key][level]``: predicted error of that action."""
    state = {u.key: 0 for u in units.units}
    ref = units.cost({})
    targets = budgets.targets()
    cost = units.cost(state)
    error = 0.0
    steps: list[dict] = []
    while True:
        unmet = _unmet(cost, targets)
        if targets and not unmet and budgets.max_error is None:
            break
        metrics = list(unmet) if unmet else ["bytes", "macs"]
        best = None
        for unit in units.units:
            cur = state[unit.key]
            for level in range(cur + 1, len(unit.levels)):
                if units.conflicts(state, unit.key, level):
                    continue
                de = errors[unit.key][level] - errors[unit.key][cur]
                if budgets.max_error is not None and error + de > budgets.max_error:
                    continue
                trial = units.cost({**state, unit.key: level})
                saving = sum((getattr(cost, m) - getattr(trial, m)) / max(getattr(ref, m), 1) for m in metrics)
                if saving <= 0:
                    continue
                score = (max(de, 0.0) / saving, -saving, unit.key, level)
                if best is None or score < best[0]:
                    best = (score, unit, level, de, trial)
        if best is None:
            if unmet and targets:
                raise Infeasible(unmet, Plan(dict(state), error, cost, steps))
            break
        _, unit, level, de, trial = best
        state[unit.key] = level
        error += de
        cost = trial
        steps.append({"unit": unit.key, "action": unit.label(level), "added_error": float(f"{de:.4g}"),
                      "predicted_error": float(f"{error:.4g}"), **cost.as_dict()})
    return Plan(state, error, cost, steps)


def most_compressed(units: Units, errors: dict[str, list[float]]) -> Plan:
    """The plan that takes every step that saves anything, regardless of error (what the
    actions can reach at most)."""
    return search(units, errors, Budgets())

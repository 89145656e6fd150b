"""Changing a recipe: ``[[passes]]`` merged into an ``extends`` base by pass name, one option
set from the command line (``--set PASS.OPTION=VALUE``), budgets given to the ``plan`` step,
tolerance flags. Every change is checked the way a TOML recipe is: unknown passes and options,
and values the pass's ``Options`` reject, are one-line :class:`RecipeError` s.

The merge rule (also in :mod:`graphc.core.recipes` and docs/extending.md): an entry naming a pass
the base has changes that step's options (the keys it gives replace the base's, the others
stay; a pass the base runs twice has both steps changed); an entry naming a pass the base lacks
adds a step, after the step named by its ``after`` key, before the one named by ``before``, or
else at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from graphc.core.errors import RecipeError
from graphc.core.recipes import Recipe, Step

Placement = dict[str, str]  # {"after": name} or {"before": name} or {}
_ENTRY_KEYS = {"name", "options", "after", "before"}


def parse_steps(entries: Any, where: Mapping[str, str], *, placed: bool) -> list[tuple[Step, Placement]]:
    """``[[passes]]`` tables → steps, each with where it goes (``after``/``before``: only
    meaningful with ``extends``, so ``placed=False`` refuses them)."""
    if not isinstance(entries, list):
        raise RecipeError("'passes' must be an array of tables ([[passes]])", **where)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise RecipeError(f"passes[{i}] needs a 'name'", **where)
        if not isinstance(entry["name"], str):
            raise RecipeError(f"passes[{i}].name must be a string", **where)
        allowed = _ENTRY_KEYS if placed else {"name", "options"}
        extra = sorted(set(entry) - allowed)
        if extra:
            hint = " ('after'/'before' place a pass added to an extended recipe)" if set(extra) & {"after", "before"} else ""
            raise RecipeError(f"passes[{i}] has unknown key(s) {', '.join(extra)}{hint}", **where)
        options = entry.get("options", {})
        if not isinstance(options, dict):
            raise RecipeError(f"passes[{i}].options must be a table", **where)
        placement = {k: str(entry[k]) for k in ("after", "before") if k in entry}
        if len(placement) > 1:
            raise RecipeError(f"passes[{i}] gives both 'after' and 'before'", **where)
        out.append((Step(str(entry["name"]), dict(options)), placement))
    return out


def merge_steps(base: Sequence[Step], entries: Sequence[tuple[Step, Placement]],
                where: Mapping[str, str]) -> list[Step]:
    """The base's steps with ``entries`` merged in by pass name (the rule in the module doc)."""
    steps = list(base)
    for step, placement in entries:
        names = [s.pass_name for s in steps]
        if step.pass_name in names:
            if placement:
                raise RecipeError(f"pass {step.pass_name!r} is already in the recipe: 'after'/'before' only "
                                  "place a pass it lacks (leave them out to change its options)", **where)
            steps = [replace(s, options={**s.options, **step.options}) if s.pass_name == step.pass_name else s
                     for s in steps]
            continue
        if not placement:
            steps.append(step)
            continue
        (key, anchor), = placement.items()
        if anchor not in names:
            raise RecipeError(f"pass {step.pass_name!r}: {key} {anchor!r}, which is not in the recipe "
                              f"(its passes: {', '.join(dict.fromkeys(names))})", **where)
        index = names.index(anchor) + 1 if key == "after" else names.index(anchor)
        steps.insert(index, step)
    return steps


def check_steps(steps: Sequence[Step], where: Mapping[str, str]) -> None:
    """Every step names a registered pass and its options build that pass's ``Options``."""
    from graphc.core.registry import get_pass  # late: the registry imports every pass

    for step in steps:
        try:
            get_pass(step.pass_name).from_dict(step.options)
        except RecipeError as e:
            raise RecipeError(e.message, **where) from None
        except Exception as e:  # noqa: BLE001 - option errors carry the pass name
            raise RecipeError(str(e), **where) from None


def parse_set(text: str) -> tuple[str, str, Any]:
    """``"quantize-int8.per_channel=false"`` → (pass, option, value). The value is read as a
    TOML value (``false``, ``4``, ``0.5``, ``"mha"``, ``[4, 8]``, ``{ a = 1 }``); a bare word
    that is not one is taken as a string (``fuse-ort.attention=mha``)."""
    key, sep, raw = text.partition("=")
    pass_name, dot, option = key.strip().rpartition(".")
    if not sep or not dot or not pass_name or not option:
        raise RecipeError(f"--set {text!r}: expected PASS.OPTION=VALUE, e.g. quantize-int8.per_channel=false")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if not raw or any(c in raw for c in "[]{}\"'=,"):
            raise RecipeError(f"--set {text!r}: {raw!r} is not a TOML value (quote strings: \"...\")") from None
        value = raw
    return pass_name, option.strip(), value


def apply_sets(recipe: Recipe, sets: Sequence[str]) -> Recipe:
    """The recipe with each ``--set PASS.OPTION=VALUE`` applied to every step of that pass, in
    the recipe and in its decoder variant (the pass must be in one of them)."""
    if not sets:
        return recipe
    forms = [recipe, *([recipe.decoder] if recipe.decoder is not None else [])]
    steps = [list(f.steps) for f in forms]
    for text in sets:
        pass_name, option, value = parse_set(text)
        names = [n for f in forms for n in f.pass_names()]
        if pass_name not in names:
            from graphc.core.registry import all_passes

            what = "is not in recipe" if pass_name in all_passes() else "is not a pass; recipe"
            raise RecipeError(f"--set {text}: {pass_name!r} {what} {recipe.name!r} (its passes: "
                              f"{', '.join(dict.fromkeys(names))})")
        for i, form_steps in enumerate(steps):
            steps[i] = [replace(s, options={**s.options, option: value}) if s.pass_name == pass_name else s
                        for s in form_steps]
        try:
            check_steps([s for form_steps in steps for s in form_steps if s.pass_name == pass_name][:1], {})
        except RecipeError as e:
            raise RecipeError(f"--set {text}: {e}") from None
    label = ", ".join(sets)
    decoder = replace(recipe.decoder, name=f"{recipe.name}[{label}]", steps=tuple(steps[1])) if len(forms) > 1 else None
    return replace(recipe, name=f"{recipe.name}[{label}]", steps=tuple(steps[0]), decoder=decoder)


BUDGETS = ("max_error", "max_bytes", "max_flops", "max_params", "max_ppl_rise")


def with_budgets(recipe: Recipe, budgets: Mapping[str, Any], *, int4: bool = False) -> Recipe:
    """The recipe's ``plan`` step with these budgets instead of all of its own (``max_error``,
    ``max_bytes``, ``max_flops``, ``max_params``, ``max_ppl_rise``; its other options stay);
    ``int4``: the plan may also pick 4-bit. One line if the recipe has no plan step."""
    if "plan" not in recipe.pass_names():
        flag = next(iter(budgets), "int4").replace("_", "-")
        raise RecipeError(f"--{flag} needs the plan pass, and recipe {recipe.name!r} has none "
                          "(leave out --recipe to use the plan recipe)")
    new = {**budgets, **({"int4": True} if int4 else {})}
    drop = set(BUDGETS) if budgets else set()
    steps = tuple(Step(s.pass_name, {**{k: v for k, v in s.options.items() if k not in drop}, **new})
                  if s.pass_name == "plan" else s for s in recipe.steps)
    decoder = recipe.decoder  # the causal-LM form plans with the same budgets
    if decoder is not None and "plan" in decoder.pass_names():
        decoder = with_budgets(decoder, budgets, int4=int4)
    return replace(recipe, steps=steps, decoder=decoder)


def with_tolerance(recipe: Recipe, **limits: float | None) -> Recipe:
    """The recipe with these tolerance fields (``min_cosine``, ``max_ppl_rise``...) replaced;
    None leaves a field as the recipe has it."""
    given = {k: v for k, v in limits.items() if v is not None}
    if not given:
        return recipe
    decoder = with_tolerance(recipe.decoder, **given) if recipe.decoder is not None else None
    return replace(recipe, tolerance=replace(recipe.tolerance, **given), decoder=decoder)

"""Recipes: named pipelines of passes with options and a validation tolerance.

Built-ins are data below, and TOML files in ``recipes/`` (installed as the package data
``graphc.recipe_files``; each one's name is its file name without ``.toml``). User recipes are
TOML files of the same shape::

    name = "my-int8"
    description = "int8 without embedding quantization"
    extends = "int8"                 # optional: start from a built-in (or a packaged file recipe)
    disable = ["quantize-embedding"] # optional: drop steps by pass name

    [tolerance]
    min_cosine = 0.99                # cosine of each whole output vs the original
    min_row_cosine = 0.9             # worst row (token) cosine
    max_abs = 1.0                    # optional
    max_rel = 1e-5                   # optional: largest difference / the output's largest |value|
    max_ppl_rise = 0.05              # optional: perplexity rise on the validation texts (causal LMs)
    min_task_cosine = 0.99           # optional: mean pooled/image embedding cosine on real sentences/photos
    min_top1 = 0.9                   # optional: an image classifier's top-1 agreement on the photos

    [[passes]]                       # with extends: merged into the inherited steps by pass name
    name = "quantize-int8"
    options = { per_channel = true }

    [decoder]                        # optional: what changes when the model is a causal LM
    description = "..."
    disable = ["..."]
    tolerance = { max_ppl_rise = 0.05 }
    [[decoder.passes]]               # merged into the steps above by pass name, as with extends
    name = "quantize-int8"
    options = { per_channel = false }

How ``[[passes]]`` combines with ``extends`` (:func:`graphc.core.recipe_merge.merge_steps`): an
entry naming a pass the base recipe has changes that step's options (the keys it gives replace
the base's, the others stay; a pass the base runs twice has both steps changed); an entry naming
a pass the base lacks adds a step, after the step named by its ``after`` key, before the one
named by ``before``, or else at the end. ``disable`` then removes steps by name. Without
``extends``, ``[[passes]]`` is the whole pipeline.

A recipe adapts to the model through its ``[decoder]`` table: for a causal LM (a text model
whose ``logits`` are next-token scores, graphc.checks.text_data.is_causal_lm) compress runs
:meth:`Recipe.for_model` 's variant, the recipe with that table merged in by the same rule
(its passes by name, ``after``/``before`` placing new ones, ``disable``, tolerance fields
replaced). A variant is checked when the recipe is read, like the recipe itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from graphc.core.errors import RecipeError


@dataclass(frozen=True)
class Step:
    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """What validation must reach for ``compress`` to write the result."""

    min_cosine: float | None = 0.99
    min_row_cosine: float | None = None
    max_abs: float | None = None
    # the largest difference over the output's largest |value|: a float-rounding gate that does
    # not depend on the output's scale (max_abs does)
    max_rel: float | None = None
    # relative perplexity rise on the validation texts (model specs with a perplexity task)
    max_ppl_rise: float | None = None
    # the task figure on real inputs, where validation measured one (sentences through the model's
    # tokenizer, photos): the mean cosine of the pooled / image embeddings, and a classifier's
    # top-1 agreement with the original
    min_task_cosine: float | None = None
    min_top1: float | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]
    tolerance: Tolerance = Tolerance()
    source: str = "built-in"
    # the recipe as it runs on a causal LM (its [decoder] table merged in), or None: the same
    decoder: Recipe | None = None

    def pass_names(self) -> list[str]:
        return [s.pass_name for s in self.steps]

    def for_model(self, *, causal_lm: bool) -> Recipe:
        """The recipe that runs on a model of this kind: the decoder variant for a causal LM
        when the recipe has one, else the recipe itself."""
        return self.decoder if causal_lm and self.decoder is not None else self

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "passes": [{"name": s.pass_name, "options": dict(s.options)} for s in self.steps],
            "tolerance": self.tolerance.__dict__,
            **({"decoder": {"description": self.decoder.description,
                            "passes": [{"name": s.pass_name, "options": dict(s.options)} for s in self.decoder.steps],
                            "tolerance": self.decoder.tolerance.__dict__}} if self.decoder is not None else {}),
        }


BUILTIN_NAMES = ("cleanup", "fuse", "int8", "int4", "int8-static", "fast", "fast-prune", "plan")


def _builtin_folder() -> Path:
    """recipes/builtin/ as installed (package data of ``graphc.recipe_files``), or in a source tree."""
    from importlib.resources import files

    try:
        return Path(str(files("graphc.recipe_files"))) / "builtin"
    except ModuleNotFoundError:  # pragma: no cover - graphc imported from a bare source tree
        return Path(__file__).resolve().parent.parent / "recipes" / "builtin"


class _Builtins(Mapping):
    """The built-in recipes, TOML files in recipes/builtin/ (the same format as a user's),
    each read and checked on first use: listing their names reads no file."""

    def __init__(self) -> None:
        self._loaded: dict[str, Recipe] = {}

    def __getitem__(self, name: str) -> Recipe:
        if name not in BUILTIN_NAMES:
            raise KeyError(name)
        if name not in self._loaded:
            recipe = load_recipe_file(_builtin_folder() / f"{name}.toml")
            self._loaded[name] = replace(recipe, source="built-in")
        return self._loaded[name]

    def __iter__(self):
        return iter(BUILTIN_NAMES)

    def __len__(self) -> int:
        return len(BUILTIN_NAMES)


BUILTIN = _Builtins()


def plan_recipe(*, max_error: float | None = None, max_bytes: int | None = None, max_flops: float | None = None,
                max_params: int | None = None, max_ppl_rise: float | None = None, int4: bool = False) -> Recipe:
    """The built-in ``plan`` recipe with the given budgets (``graphc compress --max-error ...``);
    its tolerance: output cosine ≥ 1 - 2 × max_error (validation texts are not the calibration
    texts the plan measured on; a causal LM's form keeps its perplexity gate too), else the
    recipe's. ``int4``: layers and tables may also be 4-bit."""
    from graphc.core.recipe_merge import with_budgets, with_tolerance

    budgets = {k: v for k, v in (("max_error", max_error), ("max_bytes", max_bytes), ("max_flops", max_flops),
                                 ("max_params", max_params), ("max_ppl_rise", max_ppl_rise)) if v is not None}
    base = with_budgets(BUILTIN["plan"], budgets, int4=int4)
    if max_error:  # in both forms: a causal LM keeps its perplexity gate besides
        base = with_tolerance(base, min_cosine=max(0.0, 1 - 2 * max_error))
    label = ", ".join([f"{k}={v:g}" for k, v in budgets.items()] + ["int4"] * int4)
    return replace(base, name=f"plan({label})")


def file_recipes() -> dict[str, Path]:
    """The packaged TOML recipes (``recipes/*.toml``), by name (the file name without .toml)."""
    from importlib.resources import files

    try:
        folder = Path(str(files("graphc.recipe_files")))
    except ModuleNotFoundError:  # pragma: no cover - graphc imported from a bare source tree
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.toml")) if p.stem not in BUILTIN}


def recipe_names() -> list[str]:
    """Every recipe name ``--recipe`` accepts (besides ``auto`` and .toml paths); reads no file."""
    return [*BUILTIN, *file_recipes()]


def list_recipes() -> list[Recipe]:
    return [*BUILTIN.values(), *(load_recipe_file(p) for p in file_recipes().values())]


def get_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in by name, a packaged file recipe by name, or a TOML recipe file."""
    text = os.fspath(name_or_path)
    if text in BUILTIN:
        return BUILTIN[text]
    packaged = file_recipes()
    if text in packaged:
        return load_recipe_file(packaged[text])
    if text.endswith(".toml") or os.sep in text or Path(text).exists():
        return load_recipe_file(Path(text))
    raise RecipeError(f"unknown recipe {text!r}; recipes: {', '.join(recipe_names())}, auto (or a .toml file)")


def load_recipe_file(path: Path, _extending: tuple[str, ...] = ()) -> Recipe:
    if not path.is_file():
        raise RecipeError("recipe file not found" if not path.exists() else "recipe path is not a file", path=path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"not valid TOML: {e}", path=path) from None
    except RecursionError:
        raise RecipeError("not a usable recipe: arrays or tables nested too deep", path=path) from None
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror or e}", path=path) from None
    return recipe_from_dict(data, source=str(path), _extending=_extending)


_TOP_KEYS = {"name", "description", "extends", "disable", "tolerance", "passes", "decoder"}
_VARIANT_KEYS = {"description", "disable", "tolerance", "passes"}
_TOLERANCE_KEYS = {"min_cosine", "min_row_cosine", "max_abs", "max_rel", "max_ppl_rise", "min_task_cosine", "min_top1"}


def _base_recipe(name: Any, where: dict[str, str], extending: tuple[str, ...]) -> Recipe:
    """What ``extends`` names: a built-in or a packaged file recipe (no cycles)."""
    if name in BUILTIN:
        return BUILTIN[name]
    packaged = file_recipes()
    if name not in packaged:
        raise RecipeError(f"extends unknown recipe {name!r}; recipes: {', '.join(recipe_names())}", **where)
    if name in extending:
        raise RecipeError(f"extends cycle: {' -> '.join([*extending, name])}", **where)
    return load_recipe_file(packaged[name], (*extending, name))


def recipe_from_dict(data: dict[str, Any], *, source: str = "dict", _extending: tuple[str, ...] = ()) -> Recipe:
    from graphc.core.recipe_merge import check_steps, merge_steps, parse_steps

    where = {"path": source} if source != "dict" else {}
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}", **where)
    base: Recipe | None = None
    for key in ("name", "description", "extends"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"'{key}' must be a string, not {type(data[key]).__name__} {data[key]!r:.60}", **where)
    if "extends" in data:
        base = _base_recipe(data["extends"], where, _extending)
    entries = parse_steps(data["passes"], where, placed=base is not None) if "passes" in data else None
    if base is not None:
        steps = merge_steps(base.steps, entries or [], where)
    elif entries is not None:
        steps = [step for step, _ in entries]
    else:
        raise RecipeError("a recipe needs 'passes' or 'extends'", **where)
    steps = _disabled(steps, data.get("disable", []), where)
    check_steps(steps, where)
    tolerance = _tolerance(base.tolerance if base else Tolerance(), data.get("tolerance", {}), where)
    name = str(data.get("name", Path(source).stem if source != "dict" else "custom"))
    description = str(data.get("description", base.description if base else ""))
    decoder = _decoder_variant(data, base, entries, steps, name, tolerance, source, where)
    return Recipe(name=name, description=description, steps=tuple(steps), tolerance=tolerance, source=source,
                  decoder=decoder)


def _disabled(steps: list[Step], disable: Any, where: dict[str, str]) -> list[Step]:
    if not isinstance(disable, list) or not all(isinstance(d, str) for d in disable):
        raise RecipeError("'disable' must be a list of pass names", **where)
    return [s for s in steps if s.pass_name not in set(disable)]


def _tolerance(base: Tolerance, tol_data: Any, where: dict[str, str]) -> Tolerance:
    if not isinstance(tol_data, dict):
        raise RecipeError("'tolerance' must be a table", **where)
    bad = sorted(set(tol_data) - _TOLERANCE_KEYS)
    if bad:
        raise RecipeError(f"unknown tolerance key(s) {', '.join(bad)}; allowed: {', '.join(sorted(_TOLERANCE_KEYS))}",
                          **where)
    for key, value in tol_data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"tolerance {key} must be a number, not {value!r}", **where)
    return replace(base, **tol_data)


def _decoder_variant(data: dict[str, Any], base: Recipe | None, entries: list | None, own: list[Step], name: str,
                     tolerance: Tolerance, source: str, where: dict[str, str]) -> Recipe | None:
    """The recipe for causal LMs (None when neither this recipe nor its base has a
    ``[decoder]`` table): extending a recipe extends both of its forms, so it starts from the
    base's decoder variant, takes this recipe's ``[[passes]]``, ``disable`` and tolerance the
    way the recipe itself does, then this recipe's own ``[decoder]`` table."""
    from graphc.core.recipe_merge import check_steps, merge_steps, parse_steps

    table = data.get("decoder")
    inherited = base.decoder if base is not None else None
    if table is None and inherited is None:
        return None
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise RecipeError("'decoder' must be a table ([decoder])", **where)
    unknown = sorted(set(table) - _VARIANT_KEYS)
    if unknown:
        raise RecipeError(f"unknown [decoder] key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_VARIANT_KEYS))}",
                          **where)
    if "description" in table and not isinstance(table["description"], str):
        raise RecipeError("decoder.description must be a string", **where)
    if inherited is not None:
        start = _disabled(merge_steps(inherited.steps, entries or [], where), data.get("disable", []), where)
        tol = _tolerance(inherited.tolerance, data.get("tolerance", {}), where)
        description = inherited.description
    else:  # the recipe's own steps and tolerance are the start
        start, tol, description = list(own), tolerance, ""
    vwhere = {"path": f"{where['path']} [decoder]"} if where else {}
    ventries = parse_steps(table["passes"], vwhere, placed=True) if "passes" in table else []
    vsteps = _disabled(merge_steps(start, ventries, vwhere), table.get("disable", []), vwhere)
    check_steps(vsteps, vwhere)
    vtol = _tolerance(tol, table.get("tolerance", {}), vwhere)
    return Recipe(name=name, description=str(table.get("description", description)), steps=tuple(vsteps),
                  tolerance=vtol, source=source)

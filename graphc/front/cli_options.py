"""``graphc compress`` flags → the recipe to run, and a notice for each flag that does nothing.

- ``--recipe``: a name, ``auto`` or a .toml file (default ``int8``).
- Budget flags (``--max-error``, ``--max-bytes``, ``--max-flops``, ``--max-params``) are the
  ``plan`` pass's budgets: without ``--recipe`` they select the ``plan`` recipe; with a recipe
  they replace the budgets of its ``plan`` step (a recipe without one is an error).
- ``--max-ppl-rise R`` is one limit with two uses: validation refuses a result whose perplexity
  on the model's validation texts rose by more than R (exit 3; causal LMs exported by graphc);
  and where a ``plan`` step runs (no ``--recipe``, or a recipe with one), it is also the plan's
  budget (mean next-token KL at most ln(1 + R) on calibration text).
- ``--min-cosine C``: validation requires every output's cosine to the original ≥ C (the
  recipe's own ``min_cosine`` otherwise).
- ``--set PASS.OPTION=VALUE`` (repeatable): one option of every step of that pass, applied last.
- ``--calibration-data PATH`` (with ``--tokenizer DIR``, ``--preprocess SPEC``): the user's
  texts or images, for calibration and, held out, validation (graphc.checks.calibration_data).
"""

from __future__ import annotations

import argparse

from graphc.core.errors import RecipeError

_BUDGET_FLAGS = ("max_error", "max_bytes", "max_flops", "max_params")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def compress_recipe(args: argparse.Namespace):
    """(recipe object or ``"auto"``, notices) for ``graphc compress``."""
    from graphc.core.recipe_merge import apply_sets, with_budgets, with_tolerance
    from graphc.core.recipes import get_recipe, plan_recipe

    notices: list[str] = []
    budgets = {}
    for name in (*_BUDGET_FLAGS, "max_ppl_rise"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if value == 0:  # the plan pass reads 0 as "no limit": say so instead of doing nothing
            notices.append(f"{_flag(name)} 0 means no limit: ignored")
            continue
        budgets[name] = value
    ppl = budgets.pop("max_ppl_rise", None)
    sets = getattr(args, "set", None) or []
    int4 = getattr(args, "int4", False)
    tolerance = {"min_cosine": getattr(args, "min_cosine", None), "max_ppl_rise": ppl}
    if tolerance["min_cosine"] is not None and not -1 <= tolerance["min_cosine"] <= 1:
        raise RecipeError(f"--min-cosine {tolerance['min_cosine']:g}: a cosine is between -1 and 1")
    if ppl is not None and ppl < 0:
        raise RecipeError(f"--max-ppl-rise {ppl:g}: a rise is not negative (0.05 is 5%)")
    if args.recipe == "auto":
        given = [_flag(k) for k in budgets] + ["--set"] * bool(sets) + ["--int4"] * int4 + \
                [_flag(k) for k, v in tolerance.items() if v is not None]
        if given:
            raise RecipeError(f"{given[0]} does not apply to --recipe auto (its candidates are fixed recipes "
                              "with their own tolerances)")
        return "auto", notices
    if getattr(args, "shape_hint", None) is not None:
        notices.append("--shape-hint only applies to --recipe auto: ignored")
    if args.no_validate:
        notices += [f"{f} is not checked with --no-validate" for f in ("--min-cosine", "--max-ppl-rise")
                    if tolerance[f[2:].replace("-", "_")] is not None]
        notices += ["--force does nothing with --no-validate (nothing is checked)"] * bool(args.force)
    if int4 and not budgets and ppl is None:
        raise RecipeError("--int4 is a plan option: give a budget too (--max-error, --max-bytes, --max-flops, "
                          "--max-params or --max-ppl-rise)")
    if args.recipe is None:
        recipe = plan_recipe(**budgets, max_ppl_rise=ppl, int4=int4) if budgets or ppl is not None else get_recipe("int8")
    else:
        recipe = get_recipe(args.recipe)
        if ppl is not None and "plan" in recipe.pass_names():
            budgets["max_ppl_rise"] = ppl
        if budgets or int4:
            recipe = with_budgets(recipe, budgets, int4=int4)
    recipe = apply_sets(recipe, sets)
    disabled = set(getattr(args, "disable", None) or ())
    notices += [f"--set {s}: pass {s.split('.')[0]!r} is disabled (--disable)" for s in sets
                if s.partition("=")[0].rpartition(".")[0] in disabled]
    return with_tolerance(recipe, **tolerance), notices


def add_data_args(sp: argparse.ArgumentParser) -> None:
    """``--calibration-data``, ``--tokenizer`` and ``--preprocess`` (compress and validate)."""
    sp.add_argument("--calibration-data", metavar="PATH",
                    help="your texts (a .txt file, one text a line; a .jsonl file, one {\"text\": ...} a line; or a "
                         "folder of them) or images (a folder): every 4th item is held out for validation, the rest "
                         "calibrates; not with --inputs")
    sp.add_argument("--tokenizer", metavar="DIR",
                    help="texts: the folder of the model's tokenizer.json (default: the model spec's, files beside "
                         "the .onnx, or the folder graphc export read)")
    sp.add_argument("--preprocess", metavar="SPEC",
                    help="images: e.g. size=224,resize=256,mean=0.485,0.456,0.406,std=0.229,0.224,0.225,layout=NCHW "
                         "(default: the input's H×W and layout, the model's mean/std or 0.5)")
def positive_int(text: str) -> int:
    """argparse type of ``--workers``: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)

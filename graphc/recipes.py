"""Recipes: named pipelines of passes with options and a validation tolerance.

Built-ins are data below; user recipes are TOML files of the same shape::

    name = "my-int8"
    description = "int8 without embedding quantization"
    extends = "int8"                 # optional: start from a built-in
    disable = ["quantize-embedding"] # optional: drop steps by pass name

    [tolerance]
    min_cosine = 0.99                # cosine of each whole output vs the original
    min_row_cosine = 0.9             # worst row (token) cosine
    max_abs = 1.0                    # optional

    [[passes]]                       # replaces the inherited steps when given
    name = "quantize-int8"
    options = { per_channel = true }
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from graphc.errors import RecipeError


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


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]
    tolerance: Tolerance = Tolerance()
    source: str = "built-in"

    def pass_names(self) -> list[str]:
        return [s.pass_name for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "passes": [{"name": s.pass_name, "options": dict(s.options)} for s in self.steps],
            "tolerance": self.tolerance.__dict__,
        }


_CLEANUP = (
    Step("compact-metadata"),
    Step("fold-constants"),
    Step("remove-unused"),
)

BUILTIN: dict[str, Recipe] = {
    "cleanup": Recipe(
        "cleanup",
        "lossless: constant folding, dead code, common subexpressions, shape inference",
        (*_CLEANUP, Step("cse"), Step("shape-inference")),
        Tolerance(min_cosine=0.99999, min_row_cosine=0.9999, max_abs=1e-3),
    ),
    "fuse": Recipe(
        "fuse",
        "fp32, fusions only: cleanup, then attention (packed Attention where Q, K, V share an "
        "input; GroupQueryAttention for grouped KV heads), EmbedLayerNorm, SkipLayerNorm, "
        "(Bias)Gelu, RMSNorm, rotary into ONNX Runtime's fused ops",
        (*_CLEANUP, Step("fuse-ort", {"attention": "attention", "embed_layer_norm": True}), Step("attention-mask-index"),
         Step("remove-unused")),
        # fusion reorders float sums only: MiniLM (dynamo) measured max abs 2.5e-6 in validation
        Tolerance(min_cosine=0.99999, min_row_cosine=0.9999, max_abs=1e-4),
    ),
    "int8": Recipe(
        "int8",
        "ORT fusions, then int8 weights (per-channel symmetric) with dynamic int8 activations "
        "on every constant-weight MatMul/Gemm (outlier channels smoothed, from calibration), "
        "QAttention, int8 embedding tables, float16 vectors",
        (
            *_CLEANUP,
            Step("fuse-ort", {"attention": "mha"}),
            Step("trim-outputs"),
            Step(
                "quantize-int8",
                {"outlier_ratio": 4.0, "outlier_channels": 4, "smooth_min_factor": 2.5, "scale_dtype": "float16"},
            ),
            Step("quantize-attention"),
            Step("quantize-embedding"),
            Step("fp16-constants"),
            Step("remove-unused"),
        ),
        Tolerance(min_cosine=0.99, min_row_cosine=0.9),
    ),
    "int4": Recipe(
        "int4",
        "ORT fusions, AWQ channel scales folded into pre-norms (Llama-like models), then mixed 2/4/8-bit "
        "weights at 3.95 bits a weight on average: bits and block "
        "size per layer from each layer's measured output sensitivity (embedding rows that calibration "
        "reads kept at more bits than the rest), MatMulNBits fitted by GPTQ on calibration data (int8 "
        "activations in the kernel), GatherBlockQuantized embedding tables (clipping search; shared "
        "with a tied LM head), float16 vectors",
        (
            *_CLEANUP,
            Step("fuse-ort", {"attention": "mha"}),
            Step("trim-outputs"),
            # AWQ channel scales folded into pre-norms / SwiGLU up projections (Llama-like models;
            # nothing to fold on post-LN BERT such as MiniLM, where it changes nothing)
            Step("awq-scale", {"bits": 4, "block_size": 32, "symmetric": False, "method": "rtn"}),
            # MiniLM measured (bench/bench_int4.py): 11.27 MB (ORT int8: 22.81 MB), mean sentence
            # cosine 0.9907 to PyTorch, probe 0.862 vs 0.865; every weight at 4-bit block 32: 13.17 MB
            # scales counted at one byte (compact-scales below stores them so): measured 2026-12-03,
            # same 3.95 bits: validated token cosine 0.9885 -> 0.9900, sentence 0.9911 -> 0.9922
            Step("mixed-precision", {"max_bits": 3.95, "method": "gptq", "scale_dtype": "log8"}),
            Step(
                "quantize-nbits",
                {"bits": 4, "block_size": 32, "symmetric": False, "method": "gptq", "act_order": True, "damp": 0.01},
            ),
            Step("quantize-gather-block", {"bits": 4, "block_size": 32, "symmetric": False, "method": "mse"}),
            Step("compact-scales"),
            Step("fp16-constants"),
            Step("remove-unused"),
        ),
        # MiniLM measured (bench/bench_int4.py): output cosine 0.988, worst token 0.92; with
        # round-to-nearest weights instead of GPTQ 0.966 / 0.86, which this tolerance rejects
        Tolerance(min_cosine=0.97, min_row_cosine=0.85),
    ),
    "int8-static": Recipe(
        "int8-static",
        "ORT fusions, then static int8 QDQ (BBCT): per-channel int8 weights, activations quantized "
        "with min-max ranges calibrated on real data (SmoothQuant alpha 0.8 on MatMul inputs) "
        "at the MatMul inputs, the attention inputs and the embedding outputs (ORT runs QLinearMatMul "
        "/ MatMulIntegerToFloat), int8 embedding tables, float16 vectors",
        (
            *_CLEANUP,
            Step("fuse-ort", {"attention": "mha"}),
            Step("trim-outputs"),
            Step(
                "quantize-activations",
                {"targets": ["matmul_in", "attention", "embedding"], "method": "minmax", "smooth_alpha": 0.8},
            ),
            Step("quantize-embedding"),
            Step("fp16-constants"),
            Step("remove-unused"),
        ),
        # MiniLM measured (bench/bench_static.py): validation output cosine 0.996, worst token 0.967;
        # pooled-embedding cosine to PyTorch 0.9967 (ORT quantize_static: 0.928), probe 0.864 vs 0.865
        Tolerance(min_cosine=0.99, min_row_cosine=0.9),
    ),
    "fast": Recipe(
        "fast",
        "int8 on the real tokens only: ORT fusions, then MatMuls, norms and activations run on the "
        "batch's real tokens packed together (padding removed; attention on the padded batch), then "
        "the int8 recipe's quantization (the Q/K/V MatMuls stay separate int8 MatMuls, no QAttention)",
        (
            *_CLEANUP,
            Step("fuse-ort", {"attention": "mha"}),
            Step("trim-outputs"),
            Step("remove-padding"),
            Step(
                "quantize-int8",
                {"outlier_ratio": 4.0, "outlier_channels": 4, "smooth_min_factor": 2.5, "scale_dtype": "float16"},
            ),
            Step("quantize-embedding"),
            Step("fp16-constants"),
            Step("remove-unused"),
        ),
        # the int8 recipe's numbers at real tokens (dynamic ranges over real tokens only); padded
        # rows of the output are zeros, which validation does not compare
        Tolerance(min_cosine=0.99, min_row_cosine=0.9),
    ),
    "fast-prune": Recipe(
        "fast-prune",
        "structured pruning for speed on full-length inputs too, then int8: ORT fusions, attention heads "
        "and FFN neurons chosen on calibration data and removed, each block's output projection refitted "
        "by least squares (STAT-style correction, no retraining), padding removed, then the int8 "
        "recipe's quantization",
        (
            *_CLEANUP,
            Step("fuse-ort", {"attention": "mha"}),
            Step("trim-outputs"),
            Step("prune-heads", {"fraction": 0.25}),
            Step("prune-ffn", {"fraction": 0.5}),
            Step("remove-padding"),
            Step(
                "quantize-int8",
                {"outlier_ratio": 4.0, "outlier_channels": 4, "smooth_min_factor": 2.5, "scale_dtype": "float16"},
            ),
            Step("quantize-embedding"),
            Step("fp16-constants"),
            Step("remove-unused"),
        ),
        # MiniLM measured (bench/bench_fast.py, before remove-padding was added): output cosine
        # 0.88, worst token 0.64 (pooled-embedding cosine 0.90), far from 0.99: this tolerance
        # only catches a broken result, not a good one
        Tolerance(min_cosine=0.85, min_row_cosine=0.5),
    ),
    "plan": Recipe(
        "plan",
        "compression planned from measured sensitivities to a budget (default: mean output 1 - cosine "
        "≤ 0.01 on calibration data): per layer, prune heads / FFN neurons (least-squares corrected), "
        "factorize (whitened SVD), int8 weights and tables, chosen greedily by error per byte / MAC "
        "saved, then checked by measuring; ORT fusions before, QAttention, padding removal and float16 vectors after",
        (
            *_CLEANUP,
            Step("fuse-ort", {"attention": "mha"}),
            Step("trim-outputs"),
            Step("plan", {"max_error": 0.01}),
            Step("quantize-attention"),
            # after the plan (its measurements and the pruning matchers expect MatMul -> attention):
            # the planned int8 MatMuls then run on the real tokens only
            Step("remove-padding"),
            Step("fp16-constants"),
            Step("remove-unused"),
        ),
        # the plan holds max_error on its calibration feeds; validation runs other texts
        Tolerance(min_cosine=0.98, min_row_cosine=None),
    ),
}


def plan_recipe(*, max_error: float | None = None, max_bytes: int | None = None, max_flops: float | None = None,
                max_params: int | None = None, max_ppl_rise: float | None = None, int4: bool = False) -> Recipe:
    """The built-in ``plan`` recipe with the given budgets (``graphc compress --max-error ...``);
    its tolerance: output cosine ≥ 1 - 2 × max_error (validation texts are not the calibration
    texts the plan measured on), else the recipe's. ``int4``: layers and tables may also be 4-bit."""
    budgets = {k: v for k, v in (("max_error", max_error), ("max_bytes", max_bytes), ("max_flops", max_flops),
                                 ("max_params", max_params), ("max_ppl_rise", max_ppl_rise)) if v is not None}
    base = BUILTIN["plan"]
    extra = {"int4": True} if int4 else {}
    steps = tuple(Step(s.pass_name, {**{k: v for k, v in s.options.items() if k != "max_error"}, **budgets, **extra})
                  if s.pass_name == "plan" else s for s in base.steps)
    tolerance = replace(base.tolerance, min_cosine=max(0.0, 1 - 2 * max_error)) if max_error else base.tolerance
    label = ", ".join([f"{k}={v:g}" for k, v in budgets.items()] + ["int4"] * int4)
    return replace(base, name=f"plan({label})", steps=steps, tolerance=tolerance)


def list_recipes() -> list[Recipe]:
    return list(BUILTIN.values())


def get_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in by name, or a TOML recipe file."""
    text = os.fspath(name_or_path)
    if text in BUILTIN:
        return BUILTIN[text]
    if text.endswith(".toml") or os.sep in text or Path(text).exists():
        return load_recipe_file(Path(text))
    raise RecipeError(f"unknown recipe {text!r}; built-ins: {', '.join(BUILTIN)}, auto (or a .toml file)")


def load_recipe_file(path: Path) -> Recipe:
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
    return recipe_from_dict(data, source=str(path))


_TOP_KEYS = {"name", "description", "extends", "disable", "tolerance", "passes"}


def recipe_from_dict(data: dict[str, Any], *, source: str = "dict") -> Recipe:
    from graphc.registry import get_pass  # late: registry imports the passes

    where = {"path": source} if source != "dict" else {}
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}", **where)
    base: Recipe | None = None
    for key in ("name", "description", "extends"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"'{key}' must be a string, not {type(data[key]).__name__} {data[key]!r:.60}", **where)
    if "extends" in data:
        if data["extends"] not in BUILTIN:
            raise RecipeError(f"extends unknown recipe {data['extends']!r}; built-ins: {', '.join(BUILTIN)}", **where)
        base = BUILTIN[data["extends"]]
    steps: list[Step]
    if "passes" in data:
        if not isinstance(data["passes"], list):
            raise RecipeError("'passes' must be an array of tables ([[passes]])", **where)
        steps = []
        for i, entry in enumerate(data["passes"]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise RecipeError(f"passes[{i}] needs a 'name'", **where)
            if not isinstance(entry["name"], str):
                raise RecipeError(f"passes[{i}].name must be a string", **where)
            extra = sorted(set(entry) - {"name", "options"})
            if extra:
                raise RecipeError(f"passes[{i}] has unknown key(s) {', '.join(extra)}", **where)
            options = entry.get("options", {})
            if not isinstance(options, dict):
                raise RecipeError(f"passes[{i}].options must be a table", **where)
            steps.append(Step(str(entry["name"]), dict(options)))
    elif base is not None:
        steps = list(base.steps)
    else:
        raise RecipeError("a recipe needs 'passes' or 'extends'", **where)
    disable = data.get("disable", [])
    if not isinstance(disable, list) or not all(isinstance(d, str) for d in disable):
        raise RecipeError("'disable' must be a list of pass names", **where)
    steps = [s for s in steps if s.pass_name not in set(disable)]
    for step in steps:
        try:
            get_pass(step.pass_name).from_dict(step.options)
        except RecipeError as e:
            raise RecipeError(e.message, **where) from None
        except Exception as e:  # noqa: BLE001 - option errors carry the pass name
            raise RecipeError(str(e), **where) from None
    tol_data = data.get("tolerance", {})
    if not isinstance(tol_data, dict):
        raise RecipeError("'tolerance' must be a table", **where)
    bad = sorted(set(tol_data) - {"min_cosine", "min_row_cosine", "max_abs"})
    if bad:
        raise RecipeError(f"unknown tolerance key(s) {', '.join(bad)}", **where)
    for key, value in tol_data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"tolerance {key} must be a number, not {type(value).__name__} {value!r:.60}", **where)
    tolerance = replace(base.tolerance if base else Tolerance(), **tol_data)
    return Recipe(
        name=str(data.get("name", Path(source).stem if source != "dict" else "custom")),
        description=str(data.get("description", base.description if base else "")),
        steps=tuple(steps),
        tolerance=tolerance,
        source=source,
    )

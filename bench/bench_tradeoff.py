"""Quality vs size and vs latency on MiniLM: every method and the planner's choices in one plot.

    python bench/bench_tradeoff.py [--plans "0.005; 0.01; 0.02; 0.01,int4; 0.1,max_flops=0.7"]
                                   [--reps 30] [--warmup 2] [--sentences 512] [--threads 2]
                                   [--rebuild NAME[,NAME...]] [--json OUT] [--plot OUT.svg]
    python bench/bench_tradeoff.py --from-json OUT.json --plot OUT.svg      # redraw, measure nothing

Models (built as the other benches build them, and reused from their cache in
``.graphc-cache/bench/`` under the same file names when there; ``--rebuild`` names the ones to
build again: ``int8``, ``int4``, ``fast``, ``fast-prune``, ``plans``, ``all``):

- fp32: graphc's dynamo export (``graphc.front.demo.cached_export``, as every MiniLM bench);
- ORT int8: ``bench_int8.build_ort_int8`` (legacy export → ``optimize_model`` → per-channel
  ``quantize_dynamic``; keyed on its pipeline and library versions);
- graphc int8 / int4 / fast / fast-prune: the built-in recipes (``minilm-graphc-int8.onnx``,
  ``minilm-graphc-int4-recipe.onnx``, ``minilm-graphc-fast.onnx``, ``minilm-graphc-fast-prune.onnx``:
  ``bench_int8.py``, ``bench_int4.py``, ``bench_fast.py``);
- graphc plan: ``plan_recipe`` at each budget of ``--plans`` (``;``-separated budgets, each
  ``,``-separated ``key=value`` of ``max_error``, ``max_flops``, ``max_bytes``, ``int4_method``,
  or ``int4``; a bare number is ``max_error``), files named as ``bench_plan.py`` names them.

Measured in one process, CPU, ``--threads`` intra-op threads: bytes on disk; median latency at
batch 8 × 128 tokens (real tweets padded), every model interleaved rep by rep, as a ratio to ORT
int8's; mean / min cosine of pooled sentence embeddings vs PyTorch fp32 on ``--sentences`` eval
tweets (batches of 32). Load averages before and after the latency runs go into the output.
A markdown table goes to stdout, progress to stderr; ``--plot`` writes one SVG with two panels
(cosine vs MB, cosine vs b8 latency ratio; y is 1 − mean cosine on a log axis, with a guide at
cosine 0.99 and ORT int8 in red).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any


import harness as h

FP32, ORT, INT8, INT4, FAST = "fp32", "ORT int8", "graphc int8", "graphc int4", "graphc fast"
FAST_PRUNE = "graphc fast-prune"
DEFAULT_PLANS = "0.005; 0.01; 0.02; 0.01,int4; 0.1,max_flops=0.7"
BUDGET_KEYS = ("max_error", "max_flops", "max_bytes", "int4", "int4_method")  # bench_plan.py's order
REBUILD = ("int8", "int4", "fast", "fast-prune", "plans", "all")
COS_GUIDE = 0.99


class UsageError(ValueError):
    """A bad command-line value (reported in one line)."""


def parse_plans(text: str) -> list[dict[str, Any]]:
    """``"0.01; 0.01,int4; 0.1,max_flops=0.7"`` → budgets in ``bench_plan.py``'s key order."""
    budgets = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        budget: dict[str, Any] = {}
        for item in (i.strip() for i in part.split(",")):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not value and key == "int4":
                budget["int4"] = True
                continue
            if not value:
                key, value = "max_error", item
            if key not in BUDGET_KEYS or key == "int4":
                raise UsageError(f"--plans: unknown budget key {key!r} in {part!r} (known: "
                                 f"{', '.join(BUDGET_KEYS)}; a bare number is max_error)")
            if key == "int4_method":
                budget[key] = value.strip()
                continue
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"--plans: {key}={value!r} is not a number (in {part!r})") from None
            if number <= 0:
                raise UsageError(f"--plans: {key} must be > 0, got {value!r}")
            budget[key] = int(number) if key == "max_bytes" else number
        if "max_error" not in budget:
            raise UsageError(f"--plans: budget {part!r} has no max_error")
        budgets.append({k: budget[k] for k in BUDGET_KEYS if k in budget})
    if not budgets:
        raise UsageError("--plans: no budget given")
    return budgets


def plan_label(budget: dict[str, Any]) -> str:
    """Short name for the plot and table: ``plan 0.01 int4``, ``plan 0.1 flops≤0.7``."""
    parts = [f"plan {budget['max_error']:g}"]
    if "max_flops" in budget:
        parts.append(f"MACs≤{budget['max_flops']:g}")
    if "max_bytes" in budget:
        parts.append(f"≤{budget['max_bytes'] / 1e6:g} MB")
    if budget.get("int4"):
        parts.append("int4" + (f" {budget['int4_method']}" if "int4_method" in budget else ""))
    return " ".join(parts)


# --------------------------------------------------------------------------- models


def _build_graphc(name: str, fp32: Path, work: Path, rep: h.Reporter, rebuild: bool) -> tuple[Path, dict]:
    """graphc int8 / int4 / fast / fast-prune, from the cache file the other benches write, or built."""
    import graphc

    path = work / {INT8: "minilm-graphc-int8.onnx", INT4: "minilm-graphc-int4-recipe.onnx",
                   FAST: "minilm-graphc-fast.onnx", FAST_PRUNE: "minilm-graphc-fast-prune.onnx"}[name]
    if path.is_file() and not rebuild:
        return path, {"reused": True, "built": time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))}
    if name == INT4:
        from bench_int4 import build_graphc

        with rep.status(f"{name}: graphc.compress(recipe='int4')"):
            _, result, seconds = build_graphc(fp32, work, "recipe")
    else:
        with rep.status(f"{name}: graphc.compress"), h.quiet():
            t0 = time.perf_counter()
            result = graphc.compress(fp32, path, recipe=name.split()[-1], force=True)
            seconds = time.perf_counter() - t0
    v = result.validation
    return path, {"reused": False, "compress_s": round(seconds, 1), "validation_passed": v.passed if v else None}


def _build_plan(budget: dict[str, Any], fp32: Path, work: Path, rep: h.Reporter,
                rebuild: bool) -> tuple[Path | None, dict]:
    """A plan model under ``bench_plan.py``'s file name, reused with its stats file when there."""
    import graphc
    from bench_plan import _label, _plan_stats, plan_recipe_of
    from graphc.core.errors import GraphcError

    path = work / ("minilm-graphc-plan-" + "-".join(_label(k, v, "") for k, v in budget.items()) + ".onnx")
    stats_path = path.with_suffix(".json")
    if path.is_file() and stats_path.is_file() and not rebuild:
        facts = json.loads(stats_path.read_text())
        return path, {"reused": True, "built": time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime)),
                      **facts}
    with rep.status(f"{plan_label(budget)}: graphc.compress(plan)"), h.quiet():
        t0 = time.perf_counter()
        try:
            result = graphc.compress(fp32, path, recipe=plan_recipe_of(budget), force=True)
        except GraphcError as e:  # an infeasible budget: a row that says so, no point
            return None, {"reused": False, "failed": str(e)}
        facts = _plan_stats(result)
        facts["compress_s"] = round(time.perf_counter() - t0, 1)
        facts["load_after"] = os.getloadavg()
        facts["validation"] = {k: result.validation.to_dict()[k] for k in ("passed", "output_cosine",
                                                                           "min_row_cosine")}
    stats_path.write_text(json.dumps(facts, indent=1, default=str) + "\n")  # what bench_plan.py --reuse-built reads
    return path, {"reused": False, **facts}


# --------------------------------------------------------------------------- measurement


def run(args: argparse.Namespace) -> dict[str, Any]:
    from graphc.checks import measure
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec
    from graphc.models.minilm import embed

    rep = h.Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec("minilm")
    t_start = time.perf_counter()
    rebuild = set(args.rebuild)
    res: dict[str, Any] = {"config": {"threads": args.threads, "seq": h.SEQ, "batch": 8, "reps": args.reps,
                                      "warmup": args.warmup, "sentences": args.sentences,
                                      "cpus": os.cpu_count(), "cpu": h.cpu_name(),
                                      "onnxruntime": importlib.metadata.version("onnxruntime"),
                                      "load_start": os.getloadavg()}}
    with rep.status("fp32: graphc dynamo export"), h.quiet():
        fp32_path, _ = cached_export("minilm", work, fresh=args.fresh)
    with rep.status("ORT int8: legacy export → optimize_model → quantize_dynamic"):
        ort_path = h.build_ort_int8(work, fresh=args.fresh)
    paths: dict[str, Path] = {FP32: fp32_path, ORT: ort_path}
    facts: dict[str, dict] = {FP32: {"kind": "reference"}, ORT: {"kind": "reference"}}
    for name, key in ((INT8, "int8"), (INT4, "int4"), (FAST, "fast"), (FAST_PRUNE, "fast-prune")):
        paths[name], f = _build_graphc(name, fp32_path, work, rep, bool(rebuild & {key, "all"}))
        facts[name] = {"kind": "recipe", **f}
    failed = {}
    for budget in args.plans:
        name = plan_label(budget)
        path, f = _build_plan(budget, fp32_path, work, rep, bool(rebuild & {"plans", "all"}))
        if path is None:
            failed[name] = f["failed"]
            rep.note(f"[red]{name}: no model[/]: {f['failed']}")
            continue
        paths[name] = path
        facts[name] = {"kind": "plan-int4" if budget.get("int4") else "plan", "budget": budget, **f}
    for name, f in facts.items():
        if f.get("reused"):
            rep.note(f"{name}: reused {paths[name].name} (built {f['built']})")

    sessions = {k: measure.session(p, threads=args.threads) for k, p in paths.items()}
    feed8 = measure.pad_feed(recipe.feeds(recipe.eval_texts(8), batch=8, max_length=h.SEQ)[0], h.SEQ)
    res["load_before_latency"] = os.getloadavg()
    with rep.bar(f"latency b8×{h.SEQ}: {args.reps} interleaved reps of {len(sessions)} models") as cb:
        latency = measure.interleaved_latency(sessions, feed8, reps=args.reps, warmup=args.warmup, progress=cb)
    res["load_after_latency"] = os.getloadavg()

    torch_ref = h.TorchReference(recipe, args.threads, work, fresh=args.fresh)
    eval_texts = recipe.eval_texts(args.sentences)
    feeds = recipe.feeds(eval_texts, batch=32, max_length=h.SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {args.sentences} eval tweets") as cb:
        ref = torch_ref.embeddings(eval_texts, feeds, embed, cb)
    cosine = {}
    for name, sess in sessions.items():
        with rep.status(f"{name}: embeddings of {args.sentences} eval tweets"):
            cosine[name] = measure.cosine_stats(measure.embeddings(sess, feeds, pool=embed), ref)

    ort_ms = latency[ORT].median_ms
    res["models"] = {
        name: {"path": _shown(paths[name]), "bytes": measure.files_bytes(paths[name]),
               "b8": latency[name].to_dict(), "b8_vs_ort": latency[name].median_ms / ort_ms,
               "cosine_vs_torch": cosine[name].to_dict(), **facts[name]}
        for name in paths
    }
    res["failed"] = failed
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def _shown(path: Path) -> str:
    """A path relative to the repository when inside it (for the committed JSON)."""
    try:
        return str(path.resolve().relative_to(h.ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    load = res["load_before_latency"], res["load_after_latency"]
    lines = [
        f"MiniLM, ORT CPU, {cfg['threads']} threads on {cfg['cpus']} CPUs; b8 × {cfg['seq']} tokens, "
        f"{cfg['reps']} interleaved reps ({cfg['warmup']} warm-up), load average before / after the latency runs "
        f"{load[0][0]:.1f} / {load[1][0]:.1f}; cosine of pooled embeddings vs PyTorch fp32 on "
        f"{cfg['sentences']} eval tweets",
        "",
        "| model | MB | b8 ms | b8 vs ORT int8 | mean cos | min cos | model file |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for name, r in res["models"].items():
        made = ("reused, built " + r["built"]) if r.get("reused") else ("built now" if "reused" in r else "")
        lines.append(f"| {name} | {r['bytes'] / 1e6:.2f} | {r['b8']['median_ms']:.1f} | {r['b8_vs_ort']:.2f}× "
                     f"| {r['cosine_vs_torch']['mean']:.5f} | {r['cosine_vs_torch']['min']:.4f} "
                     f"| {Path(r['path']).name}{', ' + made if made else ''} |")
    for name, why in res.get("failed", {}).items():
        lines.append(f"\n- {name}: no model: {why}")
    return "\n".join(lines)


COLOURS = {"reference": "#718096", "recipe": "#2b6cb0", "plan": "#2f855a", "plan-int4": "#805ad5"}
SERIES = (("fp32", "reference-fp32"), ("ORT int8", "reference-ort"), ("graphc recipes", "recipe"),
          ("planner (int8)", "plan"), ("planner --int4", "plan-int4"))


def _panel(res: dict[str, Any], x_key: str, plot_id: str, title: str, x_label: str, x_fmt,
           leave_out: tuple[str, ...] = ()) -> str:
    from graphc.report.charts import BAD, xy_chart

    def x_of(r: dict) -> float:
        return r["bytes"] / 1e6 if x_key == "mb" else r["b8_vs_ort"]

    def group(name: str, r: dict) -> str:
        if r["kind"] == "reference":
            return "reference-ort" if name == ORT else "reference-fp32"
        return r["kind"]

    models = {n: r for n, r in res["models"].items() if n not in leave_out}
    err = {n: max(1.0 - r["cosine_vs_torch"]["mean"], 0.0) for n, r in models.items()}
    series, notes = [], []
    for label, key in SERIES:
        members = [(n, r) for n, r in models.items() if group(n, r) == key]
        if not members:
            continue
        colour = BAD if key == "reference-ort" else COLOURS["reference" if key.startswith("reference") else key]
        if key.startswith("plan"):  # the planner's budgets joined in order of max_error (then of the rest)
            members.sort(key=lambda m: tuple(sorted(m[1]["budget"].items(), key=lambda kv: kv[0] != "max_error")))
            pts = [(x_of(r), err[n]) for n, r in members]
        else:  # separate points, no line between them
            pts = [p for n, r in members for p in ((x_of(r), err[n]), (None, None))]
        series.append((label, colour, pts))
        notes += [(x_of(r), err[n], n.removeprefix("graphc ") + ("" if err[n] > 0 else " (cosine 1.0, on the floor)"),
                   colour) for n, r in members]
    return xy_chart(plot_id, title, series, x_label=x_label,
                    y_label="mean cosine vs PyTorch fp32 (log scale of 1 − cosine)", log_y=True,
                    x_fmt=x_fmt, y_fmt=lambda v: f"{1 - v:.6g}", guides=[(1 - COS_GUIDE, f"cosine {COS_GUIDE}")],
                    notes=notes)


def plot(res: dict[str, Any]) -> str:
    """Two panels (cosine vs MB, cosine vs b8 latency ratio) stacked in one standalone SVG."""
    from graphc.report.charts import standalone_svg

    cfg = res["config"]
    load = res["load_before_latency"][0], res["load_after_latency"][0]
    fp32 = res["models"][FP32]
    charts = [
        _panel(res, "mb", "tradeoff-mb", f"MiniLM: embedding cosine vs size ({cfg['sentences']} eval tweets; "
               f"fp32, {fp32['bytes'] / 1e6:.1f} MB, off the chart)", "size on disk (MB)", lambda v: f"{v:g}",
               leave_out=(FP32,)),
        _panel(res, "b8", "tradeoff-b8", f"MiniLM: embedding cosine vs latency, batch 8 × {cfg['seq']} "
               f"({cfg['threads']} threads, {cfg['reps']} interleaved reps, load {load[0]:.1f} / {load[1]:.1f})",
               "b8 median latency / ORT int8's (lower is faster)", lambda v: f"{v:.2g}×"),
    ]
    parts, y = [], 0.0
    for chart in charts:  # each chart's <svg> opening tag gives its height; the panels stack in one <svg>
        head, _, body = chart.partition(">")
        height = float(re.search(r'height="([\d.]+)"', head).group(1))
        parts.append(f'<g transform="translate(0,{y:.0f})">{body.removesuffix("</svg>")}</g>')
        y += height
    title = "MiniLM: quality vs size and vs latency, every method and the planner's choices"
    return standalone_svg(f'<svg id="tradeoff" class="chart" role="img" aria-label="{title}" width="1000" '
                          f'height="{y:.0f}" viewBox="0 0 1000 {y:.0f}">{"".join(parts)}</svg>')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default=DEFAULT_PLANS, help="planner budgets, ';'-separated; each ','-separated "
                        f"key=value ({', '.join(BUDGET_KEYS)}) or int4; a bare number is max_error "
                        f"(default {DEFAULT_PLANS!r})")
    parser.add_argument("--reps", type=int, default=30, help="interleaved b8 latency repetitions (default 30, "
                        "about a minute for the ten models)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first (default 2)")
    parser.add_argument("--sentences", type=int, default=512, help="eval tweets for the cosine (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--rebuild", default="", help=f"build again instead of reusing: {', '.join(REBUILD)}")
    parser.add_argument("--work", default=str(h.WORK), help="work folder (shared with the other benches)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached exports and PyTorch embeddings")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--plot", metavar="OUT.svg", help="also write the two panels as one SVG to OUT.svg")
    parser.add_argument("--from-json", metavar="IN", help="measure nothing: read an earlier --json file "
                        "(for --plot and the table)")
    args = parser.parse_args(argv)
    try:
        args.plans = parse_plans(args.plans)
        args.rebuild = [r.strip() for r in args.rebuild.split(",") if r.strip()]
        unknown = [r for r in args.rebuild if r not in REBUILD]
        if unknown:
            raise UsageError(f"--rebuild: unknown {', '.join(unknown)} (known: {', '.join(REBUILD)})")
        for flag in ("reps", "sentences", "threads"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1")
        if args.warmup < 0:
            raise UsageError("--warmup must be >= 0")
        if args.plot and not args.plot.endswith(".svg"):
            raise UsageError(f"--plot: {args.plot!r} is not an .svg path")
        if args.from_json:
            try:
                res = json.loads(Path(args.from_json).read_text())
                res["models"][ORT]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"--from-json: cannot read results from {args.from_json}: "
                                 f"{type(e).__name__}: {e}") from None
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if not args.from_json:
        res = run(args)
    print(markdown(res))
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    if args.plot:
        Path(args.plot).write_text(plot(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

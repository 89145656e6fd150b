"""graphc ``plan`` (per-layer pruning / SVD / int8 or int4 chosen to a budget) vs ONNX Runtime's
int8 pipeline on MiniLM, at several error budgets.

    python bench/bench_plan.py [--budgets 0.005,0.01,0.02] [--max-flops F] [--max-bytes N[,N...]]
                               [--int4 [--int4-method gptq]] [--quick] [--json OUT] [--threads 2]
                               [--reuse-built]

``--max-bytes`` with several values sweeps them (every error budget at every byte target);
``--int4`` lets the plan make linear layers and tables 4-bit (MatMulNBits / GatherBlockQuantized).

For each budget: ``graphc.compress(fp32, recipe=plan_recipe(max_error=B, ...))`` (written even
when validation misses the recipe's tolerance; the table says so), then, in one process on CPU
with ``--threads`` intra-op threads, as ``bench/bench_fast.py`` measures: bytes, median latency
at batch 1 and 8 × 128 tokens (interleaved with ORT int8), mean/min cosine of pooled sentence
embeddings vs PyTorch fp32 on real tweets, sentiment-probe accuracy; and from the plan pass its
predicted vs measured error (calibration feeds), bytes and MACs, and its decisions.
Markdown tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


import harness as h

ORT_INT8 = "ORT int8 (optimizer + quantize_dynamic)"


def _label(k: str, v: Any, sep: str) -> str:
    return k if v is True else f"{k}{sep}{v}" if isinstance(v, str) else f"{k}{sep}{v:g}"


def plan_name(budget: dict[str, Any]) -> str:
    return "graphc plan " + ", ".join(_label(k, v, "=") for k, v in budget.items())


def plan_recipe_of(budget: dict[str, Any]):
    """``plan_recipe`` with the budget; ``int4_method`` set on the plan step."""
    from dataclasses import replace

    from graphc.core.recipes import Step, plan_recipe

    budget = dict(budget)
    method = budget.pop("int4_method", None)
    recipe = plan_recipe(**budget)
    if method is None:
        return recipe
    steps = tuple(Step(s.pass_name, {**s.options, "int4_method": method}) if s.pass_name == "plan" else s
                  for s in recipe.steps)
    return replace(recipe, steps=steps)


def _plan_stats(result) -> dict[str, Any]:
    step = next(p for p in result.to_dict()["passes"] if p["name"] == "plan")
    stats = dict(step["stats"])
    plan = stats.pop("plan", {})
    kinds: dict[str, int] = {}
    for d in plan.get("decisions", []):
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    return {"counts": {k: v for k, v in stats.items() if k not in ("skipped", "notes")}, "kinds": kinds,
            "decisions": [d for d in plan.get("decisions", []) if d["kind"] not in ("int8", "int4")],
            "rounds": [{k: v for k, v in r.items() if k not in ("passes", "steps")} for r in plan.get("rounds", [])],
            "original": plan.get("original"), "wall_s": step["wall_s"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import graphc
    from graphc.checks import measure
    from graphc.core.errors import GraphcError
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec
    from graphc.models.minilm import embed

    cfg = dict(h.QUICK if args.quick else h.FULL)
    rep = h.Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec("minilm")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"config": {**cfg, "mode": "quick" if args.quick else "full", "threads": args.threads,
                                      "seq": h.SEQ, "load_before": os.getloadavg()}}
    with rep.status("fp32: graphc dynamo export"), h.quiet():
        fp32_path, _ = cached_export("minilm", work, fresh=args.fresh)
    with rep.status("ORT int8: legacy export → optimize_model → quantize_dynamic"):
        ort_path = h.build_ort_int8(work, fresh=args.fresh)
    budgets = []
    for b in args.budgets.split(","):
        for max_bytes in [int(float(x)) for x in args.max_bytes.split(",")] if args.max_bytes else [None]:
            budget: dict[str, Any] = {"max_error": float(b)}
            if args.max_flops:
                budget["max_flops"] = args.max_flops
            if max_bytes:
                budget["max_bytes"] = max_bytes
            if args.int4:
                budget["int4"] = True
            if args.int4_method:
                budget["int4_method"] = args.int4_method
            budgets.append(budget)
    paths = {ORT_INT8: ort_path}
    res["plans"] = {}
    for budget in budgets:
        name = plan_name(budget)
        path = work / ("minilm-graphc-plan-" + "-".join(_label(k, v, "") for k, v in budget.items()) + ".onnx")
        stats_path = path.with_suffix(".json")
        if args.reuse_built and path.is_file() and stats_path.is_file():
            res["plans"][name] = json.loads(stats_path.read_text())
        else:
            with rep.status(f"{name}: graphc.compress"), h.quiet():
                t0 = time.perf_counter()
                try:
                    result = graphc.compress(fp32_path, path, recipe=plan_recipe_of(budget), force=True)
                except GraphcError as e:  # an infeasible budget: say so in the table
                    res.setdefault("failed", {})[name] = str(e)
                    continue
                facts = _plan_stats(result)
                facts["compress_s"] = round(time.perf_counter() - t0, 1)
                facts["load_after"] = os.getloadavg()
                facts["validation"] = {k: result.validation.to_dict()[k] for k in ("passed", "output_cosine",
                                                                                   "min_row_cosine")}
            stats_path.write_text(json.dumps(facts, indent=1, default=str) + "\n")
            res["plans"][name] = facts
        paths[name] = path

    torch_ref = h.TorchReference(recipe, args.threads, work, fresh=args.fresh)
    eval_texts = recipe.eval_texts(cfg["sentences"])
    feeds = recipe.feeds(eval_texts, batch=32, max_length=h.SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {cfg['sentences']} eval tweets") as cb:
        ref = torch_ref.embeddings(eval_texts, feeds, embed, cb)
    texts8 = recipe.eval_texts(8)
    feed_b = {b: measure.pad_feed(recipe.feeds(texts8[:b], batch=b, max_length=h.SEQ)[0], h.SEQ) for b in (1, 8)}
    sessions = {k: measure.session(p, threads=args.threads) for k, p in paths.items()}
    res["load_before_latency"] = os.getloadavg()
    latency = {}
    for batch, reps in ((1, cfg["reps_b1"]), (8, cfg["reps_b8"])):
        with rep.bar(f"latency b{batch}×{h.SEQ}: {reps} interleaved reps") as cb:
            latency[batch] = measure.interleaved_latency(sessions, feed_b[batch], reps=reps, warmup=cfg["warmup"],
                                                         progress=cb)
    res["load_after_latency"] = os.getloadavg()
    cosine = {}
    for name, sess in sessions.items():
        with rep.status(f"{name}: embeddings of {cfg['sentences']} eval tweets"):
            cosine[name] = measure.cosine_stats(measure.embeddings(sess, feeds, pool=embed), ref)
    accuracy, split = h.probe_accuracies(sessions, recipe, torch_ref, cfg, rep)
    train_texts, test_texts = split["train"], split["test"]
    res["models"] = {
        name: {"path": str(paths[name]), "bytes": measure.files_bytes(paths[name]),
               "latency_b1": latency[1][name].to_dict(), "latency_b8": latency[8][name].to_dict(),
               "cosine_vs_torch": cosine[name].to_dict(), "probe_accuracy": accuracy[name]}
        for name in paths
    }
    res["probe"] = {"train": len(train_texts), "test": len(test_texts), "torch_fp32_accuracy": accuracy["PyTorch fp32"]}
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    m = res["models"]
    o = m[ORT_INT8]
    load = res.get("load_before_latency"), res.get("load_after_latency")
    lines = [
        f"MiniLM, ORT CPU, {cfg['threads']} threads, seq {cfg['seq']} ({cfg['mode']}: {cfg['reps_b1']} reps b1, "
        f"{cfg['reps_b8']} b8, interleaved; cosine on {cfg['sentences']} eval tweets; probe "
        f"{res['probe']['train']}/{res['probe']['test']}; load average before/after latency "
        f"{load[0][0]:.1f} / {load[1][0]:.1f})",
        "",
        "| model | MB | b1 vs ORT | b8 vs ORT | b8 ms | mean cos | min cos | probe | predicted err | measured err "
        "| MACs vs fp32 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in m.items():
        b1, b8_ = r["latency_b1"]["median_ms"], r["latency_b8"]["median_ms"]
        p = res["plans"].get(name)
        extra = "| – | – | – |"
        if p:
            c = p["counts"]
            extra = (f"| {c['predicted_error']:.4f} | {c['measured_error']:.4f} "
                     f"| {c['measured_macs'] / c['original_macs']:.3f} |")
        lines.append(f"| {name} | {r['bytes'] / 1e6:.2f} | {b1 / o['latency_b1']['median_ms']:.2f}× "
                     f"| {b8_ / o['latency_b8']['median_ms']:.2f}× | {b8_:.1f} | {r['cosine_vs_torch']['mean']:.5f} "
                     f"| {r['cosine_vs_torch']['min']:.4f} | {r['probe_accuracy']:.4f} {extra}")
    lines += ["", f"PyTorch fp32 probe accuracy {res['probe']['torch_fp32_accuracy']:.4f}.", ""]
    for name, error in res.get("failed", {}).items():
        lines.append(f"- {name}: {error}")
    for name, p in res["plans"].items():
        rounds = "; ".join(f"round {r['round']}: predicted {r['predicted_error']:.4f} / measured "
                           f"{r['measured_error']:.4f}, {r['measured']['bytes'] / 1e6:.2f} MB, met {r['met']}"
                           for r in p["rounds"])
        acts = ", ".join(f"{d['layer']}: {d['action']}" for d in p["decisions"])
        lines.append(f"- {name} ({p['compress_s']:.0f} s, validation cosine {p['validation']['output_cosine']:.4f}): "
                     f"{p['kinds']}; {acts or 'no pruning or SVD'}; {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.005,0.01,0.02", help="max_error values, comma-separated")
    parser.add_argument("--max-flops", type=float, help="also a MAC target (fraction of fp32) for every budget")
    parser.add_argument("--max-bytes", help="also a byte target for every budget; several (comma-separated, "
                        "e.g. 12e6,15e6) sweep them")
    parser.add_argument("--int4", action="store_true", help="the plan may make layers and tables 4-bit")
    parser.add_argument("--int4-method", help="with --int4: the 4-bit quantizer (rtn, mse, hqq, gptq; default mse)")
    parser.add_argument("--quick", action="store_true", help="smoke test: few reps, 64 sentences, small probe")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(h.WORK), help="work folder (shared with bench_int8.py)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached exports and PyTorch embeddings")
    parser.add_argument("--reuse-built", action="store_true", help="reuse plan models built by an earlier run")
    args = parser.parse_args(argv)
    res = run(args)
    from graphc.core.target import cpu_line, cpu_summary

    res["cpu"] = cpu_summary()
    print(cpu_line())
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

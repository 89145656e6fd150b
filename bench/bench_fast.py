"""graphc ``fast`` (int8 on real tokens only) and ``fast-prune`` vs ONNX Runtime's best int8 pipeline on MiniLM.

    python bench/bench_fast.py [--quick] [--json OUT] [--threads 2] [--sweep] [--no-main]
                               [--heads F --ffn F]   # try another operating point than the recipe's

In one process, on CPU with ``--threads`` intra-op threads: the ORT int8 pipeline of
``bench/bench_int8.py`` (legacy export, ``optimize_model``, per-channel ``quantize_dynamic``;
same cache) against graphc's ``int8``, ``fast`` (padding removed, int8) and ``fast-prune``
(pruned + corrected, padding removed, int8): bytes, median latency (interleaved) at batch 1 and
8 of real tweets padded to 128 tokens, at batch 8 padded only to the
batch's longest tweet, and at batch 8 × 128 real tokens (no padding: where removing padding
cannot help), mean/min cosine of pooled sentence embeddings vs PyTorch fp32 on real tweets, and
sentiment-probe accuracy (probe trained on PyTorch fp32 embeddings).

``--sweep``: quality vs fraction pruned, heads and FFN neurons separately, with and without
the least-squares correction, in fp32 (no quantization, so the table isolates pruning) and
the b8 latency of each point relative to the unpruned fp32 model (short interleaved runs).
Markdown tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


import harness as h

ORT_INT8, FAST = "ORT int8 (optimizer + quantize_dynamic)", "graphc fast"
INT8, FAST_PRUNE = "graphc int8", "graphc fast-prune"
# latency settings: (key, label)
SETTINGS = (("b1", "b1 × 128 (padded)"), ("b8", "b8 × 128 (padded)"), ("b8_longest", "b8 padded to longest"),
            ("b8_full", "b8 × 128 real tokens"))
TARGET_RATIO, TARGET_COS, TARGET_PROBE = 0.7, 0.99, 0.01

FULL = {**h.FULL, "sweep_sentences": 256, "sweep_reps": 6}
QUICK = {**h.QUICK, "sweep_sentences": 64, "sweep_reps": 3}
SWEEP = {"heads": (0.25, 0.5), "ffn": (0.25, 0.5)}


def fast_recipe(heads: float | None, ffn: float | None):
    """The built-in ``fast-prune`` recipe, or it with other pruning fractions."""
    from dataclasses import replace

    from graphc.core.recipes import Step, get_recipe

    recipe = get_recipe("fast-prune")
    if heads is None and ffn is None:
        return recipe
    steps = []
    for s in recipe.steps:
        if s.pass_name == "prune-heads" and heads is not None:
            s = Step(s.pass_name, {**s.options, "fraction": heads})
        if s.pass_name == "prune-ffn" and ffn is not None:
            s = Step(s.pass_name, {**s.options, "fraction": ffn})
        steps.append(s)
    return replace(recipe, name=f"fast-prune(heads={heads}, ffn={ffn})", steps=tuple(steps))


def pruned_fp32(fp32: Path, out: Path, *, heads: float = 0.0, ffn: float = 0.0, correct: bool = True) -> Path:
    """fp32 MiniLM with only fusion and pruning (for the sweep)."""
    import graphc
    from graphc.core.recipes import Recipe, Step, Tolerance

    steps = [Step("fuse-ort", {"attention": "mha"}), Step("trim-outputs")]
    if heads:
        steps.append(Step("prune-heads", {"fraction": heads, "correct": correct}))
    if ffn:
        steps.append(Step("prune-ffn", {"fraction": ffn, "correct": correct}))
    steps.append(Step("remove-unused"))
    recipe = Recipe("sweep", "fusion + pruning, fp32", tuple(steps), Tolerance(min_cosine=None))
    with h.quiet():
        graphc.compress(fp32, out, recipe=recipe, force=True, attribution=False)
    return out


def _quality(sess, recipe, feeds, pool, ref) -> Any:
    from graphc.checks import measure

    return measure.cosine_stats(measure.embeddings(sess, feeds, pool=pool), ref)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import graphc
    from graphc.checks import measure
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec
    from graphc.models.minilm import embed

    cfg = dict(QUICK if args.quick else FULL)
    rep = h.Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec("minilm")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"config": {**cfg, "mode": "quick" if args.quick else "full", "threads": args.threads,
                                      "seq": h.SEQ}}

    with rep.status("fp32: graphc dynamo export"), h.quiet():
        fp32_path, _ = cached_export("minilm", work, fresh=args.fresh)
    torch_ref = h.TorchReference(recipe, args.threads, work, fresh=args.fresh)
    eval_texts = recipe.eval_texts(cfg["sentences"])
    feeds = recipe.feeds(eval_texts, batch=32, max_length=h.SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {cfg['sentences']} eval tweets") as cb:
        ref = torch_ref.embeddings(eval_texts, feeds, embed, cb)
    texts8 = recipe.eval_texts(8)
    feed_b = {f"b{b}": measure.pad_feed(recipe.feeds(texts8[:b], batch=b, max_length=h.SEQ)[0], h.SEQ) for b in (1, 8)}
    feed_b["b8_longest"] = recipe.feeds(texts8, batch=8, max_length=h.SEQ)[0]
    many = recipe.eval_texts(8 * 16)
    feed_b["b8_full"] = recipe.feeds([" ".join(many[i::8]) for i in range(8)], batch=8, max_length=h.SEQ)[0]
    assert feed_b["b8_full"]["attention_mask"].all() and feed_b["b8_full"]["attention_mask"].shape == (8, h.SEQ)
    res["config"]["real_tokens"] = {k: int(f["attention_mask"].sum()) for k, f in feed_b.items()}
    res["config"]["positions"] = {k: int(f["attention_mask"].size) for k, f in feed_b.items()}

    if not args.no_main:
        with rep.status("ORT int8: legacy export → optimize_model → quantize_dynamic"):
            ort_path = h.build_ort_int8(work, fresh=args.fresh)
        pruned = fast_recipe(args.heads, args.ffn)
        paths = {ORT_INT8: ort_path}
        results = {}
        for name, rec, file in ((INT8, "int8", "minilm-graphc-int8-fastbench.onnx"),
                                (FAST, "fast", "minilm-graphc-fast.onnx"),
                                (FAST_PRUNE, pruned, "minilm-graphc-fast-prune.onnx")):
            paths[name] = work / file
            with rep.status(f"{name}: graphc.compress(recipe={getattr(rec, 'name', rec)!r})"), h.quiet():
                results[name] = graphc.compress(fp32_path, paths[name], recipe=rec, force=True)
        result = results[FAST]
        sessions = {k: measure.session(p, threads=args.threads) for k, p in paths.items()}
        latency = {}
        for key, label in SETTINGS:
            reps = cfg["reps_b1"] if key == "b1" else cfg["reps_b8"]
            with rep.bar(f"latency {label}: {reps} interleaved reps") as cb:
                latency[key] = measure.interleaved_latency(sessions, feed_b[key], reps=reps,
                                                           warmup=cfg["warmup"], progress=cb)
        cosine = {}
        for name, sess in sessions.items():
            with rep.status(f"{name}: embeddings of {cfg['sentences']} eval tweets"):
                cosine[name] = _quality(sess, recipe, feeds, embed, ref)
        accuracy, split = h.probe_accuracies(sessions, recipe, torch_ref, cfg, rep)
        train_texts, test_texts = split["train"], split["test"]
        res["models"] = {
            name: {"path": str(paths[name]), "bytes": measure.files_bytes(paths[name]),
                   **{f"latency_{key}": latency[key][name].to_dict() for key, _ in SETTINGS},
                   "cosine_vs_torch": cosine[name].to_dict(), "probe_accuracy": accuracy[name]}
            for name in paths
        }
        res["probe"] = {"train": len(train_texts), "test": len(test_texts),
                        "torch_fp32_accuracy": accuracy["PyTorch fp32"]}
        res["fast_recipe"] = get_recipe_dict("fast")
        res["fast_prune_recipe"] = pruned.to_dict()
        res["fast_passes"] = result.to_dict()["passes"]
        res["fast_validation"] = result.validation.to_dict() if result.validation else None

    if args.sweep:
        res["sweep"] = sweep(fp32_path, work, cfg, args.threads, rep, recipe, ref, embed)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def sweep(fp32_path: Path, work: Path, cfg, threads: int, rep, recipe, ref, embed) -> list[dict[str, Any]]:
    """Quality (and b8 latency vs fp32) against the fraction of heads or FFN neurons pruned."""
    from graphc.checks import measure

    n = cfg["sweep_sentences"]
    feeds = recipe.feeds(recipe.eval_texts(n), batch=32, max_length=h.SEQ)
    ref = ref[:n]
    feed8 = measure.pad_feed(recipe.feeds(recipe.eval_texts(8), batch=8, max_length=h.SEQ)[0], h.SEQ)
    base = pruned_fp32(fp32_path, work / "sweep-fp32.onnx")
    rows = []
    base_sess = measure.session(base, threads=threads)
    base_params = measure.files_bytes(base)
    base_cos = _quality(base_sess, recipe, feeds, embed, ref)
    rows.append({"method": "none", "fraction": 0.0, "correct": None, "bytes": base_params, "mean_cos": base_cos.mean,
                 "min_cos": base_cos.min, "b8_vs_fp32": 1.0})
    for method in ("heads", "ffn"):
        for frac in SWEEP[method]:
            for correct in (False, True):
                path = work / f"sweep-{method}-{frac}-{int(correct)}.onnx"
                with rep.status(f"sweep: {method} {frac:.2f} {'corrected' if correct else 'plain'}"):
                    pruned_fp32(fp32_path, path, correct=correct, **{method: frac})
                    sess = measure.session(path, threads=threads)
                    cos = _quality(sess, recipe, feeds, embed, ref)
                    lat = measure.interleaved_latency({"base": base_sess, "pruned": sess}, feed8,
                                                      reps=cfg["sweep_reps"], warmup=1)
                rows.append({"method": method, "fraction": frac, "correct": correct,
                             "bytes": measure.files_bytes(path), "mean_cos": cos.mean, "min_cos": cos.min,
                             "b8_vs_fp32": lat["pruned"].median_ms / lat["base"].median_ms})
                path.unlink(missing_ok=True)
    base.unlink(missing_ok=True)
    return rows


def get_recipe_dict(name: str) -> dict:
    from graphc.core.recipes import get_recipe

    return get_recipe(name).to_dict()


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["models"]
    g, o = m[FAST], m[ORT_INT8]
    ratio = g["latency_b8"]["median_ms"] / o["latency_b8"]["median_ms"]
    gap = res["probe"]["torch_fp32_accuracy"] - g["probe_accuracy"]
    return [
        {"target": f"b8 latency vs ORT int8 ≤ {TARGET_RATIO}", "pass": ratio <= TARGET_RATIO,
         "measured": f"{g['latency_b8']['median_ms']:.1f} vs {o['latency_b8']['median_ms']:.1f} ms ({ratio:.3f}×)"},
        {"target": "bytes ≤ ORT int8", "pass": g["bytes"] <= o["bytes"],
         "measured": f"{g['bytes']:,} vs {o['bytes']:,} B ({g['bytes'] / o['bytes']:.3f}×)"},
        {"target": f"mean cosine ≥ {TARGET_COS}", "pass": g["cosine_vs_torch"]["mean"] >= TARGET_COS,
         "measured": f"{g['cosine_vs_torch']['mean']:.5f} (min {g['cosine_vs_torch']['min']:.4f})"},
        {"target": "probe accuracy within 1 point of fp32", "pass": gap <= TARGET_PROBE,
         "measured": f"{g['probe_accuracy']:.4f} vs {res['probe']['torch_fp32_accuracy']:.4f}"},
    ]


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = []
    if "models" in res:
        m = res["models"]
        o = m[ORT_INT8]
        lines += [
            f"MiniLM, ORT CPU, {cfg['threads']} threads, seq {cfg['seq']} ({cfg['mode']}: {cfg['reps_b1']} reps b1, "
            f"{cfg['reps_b8']} b8, interleaved; cosine on {cfg['sentences']} eval tweets; probe "
            f"{res['probe']['train']}/{res['probe']['test']})",
            "",
            f"Real tokens / positions: " + ", ".join(
                f"{label} {cfg['real_tokens'][key]}/{cfg['positions'][key]}" for key, label in SETTINGS),
            "",
            "| model | size (MB) | " + " | ".join(f"{label} (ms)" for _, label in SETTINGS) + " | "
            + " | ".join(f"{label} vs ORT" for _, label in SETTINGS) + " | mean cos | min cos | probe acc |",
            "|---|---:|" + "---:|" * (2 * len(SETTINGS)) + "---:|---:|---:|",
        ]
        for name, r in m.items():
            ms = [r[f"latency_{key}"]["median_ms"] for key, _ in SETTINGS]
            ratios = [v / o[f"latency_{key}"]["median_ms"] for v, (key, _) in zip(ms, SETTINGS)]
            lines.append(f"| {name} | {r['bytes'] / 1e6:.2f} | " + " | ".join(f"{v:.1f}" for v in ms) + " | "
                         + " | ".join(f"{x:.2f}×" for x in ratios)
                         + f" | {r['cosine_vs_torch']['mean']:.5f} | {r['cosine_vs_torch']['min']:.4f} "
                         f"| {r['probe_accuracy']:.4f} |")
        lines += ["", f"PyTorch fp32 probe accuracy {res['probe']['torch_fp32_accuracy']:.4f}. "
                      f"Recipe: {json.dumps(res['fast_recipe']['passes'])}", "",
                  "| target | result | measured |", "|---|---|---|"]
        for t in targets(res):
            lines.append(f"| {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['measured']} |")
    if "sweep" in res:
        lines += ["", f"Quality vs fraction pruned (fp32 after fuse-ort, no quantization; cosine on "
                      f"{cfg['sweep_sentences']} eval tweets vs PyTorch fp32; b8 latency vs the unpruned fused "
                      f"fp32, {cfg['sweep_reps']} interleaved reps)", "",
                  "| pruned | fraction | correction | size (MB) | mean cos | min cos | b8 vs fp32 |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in res["sweep"]:
            corr = "-" if r["correct"] is None else ("least squares" if r["correct"] else "none")
            lines.append(f"| {r['method']} | {r['fraction']:.2f} | {corr} | {r['bytes'] / 1e6:.1f} "
                         f"| {r['mean_cos']:.5f} | {r['min_cos']:.4f} | {r['b8_vs_fp32']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few reps, 64 sentences, small probe")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(h.WORK), help="work folder (shared with bench_int8.py)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached exports and PyTorch embeddings")
    parser.add_argument("--sweep", action="store_true", help="also the quality-vs-fraction sweep (fp32)")
    parser.add_argument("--no-main", action="store_true", help="skip the ORT-vs-fast comparison")
    parser.add_argument("--heads", type=float, help="prune-heads fraction instead of the recipe's")
    parser.add_argument("--ffn", type=float, help="prune-ffn fraction instead of the recipe's")
    args = parser.parse_args(argv)
    res = run(args)
    if "models" in res:
        res["targets"] = targets(res)
    from graphc.core.target import cpu_line, cpu_summary

    res["cpu"] = cpu_summary()
    print(cpu_line())
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

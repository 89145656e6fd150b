"""graphc static int8 (BBCT, QDQ) vs ONNX Runtime's ``quantize_static`` on MiniLM.

    python bench/bench_static.py [--quick] [--json OUT] [--threads 2] [--fresh] [--no-costs] [--breakdown]

In one process, on CPU with ``--threads`` intra-op threads (default 2):

1. fp32: graphc's dynamo export, unmodified;
2. ORT int8 dynamic: ``bench_int8.py``'s pipeline (legacy export → optimize_model →
   ``quantize_dynamic`` per-channel), the reference for speed;
3. ORT static minmax / 4. ORT static percentile: ``onnxruntime.quantization.quantize_static``
   (QDQ, per-channel int8 weights, uint8 activations, its default op types) on graphc's fused
   fp32 graph (cleanup → fuse-ort → trim-outputs: the graph graphc's recipe quantizes), fed
   the same calibration tweets as graphc through a ``CalibrationDataReader``; MinMax and
   Percentile (99.99, ORT's default) calibration;
5. graphc int8-static (mse): the recipe with ``method="mse"`` (clipping search) instead;
6. graphc int8-static: ``graphc.compress(fp32, recipe="int8-static")`` (min-max ranges, ORT's
   default method, after SmoothQuant migration).

Reports bytes, median latency at batch 1 and 8 × 128 tokens (interleaved), mean/min cosine of
pooled sentence embeddings vs PyTorch fp32 on real tweets, sentiment-probe accuracy, the QDQ
nodes ONNX Runtime fused into integer kernels in each model, and (unless ``--no-costs``) the
cost of each op type's activations quantized alone (``quantize-activations`` with every target,
on the fused graph and on the unfused one, where Softmax is still a node).
Shares ``bench/harness.py`` and its caches (``.graphc-cache/bench/``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from harness import (
    cosine_vs_torch,
    latency_b1_b8,
    probe_accuracies,
    build_fused,
    FULL,
    QUICK,
    ROOT,
    SEQ,
    WORK,
    Reporter,
    TorchReference,
    cpu_name,
    fingerprint,
    build_ort_int8,
    quiet,
)

CALIBRATION_TEXTS = 128  # what the int8-static recipe calibrates on (quantize-activations.calibration_texts)

FP32 = "fp32 (graphc export)"
ORT_DYN = "ORT int8 dynamic (optimizer + quantize_dynamic)"
ORT_MINMAX = "ORT quantize_static QDQ (MinMax)"
ORT_PCT = "ORT quantize_static QDQ (Percentile)"
GRAPHC_MSE = "graphc int8-static (mse ranges)"
GRAPHC = "graphc int8-static (recipe: minmax ranges)"
MODELS = (FP32, ORT_DYN, ORT_MINMAX, ORT_PCT, GRAPHC_MSE, GRAPHC)


def calibration_feeds() -> list[dict]:
    from graphc.models import get_model_spec

    recipe = get_model_spec("minilm")
    texts = recipe.eval_texts(CALIBRATION_TEXTS, split="calibration")
    return recipe.feeds(texts, batch=recipe.validation_batch)


def build_ort_static(fused: Path, work: Path, method: str, *, fresh: bool) -> Path:
    """ORT quantize_static (QDQ, per-channel) on the fused graph, calibrated on the same tweets."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = work / f"minilm-ort-static-{method}.onnx"
    stamp = work / f"minilm-ort-static-{method}.key"
    key = fingerprint(f"ort-static-{method} qdq per-channel u8/s8 {CALIBRATION_TEXTS} texts v1",
                       str(fused.stat().st_size), str(fused.stat().st_mtime_ns))
    if not fresh and out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return out
    from graphc.checks import measure

    feeds = calibration_feeds()
    # ORT's calibrators stack each tensor over the batches: one padded length for all
    longest = max(f["input_ids"].shape[1] for f in feeds)
    feeds = [measure.pad_feed(f, longest) for f in feeds]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the calibrator writes its augmented model to the working folder
        try:
            quantize_static(str(fused), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib)
        finally:
            os.chdir(cwd)
    stamp.write_text(key + "\n")
    return out


def build_graphc(fp32: Path, work: Path, method: str) -> tuple[Path, Any]:
    import graphc
    from graphc.core.recipes import BUILTIN, Step

    recipe = BUILTIN["int8-static"]
    if method != "minmax":
        steps = tuple(Step(s.pass_name, {**s.options, "method": method}) if s.pass_name == "quantize-activations" else s
                      for s in recipe.steps)
        recipe = replace(recipe, name=f"int8-static-{method}", steps=steps)
    out = work / f"minilm-graphc-static-{method}.onnx"
    with quiet():
        result = graphc.compress(fp32, out, recipe=recipe, force=True)
    return out, result


def fused_kernels(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs (its optimized model), for the QDQ-related ops."""
    import onnx

    from graphc.checks.validate import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        import onnxruntime as ort

        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    wanted = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulIntegerToFloat", "MatMul",
              "DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear", "QAttention", "QLinearAdd",
              "QGemm", "QLinearSoftmax"}
    counts = collections.Counter(n.op_type for n in model.graph.node if n.op_type in wanted)
    return dict(sorted(counts.items()))


def op_type_costs(fp32: Path, fused: Path, rep: Reporter) -> dict[str, dict[str, float]]:
    """cost_by_op_type of quantize-activations with every target, on the fused and the unfused graph."""
    import graphc
    from graphc.front.api import calibration_context
    from graphc.core.io import load_model
    from graphc.core.registry import get_pass

    out = {}
    for label, path, pre in (("fused graph", fused, None), ("unfused graph", fp32, "cleanup")):
        model = load_model(path)
        if pre:
            with quiet():
                model = graphc.compress(model, recipe=pre, validate=False, attribution=False).model
        ctx = calibration_context(model, CALIBRATION_TEXTS)
        with rep.status(f"cost of each op type's activations, {label}"):
            result = get_pass("quantize-activations").from_dict({"method": "mse"}, ctx)(model)
        out[label] = result.stats.counts["cost_by_op_type"]
    return out


# MiniLM's MatMuls by module scope: exclude-lists that leave one projection kind chosen
_OTHER_FFN2 = [f"layer.{i}.output.dense" for i in range(6)]
PROJECTIONS = {
    "Q/K/V projections": ["attention.output", "intermediate", *_OTHER_FFN2],
    "attention output projection": ["self", "intermediate", *_OTHER_FFN2],
    "FFN1 (into BiasGelu)": ["attention", "output.dense"],
    "FFN2 (into the residual SkipLayerNorm)": ["attention", "intermediate"],
}


def matmul_out_breakdown(fused: Path, rep: Reporter) -> dict[str, float]:
    """Cost of the matmul_out target split by projection kind (which MatMul outputs cost)."""
    from graphc.front.api import calibration_context
    from graphc.core.io import load_model
    from graphc.core.registry import get_pass

    ctx = calibration_context(load_model(fused), CALIBRATION_TEXTS)
    out = {}
    for label, exclude in PROJECTIONS.items():
        with rep.status(f"cost of matmul_out, {label} only"):
            result = get_pass("quantize-activations").from_dict(
                {"targets": ["matmul_out"], "weights": False, "exclude": exclude, "method": "mse"}, ctx)(load_model(fused))
        out[label] = result.stats.counts["cost_by_op_type"]["matmul_out"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from graphc.checks import measure
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec

    cfg = dict(QUICK if args.quick else FULL)
    rep = Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec("minilm")
    t_start = time.perf_counter()

    with rep.status("fp32: graphc dynamo export"), quiet():
        fp32_path, _ = cached_export("minilm", work, fresh=args.fresh)
    with rep.status("ORT int8 dynamic: legacy export → optimize_model → quantize_dynamic"):
        ort_dyn = build_ort_int8(work, fresh=args.fresh)
    with rep.status("fused fp32 graph (cleanup → fuse-ort → trim-outputs)"):
        fused = build_fused(fp32_path, work, fresh=args.fresh)
    with rep.status("ORT quantize_static MinMax"):
        ort_minmax = build_ort_static(fused, work, "minmax", fresh=args.fresh)
    with rep.status("ORT quantize_static Percentile"):
        ort_pct = build_ort_static(fused, work, "percentile", fresh=args.fresh)
    with rep.status("graphc int8-static (mse ranges)"):
        g_mse, _ = build_graphc(fp32_path, work, "mse")
    with rep.status("graphc int8-static (recipe)"):
        g_recipe, result = build_graphc(fp32_path, work, "minmax")
    paths = {FP32: fp32_path, ORT_DYN: ort_dyn, ORT_MINMAX: ort_minmax, ORT_PCT: ort_pct, GRAPHC_MSE: g_mse,
             GRAPHC: g_recipe}
    sizes = {k: measure.files_bytes(p) for k, p in paths.items()}
    kernels = {k: fused_kernels(p) for k, p in paths.items()}
    sessions = {k: measure.session(p, threads=args.threads) for k, p in paths.items()}

    latency = latency_b1_b8(sessions, recipe, cfg, rep)
    torch_ref = TorchReference(recipe, args.threads, work, fresh=args.fresh)
    cosine = cosine_vs_torch(sessions, recipe, torch_ref, cfg, rep)
    accuracy, split = probe_accuracies(sessions, recipe, torch_ref, cfg, rep)
    train_texts, test_texts, test_y = split["train"], split["test"], split["test_y"]

    costs = None if args.no_costs else op_type_costs(fp32_path, fused, rep)
    breakdown = matmul_out_breakdown(fused, rep) if args.breakdown else None
    qa = next((p for p in result.passes if p.name == "quantize-activations"), None)
    return {
        "config": {**cfg, "mode": "quick" if args.quick else "full", "threads": args.threads, "seq": SEQ,
                   "calibration_texts": CALIBRATION_TEXTS},
        "environment": {"cpu": cpu_name(), "onnxruntime": __import__("onnxruntime").__version__},
        "models": {
            name: {
                "path": str(paths[name]),
                "bytes": sizes[name],
                "latency_b1": latency["b1"][name].to_dict(),
                "latency_b8": latency["b8"][name].to_dict(),
                "cosine_vs_torch": cosine[name].to_dict(),
                "probe_accuracy": accuracy[name],
                "ort_kernels": kernels[name],
            }
            for name in MODELS
        },
        "probe": {"train": len(train_texts), "test": len(test_texts), "torch_fp32_accuracy": accuracy["PyTorch fp32"],
                  "majority_accuracy": measure.majority_accuracy(test_y)},
        "graphc_compress": {
            "validation": result.validation.to_dict() if result.validation else None,
            "quantize_activations_stats": {k: v for k, v in (qa.stats if qa else {}).items() if k != "skipped"},
        },
        "cost_by_op_type_all_targets": costs,
        "matmul_out_cost_by_projection": breakdown,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["models"]
    g = m[GRAPHC]
    best = max((m[ORT_MINMAX], m[ORT_PCT]), key=lambda r: r["cosine_vs_torch"]["mean"])
    return [
        {"target": "graphc int8-static mean cosine > best ORT quantize_static",
         "pass": g["cosine_vs_torch"]["mean"] > best["cosine_vs_torch"]["mean"],
         "measured": f"{g['cosine_vs_torch']['mean']:.5f} vs {best['cosine_vs_torch']['mean']:.5f}"},
        {"target": "graphc int8-static bytes ≤ ORT quantize_static",
         "pass": g["bytes"] <= best["bytes"],
         "measured": f"{g['bytes']:,} vs {best['bytes']:,} B ({g['bytes'] / best['bytes']:.3f}×)"},
        {"target": "graphc int8-static b8 latency ≤ ORT quantize_static",
         "pass": g["latency_b8"]["median_ms"] <= best["latency_b8"]["median_ms"],
         "measured": f"{g['latency_b8']['median_ms']:.1f} vs {best['latency_b8']['median_ms']:.1f} ms"},
        {"target": "graphc int8-static b8 latency ≤ ORT int8 dynamic (not expected: static QDQ adds Q/DQ kernels)",
         "pass": g["latency_b8"]["median_ms"] <= m[ORT_DYN]["latency_b8"]["median_ms"],
         "measured": f"{g['latency_b8']['median_ms']:.1f} vs {m[ORT_DYN]['latency_b8']['median_ms']:.1f} ms"},
    ]


def markdown(res: dict[str, Any]) -> str:
    m, cfg, env = res["models"], res["config"], res["environment"]
    ref = m[ORT_MINMAX]
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), ONNX Runtime {env['onnxruntime']} CPU, {cfg['threads']} threads, seq {cfg['seq']} "
        f"({cfg['mode']} run: {cfg['reps_b1']} reps at b1, {cfg['reps_b8']} at b8, interleaved; cosine on "
        f"{cfg['sentences']} eval tweets; probe {res['probe']['train']} train / {res['probe']['test']} test; "
        f"static models calibrated on the same {cfg['calibration_texts']} calibration tweets)",
        "",
        "| model | size (MB) | b1 median (ms) | b8 median (ms) | b8 vs ORT static MinMax | mean cos | min cos "
        "| probe acc | ORT kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in MODELS:
        r = m[name]
        b1, b8 = r["latency_b1"]["median_ms"], r["latency_b8"]["median_ms"]
        k = ", ".join(f"{op} {n}" for op, n in r["ort_kernels"].items())
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {b1:.1f} | {b8:.1f} | {b8 / ref['latency_b8']['median_ms']:.2f}× "
                     f"| {r['cosine_vs_torch']['mean']:.5f} | {r['cosine_vs_torch']['min']:.4f} | {r['probe_accuracy']:.4f} "
                     f"| {k} |")
    p = res["probe"]
    lines += ["", f"PyTorch fp32 probe accuracy {p['torch_fp32_accuracy']:.4f}, majority class {p['majority_accuracy']:.4f}.",
              "", "| target | result | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['measured']} |" for t in targets(res)]
    costs = res.get("cost_by_op_type_all_targets")
    if costs:
        keys = sorted({k for c in costs.values() for k in c})
        lines += ["", "Cost of each op type's activations quantized alone (1 - output cosine vs the float graph, "
                      "calibration tweets; quantize-activations, mse ranges, no smoothing):", "",
                  "| graph | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for label, c in costs.items():
            lines.append(f"| {label} | " + " | ".join(f"{c[k]:.4f}" if k in c else "-" for k in keys) + " |")
    breakdown = res.get("matmul_out_cost_by_projection")
    if breakdown:
        lines += ["", "matmul_out cost by projection (fused graph, that projection's outputs only):", "",
                  "| projection | cost |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in breakdown.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few reps, 64 sentences, small probe split")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(WORK), help=f"work folder (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached exports and PyTorch embeddings")
    parser.add_argument("--no-costs", action="store_true", help="skip the per-op-type cost study")
    parser.add_argument("--breakdown", action="store_true", help="also split the matmul_out cost by projection")
    args = parser.parse_args(argv)
    res = run(args)
    res["targets"] = targets(res)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

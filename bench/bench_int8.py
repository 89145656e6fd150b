"""graphc int8 vs ONNX Runtime's best int8 pipeline on MiniLM (all-MiniLM-L6-v2).

    python bench/bench_int8.py [--quick] [--json OUT] [--threads 2] [--fresh]

In one process, on CPU with ``--threads`` intra-op threads (default 2), three models:

1. fp32: graphc's dynamo export, unmodified;
2. ORT int8: legacy TorchScript export with eager attention, ``onnxruntime.transformers.
   optimizer.optimize_model(model_type="bert")``, then ``quantize_dynamic`` per-channel QInt8;
3. graphc int8: ``graphc.compress(fp32, recipe="int8")``.

Reports bytes on disk, median latency at batch 1 and 8 × 128 tokens (the models interleaved
run by run), mean/min cosine of pooled sentence embeddings vs PyTorch fp32 on real tweets,
and the accuracy of a sentiment probe trained on PyTorch fp32 embeddings. A markdown table
goes to stdout, progress to stderr. Work files live in ``.graphc-cache/bench/``; the two
exports are reused while their inputs (sources, library versions) are unchanged, the graphc
int8 model is rebuilt on every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    FULL,
    QUICK,
    SEQ,
    WORK,
    Reporter,
    TorchReference,
    build_ort_int8,
    cosine_vs_torch,
    environment,
    latency_b1_b8,
    probe_accuracies,
    quiet,
)

COSINE_TARGET = 0.995

FP32, ORT_INT8, GRAPHC_INT8 = "fp32 (graphc export)", "ORT int8 (optimizer + quantize_dynamic)", "graphc int8"
MODELS = (FP32, ORT_INT8, GRAPHC_INT8)


# --------------------------------------------------------------------------- models


def build_graphc_int8(fp32: Path, work: Path) -> tuple[Path, Any]:
    import graphc

    out = work / "minilm-graphc-int8.onnx"
    with quiet():
        result = graphc.compress(fp32, out, recipe="int8", force=True)
    return out, result


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

    # --- models
    with rep.status("fp32: graphc dynamo export"), quiet():
        fp32_path, _ = cached_export("minilm", work, fresh=args.fresh)
    with rep.status("ORT int8: legacy export → optimize_model → quantize_dynamic"):
        ort_path = build_ort_int8(work, fresh=args.fresh)
    with rep.status("graphc int8: graphc.compress(recipe='int8')"):
        graphc_path, result = build_graphc_int8(fp32_path, work)
    paths = {FP32: fp32_path, ORT_INT8: ort_path, GRAPHC_INT8: graphc_path}
    sizes = {k: measure.files_bytes(p) for k, p in paths.items()}
    sessions = {k: measure.session(p, threads=args.threads) for k, p in paths.items()}

    # --- latency (real tweets, padded to SEQ); cosine vs PyTorch fp32; sentiment probe
    latency = latency_b1_b8(sessions, recipe, cfg, rep)
    torch_ref = TorchReference(recipe, args.threads, work, fresh=args.fresh)
    cosine = cosine_vs_torch(sessions, recipe, torch_ref, cfg, rep)
    accuracy, split = probe_accuracies(sessions, recipe, torch_ref, cfg, rep)

    fusions_file = work / "minilm-ort-fusions.json"
    return {
        "config": {**cfg, "mode": "quick" if args.quick else "full", "threads": args.threads, "seq": SEQ},
        "environment": environment(),
        "models": {
            name: {
                "path": str(paths[name]),
                "bytes": sizes[name],
                "latency_b1": latency["b1"][name].to_dict(),
                "latency_b8": latency["b8"][name].to_dict(),
                "cosine_vs_torch": cosine[name].to_dict(),
                "probe_accuracy": accuracy[name],
            }
            for name in MODELS
        },
        "probe": {
            "train": len(split["train"]), "test": len(split["test"]), "torch_fp32_accuracy": accuracy["PyTorch fp32"],
            "majority_accuracy": measure.majority_accuracy(split["test_y"]),
        },
        "ort_fusions": json.loads(fusions_file.read_text()) if fusions_file.is_file() else None,
        "graphc_compress": {
            "validation_passed": result.validation.passed if result.validation else None,
            "validation": result.validation.to_dict() if result.validation else None,
            "passes": [p.name for p in result.passes if p.modified],
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------- report


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["models"]
    g, o = m[GRAPHC_INT8], m[ORT_INT8]
    return [
        {"target": "graphc int8 bytes ≤ ORT int8 bytes", "pass": g["bytes"] <= o["bytes"],
         "measured": f"{g['bytes']:,} vs {o['bytes']:,} B ({g['bytes'] / o['bytes']:.3f}×)"},
        {"target": "graphc int8 b8 latency ≤ ORT int8", "pass": g["latency_b8"]["median_ms"] <= o["latency_b8"]["median_ms"],
         "measured": f"{g['latency_b8']['median_ms']:.1f} vs {o['latency_b8']['median_ms']:.1f} ms "
                     f"({g['latency_b8']['median_ms'] / o['latency_b8']['median_ms']:.3f}×)"},
        {"target": f"graphc int8 mean cosine ≥ {COSINE_TARGET}", "pass": g["cosine_vs_torch"]["mean"] >= COSINE_TARGET,
         "measured": f"{g['cosine_vs_torch']['mean']:.5f}"},
    ]


def markdown(res: dict[str, Any]) -> str:
    m, cfg, env = res["models"], res["config"], res["environment"]
    o = m[ORT_INT8]
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), ONNX Runtime {env['onnxruntime']} CPU, {cfg['threads']} threads, "
        f"seq {cfg['seq']} ({cfg['mode']} run: {cfg['reps_b1']} reps at b1, {cfg['reps_b8']} at b8, interleaved; "
        f"cosine on {cfg['sentences']} eval tweets; probe {res['probe']['train']} train / {res['probe']['test']} test)",
        "",
        "| model | size (MB) | size vs ORT | b1 median (ms) | b8 median (ms) | b1 vs ORT | b8 vs ORT "
        "| mean cos | min cos | probe acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        r = m[name]
        b1, b8 = r["latency_b1"]["median_ms"], r["latency_b8"]["median_ms"]
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / o['bytes']:.2f}× | {b1:.1f} | {b8:.1f} "
            f"| {b1 / o['latency_b1']['median_ms']:.2f}× | {b8 / o['latency_b8']['median_ms']:.2f}× "
            f"| {r['cosine_vs_torch']['mean']:.5f} | {r['cosine_vs_torch']['min']:.4f} | {r['probe_accuracy']:.4f} |"
        )
    p = res["probe"]
    lines += [
        "",
        f"Cosine: pooled sentence embedding (mean over attention mask, L2-normalised) vs PyTorch fp32. "
        f"Probe: logistic regression trained on PyTorch fp32 embeddings; PyTorch fp32 scores "
        f"{p['torch_fp32_accuracy']:.4f}, majority class {p['majority_accuracy']:.4f}.",
        "",
        "| target | result | measured |",
        "|---|---|---|",
    ]
    for t in targets(res):
        lines.append(f"| {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['measured']} |")
    gc = res["graphc_compress"]
    if gc["validation"] is not None:
        v = gc["validation"]
        lines += ["", f"graphc.compress validation: {'passed' if gc['validation_passed'] else 'MISSED'} "
                      f"(output cosine {v['output_cosine']:.5f}, worst token cosine {v['min_row_cosine']:.4f}; "
                      f"{v['input_source']}); passes that changed the model: {', '.join(gc['passes'])}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few reps, 64 sentences, small probe split")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(WORK), help=f"work folder (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached exports and PyTorch embeddings")
    args = parser.parse_args(argv)
    res = run(args)
    res["targets"] = targets(res)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

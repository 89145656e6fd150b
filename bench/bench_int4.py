"""graphc int4 vs ONNX Runtime's 4-bit weight quantizers on MiniLM (all-MiniLM-L6-v2).

    python bench/bench_int4.py [--quick] [--json OUT] [--threads 2] [--fresh]

In one process, on CPU with ``--threads`` intra-op threads (default 2):

1. fp32: graphc's dynamo export, unmodified;
2. ORT int8: ``bench_int8.py``'s ORT pipeline (legacy export → optimize_model → quantize_dynamic
   per-channel): the size reference of the target (int4 at most half its bytes);
3. ORT int4 RTN: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``,
   4-bit, block 32, symmetric, MatMul only, accuracy_level 4, applied to graphc's fused fp32
   graph (cleanup → fuse-ort → trim-outputs: the very graph graphc's int4 quantizes, so that
   the rows differ by the quantizer only);
4. ORT int4 HQQ: the same with its ``HQQWeightOnlyQuantConfig`` (block 32, float zero points);
5. graphc int4-rtn: the ``int4`` recipe without mixed precision, every weight and table at 4-bit
   block 32, symmetric round-to-nearest (ORT RTN's setting);
6. graphc int4-mse: the same with the clipping search (``mse``, asymmetric; no calibration);
7. graphc int4-uniform: the same with GPTQ (the recipe's MatMul quantizer) but no mixed
   precision: every weight at 4-bit block 32;
8. graphc int4: ``graphc.compress(fp32, recipe="int4")``: mixed precision (bits and block size
   per layer from measured sensitivity, to the recipe's bits budget; embedding rows that
   calibration reads kept at more bits), GPTQ on the recipe's 256 calibration tweets, ``mse``
   tables.

Reports bytes on disk, median latency at batch 1 and 8 × 128 tokens (interleaved), mean/min
cosine of pooled sentence embeddings vs PyTorch fp32 on real tweets, and the accuracy of a
sentiment probe trained on PyTorch fp32 embeddings, plus PASS/MISS for its targets.
Shares ``bench/harness.py`` and its caches (``.graphc-cache/bench/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from harness import (
    build_fused,
    environment,
    cosine_vs_torch,
    latency_b1_b8,
    probe_accuracies,
    FULL,
    QUICK,
    ROOT,
    SEQ,
    WORK,
    Reporter,
    TorchReference,
    fingerprint,
    build_ort_int8,
    quiet,
)

COSINE_TARGET = 0.99
PROBE_POINTS = 0.01  # probe accuracy within 1 point of PyTorch fp32

FP32 = "fp32 (graphc export)"
ORT_INT8 = "ORT int8 (optimizer + quantize_dynamic)"
ORT_RTN = "ORT int4 RTN (MatMulNBitsQuantizer, MatMul only)"
ORT_HQQ = "ORT int4 HQQ (MatMulNBitsQuantizer, MatMul only)"
GRAPHC_RTN = "graphc int4-rtn"
GRAPHC_MSE = "graphc int4-mse"
GRAPHC_UNIFORM = "graphc int4-uniform (gptq, no mixed precision)"
GRAPHC = "graphc int4 (recipe: mixed precision + gptq)"
MODELS = (FP32, ORT_INT8, ORT_RTN, ORT_HQQ, GRAPHC_RTN, GRAPHC_MSE, GRAPHC_UNIFORM, GRAPHC)


# --------------------------------------------------------------------------- models


def build_ort_nbits(fused: Path, work: Path, algo: str, *, fresh: bool) -> Path:
    """ORT's MatMulNBitsQuantizer on the fused graph: RTN (DefaultWeightOnlyQuantConfig) or HQQ."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    out = work / f"minilm-ort-int4-{algo}.onnx"
    stamp = work / f"minilm-ort-int4-{algo}.key"
    key = fingerprint(f"ort-int4-{algo} block32 sym acc4 v1", str(fused.stat().st_size), str(fused.stat().st_mtime_ns))
    if not fresh and out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return out
    if algo == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4,
                                              op_types_to_quantize=("MatMul",), bits=4)
    else:
        config = HQQWeightOnlyQuantConfig(block_size=32, bits=4, op_types_to_quantize=("MatMul",))
    with quiet():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fused)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    stamp.write_text(key + "\n")
    return out


def build_graphc(fp32: Path, work: Path, variant: str) -> tuple[Path, Any, float]:
    """graphc's int4 recipe, or a variant of it with other quantizers (rebuilt on every run)."""
    import graphc
    from graphc.core.recipes import BUILTIN, Step

    recipe = BUILTIN["int4"]
    if variant != "recipe":
        gptq = {"symmetric": False, "method": "gptq", "act_order": True, "damp": 0.01}
        nbits = {"rtn": {"symmetric": True, "method": "rtn"}, "mse": {"symmetric": False, "method": "mse"},
                 "uniform": gptq}[variant]
        table = {"rtn": {"symmetric": True, "method": "rtn"}, "mse": {"symmetric": False, "method": "mse"},
                 "uniform": {"symmetric": False, "method": "mse"}}[variant]
        steps = []
        for s in recipe.steps:
            if s.pass_name == "mixed-precision":
                continue  # uniform 4-bit block 32: the peers' setting
            if s.pass_name == "quantize-nbits":
                s = Step(s.pass_name, {"bits": 4, "block_size": 32, **nbits})
            elif s.pass_name == "quantize-gather-block":
                s = Step(s.pass_name, {"bits": 4, "block_size": 32, **table})
            steps.append(s)
        recipe = replace(recipe, name=f"int4-{variant}", steps=tuple(steps))
    out = work / f"minilm-graphc-int4-{variant}.onnx"
    t0 = time.perf_counter()
    with quiet():
        result = graphc.compress(fp32, out, recipe=recipe, force=True, attribution=False)
    return out, result, time.perf_counter() - t0


# --------------------------------------------------------------------------- measurement


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
        ort8_path = build_ort_int8(work, fresh=args.fresh)
    with rep.status("fused fp32 graph (cleanup → fuse-ort → trim-outputs)"):
        fused = build_fused(fp32_path, work, fresh=args.fresh)
    paths = {FP32: fp32_path, ORT_INT8: ort8_path}
    errors: dict[str, str] = {}
    for name, algo in ((ORT_RTN, "rtn"), (ORT_HQQ, "hqq")):
        with rep.status(f"{name}"):
            try:
                paths[name] = build_ort_nbits(fused, work, algo, fresh=args.fresh)
            except Exception as e:  # noqa: BLE001 - report a peer tool's failure, measure the rest
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rep.note(f"[red]{name} failed[/]: {errors[name]}")
    compress: dict[str, dict[str, Any]] = {}
    for name, variant in ((GRAPHC_RTN, "rtn"), (GRAPHC_MSE, "mse"), (GRAPHC_UNIFORM, "uniform"), (GRAPHC, "recipe")):
        with rep.status(f"{name}: graphc.compress"):
            paths[name], result, seconds = build_graphc(fp32_path, work, variant)
        v = result.validation
        compress[name] = {
            "seconds": round(seconds, 1),
            "validation_passed": v.passed if v else None,
            "output_cosine": v.to_dict()["output_cosine"] if v else None,
            "min_row_cosine": v.to_dict()["min_row_cosine"] if v else None,
            "stats": {r.name: {**r.stats, "wall_s": round(r.wall_s, 1)}
                      for r in result.passes if r.name.startswith("quantize") or r.name == "mixed-precision"},
        }
    models = [m for m in MODELS if m in paths]
    sizes = {k: measure.files_bytes(paths[k]) for k in models}
    sessions = {k: measure.session(paths[k], threads=args.threads) for k in models}

    latency = latency_b1_b8(sessions, recipe, cfg, rep)
    torch_ref = TorchReference(recipe, args.threads, work, fresh=args.fresh)
    cosine = cosine_vs_torch(sessions, recipe, torch_ref, cfg, rep)
    accuracy, split = probe_accuracies(sessions, recipe, torch_ref, cfg, rep)
    train_texts, test_texts, test_y = split["train"], split["test"], split["test_y"]

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
            for name in models
        },
        "failed": errors,
        "probe": {
            "train": len(train_texts), "test": len(test_texts), "torch_fp32_accuracy": accuracy["PyTorch fp32"],
            "majority_accuracy": measure.majority_accuracy(test_y),
        },
        "graphc_compress": compress,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------- report


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["models"]
    g, o = m[GRAPHC], m[ORT_INT8]
    torch_acc = res["probe"]["torch_fp32_accuracy"]
    out = [
        {"target": "graphc int4 bytes ≤ ½ ORT int8 bytes (embeddings included)", "pass": g["bytes"] <= o["bytes"] / 2,
         "measured": f"{g['bytes']:,} vs {o['bytes'] / 2:,.0f} B ({g['bytes'] / o['bytes']:.3f}× ORT int8)"},
        {"target": f"graphc int4 mean cosine ≥ {COSINE_TARGET}", "pass": g["cosine_vs_torch"]["mean"] >= COSINE_TARGET,
         "measured": f"{g['cosine_vs_torch']['mean']:.5f} (min {g['cosine_vs_torch']['min']:.4f})"},
        {"target": "graphc int4 probe accuracy within 1 point of fp32",
         "pass": g["probe_accuracy"] >= torch_acc - PROBE_POINTS - 1e-9,
         "measured": f"{g['probe_accuracy']:.4f} vs PyTorch fp32 {torch_acc:.4f}"},
    ]
    for peer in (ORT_RTN, ORT_HQQ):
        if peer in m:
            out.append({
                "target": f"graphc int4 mean cosine ≥ {peer}",
                "pass": g["cosine_vs_torch"]["mean"] >= m[peer]["cosine_vs_torch"]["mean"],
                "measured": f"{g['cosine_vs_torch']['mean']:.5f} vs {m[peer]['cosine_vs_torch']['mean']:.5f} "
                            f"at {g['bytes'] / m[peer]['bytes']:.2f}× its bytes",
            })
    return out


def markdown(res: dict[str, Any]) -> str:
    m, cfg, env = res["models"], res["config"], res["environment"]
    o = m[ORT_INT8]
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), ONNX Runtime {env['onnxruntime']} CPU, {cfg['threads']} threads, "
        f"seq {cfg['seq']} ({cfg['mode']} run: {cfg['reps_b1']} reps at b1, {cfg['reps_b8']} at b8, interleaved; "
        f"cosine on {cfg['sentences']} eval tweets; probe {res['probe']['train']} train / {res['probe']['test']} test)",
        "",
        "| model | size (MB) | size vs ORT int8 | b1 median (ms) | b8 median (ms) | mean cos | min cos | probe acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in m.items():
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / o['bytes']:.2f}× | {r['latency_b1']['median_ms']:.1f} "
            f"| {r['latency_b8']['median_ms']:.1f} | {r['cosine_vs_torch']['mean']:.5f} "
            f"| {r['cosine_vs_torch']['min']:.4f} | {r['probe_accuracy']:.4f} |"
        )
    p = res["probe"]
    lines += [
        "",
        f"Probe: logistic regression trained on PyTorch fp32 embeddings; PyTorch fp32 scores "
        f"{p['torch_fp32_accuracy']:.4f}, majority class {p['majority_accuracy']:.4f}.",
    ]
    for name, why in res["failed"].items():
        lines.append(f"{name}: not measured, the quantizer failed: {why}")
    lines += ["", "| target | result | measured |", "|---|---|---|"]
    for t in targets(res):
        lines.append(f"| {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['measured']} |")
    lines.append("")
    for name, c in res["graphc_compress"].items():
        lines.append(f"{name}: compress {c['seconds']} s, validation "
                     f"{'passed' if c['validation_passed'] else 'MISSED'} (output cosine {c['output_cosine']:.5f}, "
                     f"worst token {c['min_row_cosine']:.4f})")
        plan = c["stats"].get("mixed-precision")
        if plan and "choices" in plan:
            mix = ", ".join(f"{k.removeprefix('layers_at_')} x{v}" for k, v in plan.items() if k.startswith("layers_at_"))
            lines.append(f"  mixed precision ({plan['wall_s']} s): {plan['planned_bits_per_weight']} bits/weight over "
                         f"{plan['layers_planned']} layers ({mix}); predicted output cosine {plan['predicted_cosine']}")
            lines += [f"  {n}" for n in plan.get("notes", [])[:-1]]
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

"""graphc ``fuse`` vs ONNX Runtime's transformer optimizer: fused ops and fp32 latency.

    python bench/bench_fuse.py [--models minilm,smollm2] [--exports dynamo/sdpa,...] [--quick]
                               [--json OUT] [--threads 2]

For each model and each export (dynamo / legacy TorchScript exporter, transformers' sdpa /
eager attention) the same exported graph goes through

1. graphc: ``graphc.compress(recipe="fuse")`` (cleanup + fusions, fp32);
2. ORT: ``onnxruntime.transformers.optimizer.optimize_model`` (``bert`` for MiniLM, ``gpt2``
   for SmolLM2, the model type ORT's docs give for decoder models without a Llama preset).

Reports the fused com.microsoft ops of each, the max abs difference to the unfused graph,
and median latency (MiniLM batch 8 × 128 tokens; SmolLM2 batch 1 × 512 tokens), every model of
one model family interleaved run by run in one process. The headline ratio compares graphc
``fuse`` on the dynamo export with ORT's optimizer on its favourite export (legacy exporter,
eager attention). Exports are cached in ``.graphc-cache/bench/fuse/``. Latency on a shared
machine is noisy: read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from harness import Reporter, fingerprint, quiet

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".graphc-cache" / "bench" / "fuse"
EXPORTS = (("dynamo", "sdpa"), ("dynamo", "eager"), ("legacy", "sdpa"), ("legacy", "eager"))
SHAPES = {"minilm": (8, 128), "smollm2": (1, 512)}
ORT_MODEL_TYPE = {"minilm": "bert", "smollm2": "gpt2"}
FAVOURITE = ("legacy", "eager")
FULL = {"reps": 30, "warmup": 3}
QUICK = {"reps": 5, "warmup": 1}


# --------------------------------------------------------------------------- models


def export_variant(model: str, exporter: str, attn: str, work: Path, *, fresh: bool = False) -> Path:
    """``model`` (a models/ spec name) exported with ``exporter`` and ``attn`` attention (cached).

    Raises the exporter's error when the export fails (SmolLM2 with the legacy exporter)."""
    from graphc.exporters.hf import export_module
    from graphc.models import get_model_spec

    out = work / f"{model}-{exporter}-{attn}.onnx"
    stamp = out.with_suffix(".key")
    key = fingerprint("fuse-bench export v1", model, exporter, attn)
    if not fresh and out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return out
    stamp.unlink(missing_ok=True)
    recipe = get_model_spec(model)
    with quiet():
        module = recipe.load_torch()
        module.model.set_attn_implementation(attn)
        export_module(module, recipe.example_inputs(), out, recipe.arch_facts(), output_names=recipe.output_names,
                      recipe=model, dynamo=exporter == "dynamo")
    stamp.write_text(key + "\n")
    return out


def ort_optimize(model: str, src: Path, work: Path) -> tuple[Path, dict[str, int]]:
    """ONNX Runtime's transformer optimizer on ``src``: (path, its fused-op statistics)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from graphc.models import get_model_spec

    facts = get_model_spec(model).arch_facts()
    out = work / f"{src.stem}-ort.onnx"
    with quiet():
        opt = optimize_model(str(src), model_type=ORT_MODEL_TYPE[model], num_heads=facts.num_heads,
                             hidden_size=facts.hidden_size)
        fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(out), use_external_data_format=model == "smollm2")
    return out, fused


def graphc_fuse(src: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    import graphc

    out = work / f"{src.stem}-graphc.onnx"
    with quiet():
        result = graphc.compress(src, out, recipe="fuse", force=True)
    return out, next((r.stats for r in result.passes if r.name == "fuse-ort"), {})


def fused_ops(path: Path) -> dict[str, int]:
    """com.microsoft ops (and ORT's onnx-domain contrib ops) in a model file."""
    from graphc.core.io import load_model

    contrib = {"SimplifiedLayerNormalization"}
    model = load_model(path)
    counts = collections.Counter(n.op_type for n in model.graph.all_nodes()
                                 if n.domain == "com.microsoft" or n.op_type in contrib)
    return dict(sorted(counts.items()))


def max_abs(a: Path, b: Path, feed: dict, threads: int) -> float:
    import numpy as np

    from graphc.checks import measure

    outs = []
    for path in (a, b):
        sess = measure.session(path, threads=threads)
        outs.append(sess.run(None, measure.feed_for(sess, feed))[0])
    return float(np.abs(outs[0] - outs[1]).max())


# --------------------------------------------------------------------------- run


def run_model(model: str, args: argparse.Namespace, rep: Reporter) -> dict[str, Any]:
    """Every export of ``model``: fused-op counts, numerics, interleaved latency."""
    from graphc.checks import measure
    from graphc.models import get_model_spec

    cfg = QUICK if args.quick else FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec(model)
    batch, seq = SHAPES[model]
    feeds = recipe.feeds(recipe.eval_texts(max(batch, 8)), batch=batch, max_length=seq)
    feed = measure.pad_feed(feeds[0], seq)
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for exporter, attn in EXPORTS:
        label = f"{exporter}/{attn}"
        if args.exports and label not in args.exports.split(","):
            continue
        try:
            with rep.status(f"{model}: export {label}"):
                src = export_variant(model, exporter, attn, work, fresh=args.fresh)
        except Exception as e:  # noqa: BLE001 - recorded: SmolLM2 does not export with the legacy exporter
            rows[label] = {"export_error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
            continue
        row: dict[str, Any] = {}
        paths[f"unfused {label}"] = src
        with rep.status(f"{model} {label}: graphc fuse"):
            try:
                g, stats = graphc_fuse(src, work)
                row["graphc"] = {"ops": fused_ops(g), "notes": stats.get("notes", []),
                                 "max_abs": max_abs(src, g, feed, args.threads)}
                paths[f"graphc fuse {label}"] = g
            except Exception as e:  # noqa: BLE001 - reported, the other exports still run
                row["graphc"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        with rep.status(f"{model} {label}: ORT optimize_model"):
            try:
                o, stats = ort_optimize(model, src, work)
                row["ort"] = {"ops": fused_ops(o), "ort_stats": stats, "max_abs": max_abs(src, o, feed, args.threads)}
                paths[f"ORT optimizer {label}"] = o
            except Exception as e:  # noqa: BLE001
                row["ort"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        rows[label] = row
    headline = {"unfused dynamo/sdpa", "graphc fuse dynamo/sdpa", "graphc fuse legacy/eager",
                "ORT optimizer dynamo/sdpa", "ORT optimizer legacy/eager"}
    wanted = [k for k in paths if args.all_latency or k in headline]
    sessions = {k: measure.session(paths[k], threads=args.threads) for k in wanted}
    with rep.bar(f"{model}: latency b{batch}×{seq}, {len(sessions)} models interleaved") as cb:
        lat = measure.interleaved_latency(sessions, feed, reps=cfg["reps"], warmup=cfg["warmup"], progress=cb)
    return {"model": model, "batch": batch, "seq": seq, "exports": rows,
            "latency_ms": {k: round(v.median_ms, 2) for k, v in lat.items()}}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"ONNX Runtime {res['onnxruntime']} CPU, {res['threads']} threads, {res['reps']} interleaved reps; "
             "latency median (noisy shared machine: read the ratios)", ""]
    for m in res["models"]:
        lat = m["latency_ms"]
        fav = lat.get("ORT optimizer legacy/eager")
        lines += [f"**{m['model']}**, batch {m['batch']} × seq {m['seq']}", "",
                  "| export | graphc fuse: fused ops | ORT optimizer: fused ops | graphc ms | ORT ms | unfused ms "
                  "| graphc vs ORT legacy/eager |", "|---|---|---|---:|---:|---:|---:|"]
        for label, row in m["exports"].items():
            if "export_error" in row:
                lines.append(f"| {label} | export failed: {row['export_error']} | | | | | |")
                continue
            g, o = row.get("graphc", {}), row.get("ort", {})
            ops = lambda r: r.get("error") or ", ".join(f"{k} {v}" for k, v in r.get("ops", {}).items()) or "none"  # noqa: E731
            gl, ol, ul = lat.get(f"graphc fuse {label}"), lat.get(f"ORT optimizer {label}"), lat.get(f"unfused {label}")
            fmt = lambda x: f"{x:.1f}" if x else "–"  # noqa: E731
            ratio = f"{gl / fav:.2f}×" if gl and fav else "–"
            lines.append(f"| {label} | {ops(g)} | {ops(o)} | {fmt(gl)} | {fmt(ol)} | {fmt(ul)} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['reps']} reps instead of {FULL['reps']}")
    parser.add_argument("--exports", default="", help="comma-separated subset, e.g. dynamo/sdpa,legacy/eager")
    parser.add_argument("--all-latency", action="store_true", help="time every model, not only the headline ones")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(WORK), help=f"work folder (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--fresh", action="store_true", help="re-export")
    args = parser.parse_args(argv)
    rep = Reporter()
    t0 = time.perf_counter()
    res = {"onnxruntime": onnxruntime.__version__, "threads": args.threads,
           "reps": (QUICK if args.quick else FULL)["reps"],
           "models": [run_model(m, args, rep) for m in args.models.split(",")]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    from graphc.core.target import cpu_line, cpu_summary

    res["cpu"] = cpu_summary()
    print(cpu_line())
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

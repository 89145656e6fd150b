"""Every architecture family on its tiny random config: export, fusions vs ORT, int8 and int4.

    python bench/bench_families.py [--families bert,llama,...] [--json OUT [--merge]] [--markdown OUT]

Per family (``graphc.models.tiny_families``: 2 layers, hidden 32, 4 heads, tiny vocabulary,
random weights, so the figures are for coverage, never for quality):

1. ``graphc export`` of the saved HF folder (and ``--kv-cache`` for decoders): seconds and
   parity with PyTorch (max abs, cosine), as the exporter checks it;
2. fused ops: those graphc's ``fuse`` recipe's ``fuse-ort`` step made vs ``onnxruntime.transformers.optimizer.optimize_model``
   on the same export (model_type ``bert`` for text encoders, ``vit`` for ViT/DINOv2, ``clip``
   for the CLIP/SigLIP towers, ``gpt2`` for decoders), with the misses fuse-ort reports and each
   fused graph's largest output difference to the unfused export (4 synthesized feeds);
3. ``compress --recipe int8`` and ``--recipe int4`` (without ``--force``): bytes, the
   validation's output cosine and worst-row cosine, passed or the one-line refusal.

Work files go to ``.graphc-cache/bench/families/``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".graphc-cache" / "bench" / "families"
ORT_TYPE = {"vit": "vit", "dinov2": "vit", "clip_vision_model": "clip", "siglip_vision_model": "clip"}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    sink = io.StringIO()
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)


def ms_ops(path: Path) -> dict[str, int]:
    from graphc.core.io import load_model

    counts = collections.Counter(n.op_type for n in load_model(path).graph.all_nodes()
                                 if n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization")
    return dict(sorted(counts.items()))


def max_abs_vs(src: Path, fused: Path) -> float:
    """Largest output difference of a fused graph to the unfused export (ORT, 4 synthesized feeds)."""
    import numpy as np

    from graphc.core.io import load_model
    from graphc.checks.validate import make_session, run_feeds, synthesize_inputs

    feeds = synthesize_inputs(load_model(src), count=4)
    ref = run_feeds(make_session(src), feeds, "export")
    got = run_feeds(make_session(fused), feeds, "fused")
    return max(float(np.max(np.abs(a - b))) for r, g in zip(ref, got) for a, b in zip(r, g))


def ort_fused(name: str, src: Path, facts: Any) -> dict[str, Any]:
    from onnxruntime.transformers.optimizer import optimize_model

    from graphc.models import tiny_families as tf

    model_type = "gpt2" if name in tf.DECODERS else ORT_TYPE.get(name, "bert")
    out = src.with_name(f"{src.stem}-ort.onnx")
    try:
        with quiet():
            opt = optimize_model(str(src), model_type=model_type, num_heads=facts.num_heads,
                                 hidden_size=facts.hidden_size)
            opt.save_model_to_file(str(out))
    except Exception as e:  # noqa: BLE001 - ORT's optimizer raises whatever its fusions hit
        return {"error": f"{model_type}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {**ms_ops(out), "max_abs": max_abs_vs(src, out)}


def compress(src: Path, recipe: str) -> dict[str, Any]:
    import graphc
    from graphc.core.errors import GraphcError

    out = src.with_name(f"{src.stem}.{recipe}.onnx")
    try:
        with quiet():
            result = graphc.compress(src, out, recipe=recipe, attribution=False)
    except GraphcError as e:
        return {"passed": False, "error": e.message}
    v = result.validation
    return {"passed": True, "bytes": result.bytes_after, "bytes_before": result.bytes_before,
            "output_cosine": v.to_dict()["output_cosine"], "min_row_cosine": v.to_dict()["min_row_cosine"],
            "input_source": v.input_source, **({"task": v.task} if v.task else {})}


def bench_family(name: str) -> dict[str, Any]:
    import graphc
    from graphc.models import tiny_families as tf

    folder = WORK / name
    if not (folder / "config.json").is_file():
        with quiet():
            tf.save_tiny(name, folder)
    row: dict[str, Any] = {"family": name}
    src = WORK / f"{name}.onnx"
    with quiet():
        exp = graphc.export(str(folder), src)
    row["export"] = {"seconds": round(exp.seconds, 1), "parity": exp.parity.to_dict(), "inputs": list(exp.input_names),
                     "outputs": list(exp.output_names)}
    if name in tf.DECODERS:
        with quiet():
            kv = graphc.export(str(folder), WORK / f"{name}-kv.onnx", kv_cache=True)
        row["export_kv"] = {"seconds": round(kv.seconds, 1), "parity": kv.parity.to_dict()}
    fused_out = WORK / f"{name}-graphc-fuse.onnx"
    with quiet():
        fuse = graphc.compress(src, fused_out, recipe="fuse", attribution=False)
    stats = next(r.stats for r in fuse.passes if r.name == "fuse-ort")
    # the ops fuse-ort made (split-skip-norm, later in the recipe, writes x86 targets' SkipLayerNorms
    # back as Add + LayerNormalization: ORT's kernels run that faster; the comparison here is
    # of what each tool finds), and the written file's output difference
    made = {k.removeprefix("ops."): v for k, v in stats.items() if k.startswith("ops.")}
    row["graphc_fused"] = {**dict(sorted({**ms_ops(fused_out), **made}.items())), "max_abs": max_abs_vs(src, fused_out)}
    row["graphc_misses"] = [s for s in stats.get("skipped", [])]
    row["ort_fused"] = ort_fused(name, src, exp.arch_facts)
    row["int8"] = compress(src, "int8")
    row["int4"] = compress(src, "int4")
    return row


_SHORT = {"MultiHeadAttention": "MHA", "GroupQueryAttention": "GQA", "Attention": "Attn",
          "SkipLayerNormalization": "SkipLN", "SkipSimplifiedLayerNormalization": "SkipSLN",
          "SimplifiedLayerNormalization": "SLN", "LayerNormalization": "LN", "RotaryEmbedding": "Rotary",
          "EmbedLayerNormalization": "EmbedLN", "BiasGelu": "BiasGelu", "FastGelu": "FastGelu", "Gelu": "Gelu",
          "QuickGelu": "QuickGelu", "BiasSplitGelu": "BiasSplitGelu"}


def _ops(counts: dict[str, Any]) -> str:
    if "error" in counts:
        return f"failed ({counts['error']})"
    ops = ", ".join(f"{_SHORT.get(k, k)} {v}" for k, v in counts.items() if k != "max_abs") or "none"
    return f"{ops} (max abs {counts['max_abs']:.0e})" if "max_abs" in counts else ops


def _quant(q: dict[str, Any]) -> str:
    if not q["passed"]:
        return "refused: " + q["error"].split("tolerance (")[-1].split(");")[0]
    return f"{q['bytes']:,} B, cos {q['output_cosine']:.4f} / row {q['min_row_cosine']:.4f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | export parity (max abs, cos) | KV-cache export | graphc `fuse` | ORT optimizer | "
             "int8 (bytes, cos / worst row) | int4 (bytes, cos / worst row) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["export"]["parity"]
        kv = r.get("export_kv")
        kv_text = f"max abs {kv['parity']['max_abs']:.1e}" if kv else "n/a"
        lines.append(f"| {r['family']} | {p['max_abs']:.1e}, {p['cosine']:.6f} | {kv_text} | {_ops(r['graphc_fused'])} | "
                     f"{_ops(r['ort_fused'])} | {_quant(r['int8'])} | {_quant(r['int4'])} |")
    misses = [(r["family"], m) for r in rows for m in r["graphc_misses"]]
    if misses:
        lines += ["", "| family | fuse-ort miss | reason |", "|---|---|---|"]
        lines += [f"| {f} | {m['node']} | {m['reason']} |" for f, m in misses]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from graphc.models import tiny_families as tf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(tf.FAMILIES))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--merge", action="store_true",
                    help="keep the other families' rows of an existing --json file (these families' rows replaced)")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.families.split(","):
        t0 = time.perf_counter()
        rows.append(bench_family(name))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.merge and args.json and args.json.is_file():
        fresh = {r["family"]: r for r in rows}
        kept = json.loads(args.json.read_text())
        rows = [fresh.pop(r["family"], r) for r in kept] + list(fresh.values())
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quality vs fraction of linear-layer parameters removed: plain SVD vs activation-aware
(whitened, SVD-LLM) SVD (and optionally ASVD) with ``svd-linear``, and structured pruning
(``prune-heads``, ``prune-ffn``, with and without the STAT correction).

    python bench/bench_svd.py [--model smollm2|minilm|both] [--removed 0.1,0.2,0.3]
                              [--methods plain,whitened,heads,heads-uncorrected,ffn,ffn-uncorrected]
                              [--head-fractions 0.34,0.67] [--ffn-fractions 0.1,0.25,0.5]
                              [--no-sequential] [--json OUT] [--plot OUT.svg] [--int8]

Each SVD point runs ``svd-linear`` with ``rank_rule="ratio"``, ``param_ratio = 1 - removed``: every
constant-weight MatMul except the LM head keeps that fraction of its parameters (SVD-LLM's
uniform compression ratio), so the methods are compared at exactly the same size. Each pruning
point runs the pass with ``fraction`` = the head (KV group) or neuron fraction per layer. The
x of every point is measured on the compressed model (:func:`linear_params` after vs before).

- SmolLM2-135M (graphc's fp32 dynamo export, cached in ``.graphc-cache/bench``): perplexity
  (``graphc.checks.measure.perplexity``) on the fixed Wikipedia eval windows
  (``perplexity_feeds``), calibration on windows of the disjoint calibration split.
- MiniLM (all-MiniLM-L6-v2): mean / min cosine of pooled sentence embeddings vs the fp32
  ONNX model on held-out tweets, calibration on the calibration tweets.

``--int8`` adds, per model, the whitened factors at the middle ratio followed by
``quantize-int8`` (the factors are plain initializers: the composition the pass promises).
ORT sessions: ``graphc.checks.measure.session`` (spin-waiting off), 2 threads.

Measured here (2 shared cores, 2026-11-21; ``--model both --int8``, then ``--methods asvd
--removed 0.2 --embedding 0.1,0.3`` for SmolLM2 and ``--methods "" --removed "" --embedding
0.1,0.3,0.5`` for MiniLM): SmolLM2 perplexity (fp32 23.26 on 16 x 512 tokens) at 10/20/30%
of linear parameters removed: plain 2.1e6 / 1.5e7 / 5.4e7, whitened 101.2 / 184.1 / 375.3,
asvd (20%) 5.2e5, whitened 20% + int8 292.0; lowrank-embedding (tied head shared) 10% / 30%
of the table: 1344 / 21174. MiniLM mean cosine at 10/20/30%: plain 0.692 / 0.610 / 0.526,
asvd 0.814 / 0.750 / 0.685, whitened 0.940 / 0.917 / 0.890, whitened 20% + int8 0.910;
lowrank-embedding 10/30/50% of the tables: 0.987 / 0.933 / 0.836. ``--damp 1e-4`` instead of
0.01 changed whitened 20% by < 0.01% on both models. Pruning and SVD on SmolLM2 in one run
(2026-11-22, ``--no-sequential``): README "Structured compression", docs/plots/smollm2_structured.*.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenBLAS's threads spin on a busy 2-core machine: one SVD of a [576, 1536] weight took 24 s
# with its default threads and 0.64 s with one (measured here under load)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".graphc-cache" / "bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


DAMP = None  # --damp: svd-linear's damp option (None: the pass's default)
SEQUENTIAL = True  # --no-sequential: prune-heads / prune-ffn's sequential option

# Structured pruning methods: (pass, STAT correction on). Their amount is the pass's
# ``fraction`` of units per layer (KV groups / heads, FFN neurons), not of parameters.
PRUNE = {"heads": ("prune-heads", True), "heads-uncorrected": ("prune-heads", False),
         "ffn": ("prune-ffn", True), "ffn-uncorrected": ("prune-ffn", False)}
SVD_METHODS = ("plain", "whitened", "asvd")
COLOURS = {"plain": "#c53030", "whitened": "#2b6cb0", "asvd": "#805ad5", "heads": "#2f855a",
           "heads-uncorrected": "#9ae6b4", "ffn": "#dd6b20", "ffn-uncorrected": "#fbd38d"}


def unit_of(method: str) -> str:
    return "heads (KV groups)" if method.startswith("heads") else "neurons" if method.startswith("ffn") else "params"


def linear_params(model: ir.Model) -> int:
    """Weight parameters of the linear layers: distinct constant 2-D weights of float MatMul /
    Gemm nodes, the LM head (a MatMul producing a graph output) left out, as svd-linear counts."""
    from graphc.passes._quant import const_array
    from graphc.passes.svd_linear import _is_head

    seen: dict[int, int] = {}
    for node in model.graph.all_nodes():
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        c = const_array(w) if w is not None else None
        if c is None or c.ndim != 2 or c.dtype.kind != "f" or _is_head(model.graph, node.outputs[0]):
            continue
        seen[id(w)] = int(c.size)
    return sum(seen.values())


def compress(path: Path, method: str, removed: float, calibration, int8: bool = False) -> tuple[bytes, dict]:
    """The fp32 model with ``method`` (svd-linear at ``param_ratio = 1 - removed``, or a pruning
    pass at ``fraction = removed``) and optionally quantize-int8 applied; serialized bytes and
    stats, with ``linear_params_removed`` measured on the compressed model (:func:`linear_params`)."""
    import graphc.core.io
    from graphc.core.pass_base import PassContext
    from graphc.core.registry import get_pass

    model = graphc.core.io.load_model(path)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    before = linear_params(model)
    ctx = PassContext(calibration=calibration, calibration_source="bench calibration split")
    t0 = time.perf_counter()
    if method in PRUNE:
        name, correct = PRUNE[method]
        result = get_pass(name).from_dict({"fraction": removed, "correct": correct, "sequential": SEQUENTIAL},
                                          ctx)(model)
    else:
        options = {"method": method, "rank_rule": "ratio", "param_ratio": 1.0 - removed}
        if DAMP is not None:
            options["damp"] = DAMP
        result = get_pass("svd-linear").from_dict(options, ctx)(model)
    stats = dict(result.stats.counts)
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["linear_params_removed"] = round(1.0 - linear_params(model) / before, 6)
    if int8:
        q = get_pass("quantize-int8")(None, ctx)(model)
        stats["int8"] = {k: v for k, v in q.stats.counts.items()}
    from graphc.core.io import inline_external_data

    with inline_external_data(model):
        data = ir.serde.serialize_model(model).SerializeToString()
    del model
    gc.collect()
    return data, stats


_SVD_CACHE: dict = {}
_MOMENTS_CACHE: dict = {}


def memoize_factorization() -> None:
    """Every point factorizes the same fp32 model: the calibration moments and each layer's
    SVD do not depend on the ratio, so they are computed once per method (and model)."""
    import hashlib

    from graphc.core import calibrate
    from graphc.passes import _lowrank

    svd, moments = _lowrank.svd, calibrate.input_moments

    def cached_svd(m):
        m = np.asarray(m)
        key = (m.shape, hashlib.sha1(np.ascontiguousarray(m).tobytes()).hexdigest())
        if key not in _SVD_CACHE:
            _SVD_CACHE[key] = tuple(a.astype(np.float32) for a in svd(m))
        return _SVD_CACHE[key]

    def cached_moments(model, values, feeds, *, pass_name):
        key = (model.graph.name, len(feeds), tuple(sorted(v.name for v in values)))
        if key not in _MOMENTS_CACHE:
            _MOMENTS_CACHE[key] = moments(model, values, feeds, pass_name=pass_name)
        return _MOMENTS_CACHE[key]

    _lowrank.svd, calibrate.input_moments = cached_svd, cached_moments


def forget(method_changed: bool) -> None:
    if method_changed:
        _SVD_CACHE.clear()


def compress_embedding(path: Path, removed: float) -> tuple[bytes, dict]:
    """The fp32 model with lowrank-embedding at ``param_ratio = 1 - removed`` (tied head shares)."""
    import graphc.core.io
    from graphc.core.io import inline_external_data
    from graphc.core.registry import get_pass

    model = graphc.core.io.load_model(path)
    result = get_pass("lowrank-embedding").from_dict({"rank_rule": "ratio", "param_ratio": 1.0 - removed})(model)
    with inline_external_data(model):
        data = ir.serde.serialize_model(model).SerializeToString()
    return data, dict(result.stats.counts)


def embedding_row(stats: dict, removed: float) -> dict:
    return {"method": "lowrank-embedding", "removed": removed, "tables": stats.get("tables_factorized", 0),
            "table_params_removed": round(1 - stats.get("table_params_after", 0) / max(stats.get("table_params_before", 1), 1), 4),
            "tied_heads_shared": stats.get("tied_heads_shared", 0)}


def points(args):
    """(method, amount, int8) per point: ``--removed`` for the SVD methods, ``--head-fractions``
    / ``--ffn-fractions`` for the pruning ones."""
    amounts = {"heads (KV groups)": args.head_fractions, "neurons": args.ffn_fractions, "params": args.removed}
    out = [(m, r, False) for m in args.methods for r in amounts[unit_of(m)]]
    if args.int8 and args.removed:
        out.append(("whitened", args.removed[len(args.removed) // 2], True))
    return out


def point_row(method: str, removed: float, int8: bool, stats: dict) -> dict:
    """The fields every compressed point's row has; ``fraction_removed`` is measured."""
    row = {"method": method + (" + int8" if int8 else ""), "removed": removed, "unit": unit_of(method),
           "fraction_removed": stats["linear_params_removed"], "seconds": stats["seconds"]}
    if method in PRUNE:
        row["units_removed"] = stats.get("heads_removed", stats.get("neurons_removed", 0))
    else:
        row.update(layers=stats.get("layers_factorized"), plain_fallbacks=stats.get("plain_fallbacks", 0))
    return row


# --------------------------------------------------------------------------- SmolLM2


def smollm2(args) -> dict[str, Any]:
    from graphc.checks import measure
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec

    recipe = get_model_spec("smollm2")
    path = Path(args.smollm2_onnx) if args.smollm2_onnx else None
    if path is None:
        path, cached = cached_export("smollm2", WORK)
        log(f"smollm2 fp32 export {'(cached)' if cached else 'made'}: {path}")
    ppl_feeds = recipe.perplexity_feeds(args.windows, seq=args.seq, batch=1)
    calib = recipe.feeds(recipe.eval_texts(args.calib_texts, split="calibration"), batch=4, max_length=128)
    calib = calib[: args.calib_feeds]
    calib_tokens = int(sum(f["input_ids"].size for f in calib))
    log(f"perplexity on {args.windows} windows of {args.seq} tokens; calibration {calib_tokens} tokens")
    rows = []
    sess = measure.session(path)
    base = measure.perplexity(sess, ppl_feeds)
    del sess
    log(f"fp32 perplexity {base.perplexity:.3f}")
    rows.append({"method": "fp32", "removed": 0.0, "perplexity": round(base.perplexity, 4)})
    last = None
    for method, removed, int8 in points(args):
        forget(method != last)
        last = method
        data, stats = compress(path, method, removed, calib, int8)
        sess = measure.session(data)
        del data
        ppl = measure.perplexity(sess, ppl_feeds)
        del sess
        gc.collect()
        row = {**point_row(method, removed, int8, stats), "perplexity": round(ppl.perplexity, 4),
               "rise": round(measure.relative_rise(ppl.perplexity, base.perplexity), 4)}
        log(str(row))
        rows.append(row)
    for removed in args.embedding:
        data, stats = compress_embedding(path, removed)
        sess = measure.session(data)
        del data
        ppl = measure.perplexity(sess, ppl_feeds)
        del sess
        row = {**embedding_row(stats, removed), "perplexity": round(ppl.perplexity, 4),
               "rise": round(measure.relative_rise(ppl.perplexity, base.perplexity), 4)}
        log(str(row))
        rows.append(row)
    return {"model": "smollm2", "metric": "perplexity", "windows": args.windows, "seq": args.seq,
            "calibration_tokens": calib_tokens, "tokens": base.tokens, "rows": rows}


# --------------------------------------------------------------------------- MiniLM


def minilm(args) -> dict[str, Any]:
    from graphc.checks import measure
    from graphc.front.demo import cached_export, length_sorted
    from graphc.models import get_model_spec

    recipe = get_model_spec("minilm")
    path = Path(args.minilm_onnx) if args.minilm_onnx else None
    if path is None:
        path, cached = cached_export("minilm", WORK)
        log(f"minilm fp32 export {'(cached)' if cached else 'made'}: {path}")
    texts = length_sorted(recipe, recipe.eval_texts(args.texts, split="eval"))
    feeds = recipe.feeds(texts, batch=32)
    calib = recipe.feeds(recipe.eval_texts(args.calib_texts, split="calibration"), batch=32)
    calib_tokens = int(sum(int(f["attention_mask"].sum()) for f in calib))
    ref = measure.embeddings(measure.session(path), feeds)
    rows = [{"method": "fp32", "removed": 0.0, "mean_cosine": 1.0}]
    last = None
    for method, removed, int8 in points(args):
        forget(method != last)
        last = method
        data, stats = compress(path, method, removed, calib, int8)
        got = measure.embeddings(measure.session(data), feeds)
        cos = measure.cosine_stats(got, ref)
        row = {**point_row(method, removed, int8, stats), "mean_cosine": round(cos.mean, 5),
               "min_cosine": round(cos.min, 5), "bytes": len(data)}
        log(str(row))
        rows.append(row)
    for removed in args.embedding:
        data, stats = compress_embedding(path, removed)
        cos = measure.cosine_stats(measure.embeddings(measure.session(data), feeds), ref)
        row = {**embedding_row(stats, removed), "mean_cosine": round(cos.mean, 5), "min_cosine": round(cos.min, 5),
               "bytes": len(data)}
        log(str(row))
        rows.append(row)
    return {"model": "minilm", "metric": "embedding cosine vs fp32", "texts": len(texts),
            "calibration_tokens": calib_tokens, "rows": rows}


# --------------------------------------------------------------------------- report


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        ppl = res["metric"] == "perplexity"
        lines.append(f"\n{res['model']}: {res['metric']} (calibration {res['calibration_tokens']} tokens)\n")
        lines.append("| method | setting | linear params removed | "
                     + ("perplexity | rise |" if ppl else "mean cosine | min cosine |"))
        lines.append("|---|---|---|---|---|")
        for r in res["rows"]:
            if "table_params_removed" in r:
                frac = f"{r['table_params_removed']:.1%} of the embedding table"
            else:
                frac = f"{r.get('fraction_removed') or r['removed']:.1%}"
            setting = f"fraction {r['removed']:g} of {r.get('unit', 'params')}" if r["removed"] else ""
            vals = (f"{r['perplexity']:.2f} | {r.get('rise', 0):+.1%} |" if ppl
                    else f"{r['mean_cosine']:.4f} | {r.get('min_cosine', 1.0):.4f} |")
            lines.append(f"| {r['method']} | {setting} | {frac} | {vals}")
    return "\n".join(lines)


def plot(res: dict[str, Any]) -> str:
    """Quality vs measured fraction of linear parameters removed, one series per method (each
    starting at the fp32 point, nothing removed), as a standalone SVG document."""
    from graphc.report.charts import GREY, standalone_svg, xy_chart

    ppl = res["metric"] == "perplexity"
    key = "perplexity" if ppl else "mean_cosine"
    base = next(r[key] for r in res["rows"] if r["method"] == "fp32")
    by_method: dict[str, list] = {}
    for r in res["rows"]:
        if r["method"] != "fp32" and "fraction_removed" in r:
            by_method.setdefault(r["method"], []).append((r["fraction_removed"], r[key]))
    series = [(m, COLOURS.get(m, GREY), [(0.0, base), *sorted(ps)]) for m, ps in by_method.items()]
    what = "perplexity (log scale)" if ppl else "mean embedding cosine vs fp32"
    chart = xy_chart(f"plot-{res['model']}", f"{res['model']}: {what} vs linear-layer parameters removed",
                     series, x_label="fraction of linear-layer parameters removed (LM head and embeddings kept)",
                     y_label=what, log_y=ppl, x_fmt=lambda v: f"{v:.0%}")
    return standalone_svg(chart)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "minilm", "both"), default="both")
    parser.add_argument("--removed", default="0.1,0.2,0.3", help="fractions of linear-layer parameters removed "
                        "(empty: none)")
    parser.add_argument("--methods", default="plain,whitened", help="comma-separated: plain, whitened, asvd "
                        "(svd-linear at --removed); heads, heads-uncorrected (prune-heads at --head-fractions), "
                        "ffn, ffn-uncorrected (prune-ffn at --ffn-fractions); -uncorrected: correct=false")
    parser.add_argument("--head-fractions", default="0.34,0.67", help="prune-heads fractions of each block's "
                        "heads (KV groups on grouped-KV models; rounded down to whole units)")
    parser.add_argument("--ffn-fractions", default="0.1,0.25,0.5", help="prune-ffn fractions of each FFN's neurons")
    parser.add_argument("--no-sequential", action="store_true", help="pruning: refit every layer on the original "
                        "model's activations (one calibration pass) instead of the passes' default, layer by "
                        "layer on the model pruned so far (one calibration pass per layer)")
    parser.add_argument("--int8", action="store_true", help="also whitened SVD + quantize-int8 at the middle ratio")
    parser.add_argument("--embedding", default="", help="also lowrank-embedding at these fractions of table "
                        "parameters removed (comma-separated)")
    parser.add_argument("--damp", type=float, help="svd-linear damp (whitened: ridge on the input second moment)")
    parser.add_argument("--windows", type=int, default=32, help="SmolLM2 perplexity windows")
    parser.add_argument("--seq", type=int, default=512, help="SmolLM2 perplexity window length")
    parser.add_argument("--calib-texts", type=int, default=512, help="calibration texts")
    parser.add_argument("--calib-feeds", type=int, default=16, help="SmolLM2 calibration feeds of 4 x 128 tokens")
    parser.add_argument("--texts", type=int, default=512, help="MiniLM eval tweets")
    parser.add_argument("--smollm2-onnx", help="an fp32 SmolLM2 export to use as is (default: graphc.front.demo.cached_export, "
                        "which re-exports whenever exporter or model-recipe sources changed)")
    parser.add_argument("--minilm-onnx", help="an fp32 MiniLM export to use as is")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--plot", metavar="OUT.svg", help="also write quality vs fraction of linear parameters "
                        "removed as an SVG file (with --model both: OUT-minilm.svg and OUT-smollm2.svg)")
    args = parser.parse_args(argv)
    args.removed = [float(x) for x in args.removed.split(",") if x.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.embedding = [float(x) for x in args.embedding.split(",") if x.strip()]
    args.head_fractions = [float(x) for x in args.head_fractions.split(",") if x.strip()]
    args.ffn_fractions = [float(x) for x in args.ffn_fractions.split(",") if x.strip()]
    unknown = [m for m in args.methods if m not in (*SVD_METHODS, *PRUNE)]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join((*SVD_METHODS, *PRUNE))}")
    global DAMP, SEQUENTIAL
    DAMP, SEQUENTIAL = args.damp, not args.no_sequential
    memoize_factorization()
    results = []
    if args.model in ("minilm", "both"):
        results.append(minilm(args))
    if args.model in ("smollm2", "both"):
        _MOMENTS_CACHE.clear()
        _SVD_CACHE.clear()
        results.append(smollm2(args))
    from graphc.core.target import cpu_line, cpu_summary

    results["cpu"] = cpu_summary()
    print(cpu_line())
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        out = Path(args.plot)
        for res in results:
            name = out if len(results) == 1 else out.with_name(f"{out.stem}-{res['model']}{out.suffix}")
            name.write_text(plot(res))
            log(f"plot: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SmolLM2-135M as onnxruntime-genai folders: graphc vs onnxruntime-genai's model builder.

    python bench/bench_genai.py [--recipe recipes/smollm2-int4.toml] [--windows 8] [--new-tokens 128]
                                [--prompt 512] [--reps 3] [--builder-variants default,k_quant_mixed] [--json OUT]
                                [--folder LABEL=PATH ...] [--fp32 graphc|builder] [--plot OUT.svg]
    python bench/bench_genai.py --from-json OUT.json --plot OUT.svg    # redraw, measure nothing

In one process, on this machine's CPU (named in the output):

- the builder: ``python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p int4 -e cpu`` on the
  converted SmolLM2 folder (and ``--extra_options algo_config=...`` variants), timed;
- graphc: ``graphc export smollm2 --kv-cache --genai`` (fp32 folder), then ``graphc compress
  --genai --recipe RECIPE`` on its model, timed;
- ``--recipe none``: no graphc folder of its own (the ``--folder`` ones only); ``--fp32 builder``:
  the builder's ``-p fp32`` folder is the fp32 baseline instead of graphc's export;
- a cached graphc folder written by an earlier version in the separate-buffer form is written
  again (``graphc.exporters.genai.rewrite_folder``: the same compressed graph, this version's
  genai writer, no recompression) and both are measured;
- per folder: bytes of the ONNX files; perplexity on held-out Wikipedia windows (the eval split,
  which calibration never reads) from one prefill call per window through ONNX Runtime; decode
  tokens/s and prefill time through ``og.Generator`` (batch 1, a ``--prompt``-token prompt,
  ``--new-tokens`` greedy tokens), folders interleaved ``--reps`` times, median; genai runs its
  decoder on half the logical cores unless the folder says otherwise (one thread on a 2-core
  machine without SMT; graphc's folders say 0, ONNX Runtime's default of a thread per physical
  core): ``--og-threads N`` overlays N on every folder;
- decode as a fraction of the memory-bandwidth bound: bytes one decode step must read (every
  weight outside embedding lookups, plus the KV cache at the mean context) times tokens/s,
  over the copy bandwidth measured here (numpy, 256 MB, bytes read + written, best of 1 and 2
  threads); the load average before and after;
- ``--plot``: perplexity rise against bytes, the builder's folders and graphc's as two series (the
  fp32 baseline is the 0% line, off the chart by its size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness as b8  # bench/harness.py (the script's folder is on sys.path)

WORK = b8.WORK / "genai"


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))


def build_builder(hf: Path, variant: str, fresh: bool, precision: str = "int4") -> tuple[Path, float]:
    out = WORK / f"builder-{precision}-{variant}"
    if out.is_dir() and (out / "genai_config.json").is_file() and not fresh:
        stamp = WORK / f"{out.name}.seconds"
        return out, float(stamp.read_text()) if stamp.is_file() else float("nan")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(WORK / "builder-cache")]
    if variant != "default":
        cmd += ["--extra_options", f"algo_config={variant}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"builder {variant} failed: {proc.stderr.strip().splitlines()[-1:]}")
    seconds = time.perf_counter() - t0
    (WORK / f"{out.name}.seconds").write_text(f"{seconds:.1f}\n")
    return out, seconds


def build_graphc_fp32(fresh: bool) -> Path:
    import graphc

    fp32 = WORK / "graphc-fp32"
    if fresh or not (fp32 / "genai_config.json").is_file():
        import shutil

        shutil.rmtree(fp32, ignore_errors=True)
        with b8.quiet():
            graphc.export("smollm2", fp32, kv_cache=True, genai=True)
    return fp32


def build_graphc(recipe: str, fresh: bool) -> tuple[Path, Path, float]:
    import graphc

    fp32 = build_graphc_fp32(fresh)
    out = WORK / f"graphc-{Path(recipe).stem}"
    seconds = float("nan")
    if fresh or not (out / "genai_config.json").is_file():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        with b8.quiet():
            graphc.compress(fp32 / "model.onnx", out, recipe=recipe, genai=True, attribution=False)
        seconds = time.perf_counter() - t0
        (WORK / f"{out.name}.seconds").write_text(f"{seconds:.1f}\n")
    elif (WORK / f"{out.name}.seconds").is_file():
        seconds = float((WORK / f"{out.name}.seconds").read_text())
    return fp32, out, seconds


def served_form(folder: Path) -> Path | None:
    """The folder written again in this version's genai form, when ``folder`` was written in the
    separate-buffer form (an earlier version's cached build); None when it already is."""
    from graphc.exporters.genai import rewrite_folder

    config = json.loads((folder / "genai_config.json").read_text())
    if config["search"].get("past_present_share_buffer"):
        return None
    out = folder.with_name(f"{folder.name}-shared")
    if not (out / "genai_config.json").is_file():
        with b8.quiet():
            notices = rewrite_folder(folder, out)
        if notices:
            print("\n".join(notices), file=sys.stderr)
    return out


def bytes_per_token(folder: Path, context: int) -> int:
    """Bytes one decode step reads: every initializer except the tables only gathered from (one
    row a token), plus fp32 keys and values of every layer at ``context`` tokens."""
    import onnx_ir as ir

    config = json.loads((folder / "genai_config.json").read_text())
    dec = config["model"]["decoder"]
    model = ir.load(folder / dec["filename"])
    total = 0
    for value in model.graph.initializers.values():
        uses = value.uses()
        gathered = uses and all(u.op_type in ("Gather", "GatherBlockQuantized") and i == 0 for u, i in uses)
        if uses and not gathered and value.const_value is not None:
            total += value.const_value.nbytes
    kv = dec["num_hidden_layers"] * 2 * dec["num_key_value_heads"] * dec["head_size"] * context * 4
    return total + kv


def copy_bandwidth() -> float:
    """Bytes/s of a 256 MB numpy copy (read + written), best of 5, in 1 and 2 threads."""
    import threading

    import numpy as np

    n = 64 * 1024 * 1024
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for threads in (1, 2):
        bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        for _ in range(5):
            workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def prefill_feed(session, ids, config: dict) -> dict:
    """One prefill call: the window, ones for the mask, and empty pasts shaped
    [1, kv_heads, 0, head_size] (the builder's models leave head dims symbolic)."""
    import numpy as np

    dec = config["model"]["decoder"]
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = ids
        elif i.name == "attention_mask":
            feed[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        elif i.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), dtype)
    return feed


def perplexity(folder: Path, windows: list, threads: int) -> float:
    import numpy as np

    from graphc.checks import measure
    from graphc.models.smollm2 import token_nll

    config = json.loads((folder / "genai_config.json").read_text())
    sess = measure.session(folder / config["model"]["decoder"]["filename"], threads=threads)
    nll, count = 0.0, 0
    for w in windows:
        logits = sess.run(["logits"], prefill_feed(sess, w["input_ids"], config))[0]
        total, n = token_nll(np.asarray(logits, np.float32), w["input_ids"])
        nll += total
        count += n
    return float(np.exp(nll / count))


def decode_speed(folder: Path, prompt: list[int], new_tokens: int, threads: int = 0) -> dict[str, float]:
    """Prefill ms and decode tokens/s through og.Generator. ``threads`` > 0: the decoder's
    ``intra_op_num_threads`` overlaid on the folder's config; 0: the folder's own (genai's default,
    half the logical cores, where it says none: one thread on a 2-core machine without SMT)."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads > 0:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    gen.generate_next_token()
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done() and steps < new_tokens - 1:
        gen.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "decode_tok_s": steps / (t2 - t1) if steps else 0.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from graphc.models import get_model_spec
    from graphc.models.smollm2 import converted_folder
    from graphc.core.target import cpu_summary

    WORK.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"cpu": cpu_summary(), "config": vars(args).copy()}
    hf = converted_folder()
    folders: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for variant in args.builder_variants.split(","):
        folders[f"builder int4 {variant}"], seconds[f"builder int4 {variant}"] = build_builder(hf, variant, args.fresh)
    for precision in (p for p in args.builder_precisions.split(",") if p and p != "int4"):  # their default options
        label = f"builder {precision} default"
        folders[label], seconds[label] = build_builder(hf, "default", args.fresh, precision)
    if args.fp32 == "builder":  # the builder's own fp32 folder as the baseline (and an input to compress)
        folders["builder fp32"], seconds["builder fp32"] = build_builder(hf, "default", args.fresh, "fp32")
    if args.recipe != "none":
        fp32, ours, secs = build_graphc(args.recipe, args.fresh)
        if args.fp32 == "graphc":
            folders["graphc fp32"] = fp32
        name = f"graphc {Path(args.recipe).stem}"
        served = served_form(ours)
        if served is not None:
            folders[f"{name} (separate buffers)"] = ours
            seconds[f"{name} (separate buffers)"] = secs
        folders[name] = served or ours
        seconds[name] = secs
    elif args.fp32 == "graphc":
        folders["graphc fp32"] = build_graphc_fp32(args.fresh)
    for extra in args.folder:
        label, _, path = extra.partition("=")
        folders[label] = Path(path)
    res["load_before"] = os.getloadavg()
    res["bandwidth_gb_s"] = copy_bandwidth() / 1e9
    recipe = get_model_spec("smollm2")
    windows = recipe.perplexity_feeds(args.windows, seq=512, split="eval")
    prompt = [int(t) for t in windows[0]["input_ids"][0][: args.prompt]]
    rows = {}
    for name, folder in folders.items():
        rows[name] = {"bytes": onnx_bytes(folder), "compress_s": seconds.get(name),
                      "perplexity": perplexity(folder, windows, args.threads)}
    speed: dict[str, list[dict[str, float]]] = {n: [] for n in folders}
    for _ in range(args.reps):
        for name, folder in folders.items():
            speed[name].append(decode_speed(folder, prompt, args.new_tokens, args.og_threads))
    fp32_ppl = rows[f"{args.fp32} fp32"]["perplexity"]
    for name in folders:
        rows[name]["prefill_ms"] = statistics.median(s["prefill_ms"] for s in speed[name])
        rows[name]["decode_tok_s"] = statistics.median(s["decode_tok_s"] for s in speed[name])
        rows[name]["ppl_rise"] = rows[name]["perplexity"] / fp32_ppl - 1
        rows[name]["bytes_per_token"] = bytes_per_token(folders[name], args.prompt + args.new_tokens // 2)
        bound = res["bandwidth_gb_s"] * 1e9 / rows[name]["bytes_per_token"]
        rows[name]["bound_fraction"] = rows[name]["decode_tok_s"] / bound
    base = next((r["decode_tok_s"] for n, r in rows.items() if n.startswith("builder int4 default")), None)
    for r in rows.values():
        r["decode_vs_builder"] = r["decode_tok_s"] / base if base else None
    res["load_after"] = os.getloadavg()
    res["rows"] = rows
    return res


def markdown(res: dict[str, Any]) -> str:
    c = res["cpu"]
    cfg = res["config"]
    lines = [f"CPU: {c['name']} (graphc target {c['target']}). SmolLM2-135M, {cfg['windows']} eval windows of 512 tokens, "
             f"prompt {cfg['prompt']}, {cfg['new_tokens']} new tokens, {cfg['reps']} interleaved reps (median). "
             f"Load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}; copy bandwidth "
             f"{res['bandwidth_gb_s']:.1f} GB/s.", "",
             "| folder | ONNX bytes | perplexity | rise vs fp32 | prefill (ms) | decode tok/s | vs builder | "
             "bytes/token | of bound | build (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["rows"].items():
        build = f"{r['compress_s']:.0f}" if r.get("compress_s") == r.get("compress_s") and r.get("compress_s") else "-"
        ratio = f"{r['decode_vs_builder']:.2f}x" if r.get("decode_vs_builder") else "-"
        lines.append(f"| {name} | {r['bytes']:,} | {r['perplexity']:.3f} | {r['ppl_rise']:+.2%} | {r['prefill_ms']:.0f} "
                     f"| {r['decode_tok_s']:.1f} | {ratio} | {r['bytes_per_token'] / 1e6:.1f} MB "
                     f"| {r['bound_fraction']:.1%} | {build} |")
    return "\n".join(lines)


def plot(res: dict[str, Any]) -> str:
    """Perplexity rise vs ONNX bytes of every int4-class folder of a run, one series per tool, as a
    standalone SVG."""
    from graphc.report.charts import BAD, standalone_svg, xy_chart

    c, cfg = res["cpu"], res["config"]
    rows = {n: r for n, r in res["rows"].items() if "fp32" not in n and r.get("ppl_rise") is not None}
    series, notes = [], []
    for label, colour, members in (
            ("onnxruntime-genai model builder", BAD, [n for n in rows if n.startswith("builder")]),
            ("graphc", "#2b6cb0", [n for n in rows if not n.startswith("builder")])):
        if not members:
            continue
        pts = [p for n in members for p in ((rows[n]["bytes"] / 1e6, 100 * rows[n]["ppl_rise"]), (None, None))]
        series.append((label, colour, pts))
        notes += [(rows[n]["bytes"] / 1e6, 100 * rows[n]["ppl_rise"],
                   f"{n.removeprefix('builder ').removeprefix('graphc ')} ({100 * rows[n]['ppl_rise']:+.1f}%)", colour)
                  for n in members]
    title = (f"SmolLM2-135M genai folders: perplexity rise vs size ({cfg['windows']} eval windows of 512 tokens; "
             f"{c['name']})")
    chart = xy_chart("genai-ppl-bytes", title, series, x_label="ONNX bytes (MB)",
                     y_label="perplexity rise over fp32 (%)", x_fmt=lambda v: f"{v:g}", y_fmt=lambda v: f"{v:g}%",
                     notes=notes)
    return standalone_svg(chart)


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """The generation options this script and bench_generate_shared.py share."""
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--og-threads", type=int, default=0,
                        help="og.Generator's intra-op threads overlaid on every folder (0: each folder's own "
                             "setting; genai's default, half the logical cores, where it has none)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(b8.ROOT / "recipes" / "smollm2-int4.toml"),
                        help="graphc's recipe for its own folder (compressed here, then cached), or none")
    parser.add_argument("--windows", type=int, default=8)
    add_decode_args(parser)
    parser.add_argument("--builder-variants", default="default,k_quant_mixed")
    parser.add_argument("--builder-precisions", default="int4",
                        help="also the builder's folders at these precisions (e.g. int4,int8), default options")
    parser.add_argument("--fp32", choices=("graphc", "builder"), default="graphc",
                        help="the fp32 baseline: graphc's own export, or the builder's -p fp32 folder (built here)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--folder", action="append", default=[], metavar="LABEL=PATH",
                        help="also measure this genai folder (e.g. one compressed by `graphc compress --genai`)")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--plot", metavar="OUT.svg", help="also write perplexity rise vs bytes as an SVG")
    parser.add_argument("--from-json", metavar="IN.json", help="measure nothing: print and plot an earlier run's JSON")
    args = parser.parse_args(argv)
    res = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    print(markdown(res))
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    if args.plot:
        Path(args.plot).write_text(plot(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())

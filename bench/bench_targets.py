"""int8 formulations per CPU target, and ``--recipe auto``, against ONNX Runtime's pipelines on MiniLM.

    python bench/bench_targets.py [--quick] [--json OUT] [--threads 2] [--avx2-sentences N]

In one process, on this machine's CPU (named in the output with the flags that matter):
ORT's optimizer fp32 and ORT's int8 pipeline (legacy export → optimize_model → per-channel
quantize_dynamic, as bench_int8.py), graphc ``fuse`` (fp32), graphc ``int8`` in each
formulation this machine can run exactly (u8s8, u8u8, u8s7, u8s8p; see graphc/core/target.py) and
with 8-bit MatMulNBits weights (block 128, accuracy level 4) in their place, and the
model ``--recipe auto`` wrote (candidates timed at b8 × 128). Median latency, interleaved, at
batch 8 of real tweets padded to 128 tokens and padded only to the batch's longest tweet; mean
cosine of pooled sentence embeddings vs PyTorch fp32 on real tweets.

``--avx2-sentences N`` (needs qemu-user): each int8 model's cosine on N tweets computed by ONNX
Runtime's AVX2 kernels, under ``qemu-x86_64 -cpu EPYC-Rome`` (an AVX2-only CPU without VNNI),
whatever CPU runs the benchmark: the error a user of that CPU gets. Emulated timings mean
nothing, so none are taken there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as b8  # bench/harness.py (the script's folder is on sys.path)

ORT_FP32, ORT_INT8 = "ORT optimizer fp32", "ORT int8 (optimizer + quantize_dynamic)"
FUSE, AUTO = "graphc fuse (fp32)", "graphc auto"
FORMS = ("u8s8", "u8u8", "u8s7", "u8s8p")
# the int8 recipe with its MatMul weights as 8-bit MatMulNBits instead (int8 activations inside
# the kernel, accuracy level 4): another formulation that cannot saturate
NBITS8 = "graphc 8-bit MatMulNBits (int8 recipe)"
NBITS8_OPTIONS = {"bits": 8, "block_size": 128, "symmetric": True, "method": "rtn", "accuracy_level": 4}
SETTINGS = (("b8", "b8 × 128 (padded)"), ("b8_longest", "b8 padded to longest"))
TARGET_RATIO, TARGET_COS = 0.7, 0.995
FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")

FULL = {"reps": 30, "warmup": 5, "sentences": 512}
QUICK = {"reps": 4, "warmup": 2, "sentences": 64}

EMULATED = r"""
import json, sys
import numpy as np
from graphc.checks import measure
from graphc.core import target
from graphc.models import get_model_spec
from graphc.models.minilm import embed
recipe = get_model_spec("minilm")
n, paths = int(sys.argv[1]), json.loads(sys.argv[2])
feeds = recipe.feeds(recipe.eval_texts(n), batch=8, max_length=128)
out = {"host": target.host().name, "models": {}}
for name, path in paths.items():
    out["models"][name] = measure.embeddings(measure.session(path, threads=2), feeds, pool=embed).tolist()
print(json.dumps(out))
"""


def cpu() -> dict[str, Any]:
    from graphc.core import target

    flags = target.cpu_flags()
    return {"name": target.cpu_name(), "target": target.host().name,
            "flags": [f for f in FLAGS if f in flags], "u8s8_saturates": target.u8s8_saturates_here()}


def build(fp32: Path, work: Path, rep) -> tuple[dict[str, Path], dict[str, Any]]:
    """graphc's models: fuse, int8 in each form exact here, and auto's winner."""
    import graphc
    from graphc.core import target
    from graphc.core.recipes import Step, get_recipe
    from dataclasses import replace

    here = target.host()
    paths, info = {}, {}
    with rep.status("graphc fuse"), b8.quiet():
        graphc.compress(fp32, work / "minilm-t-fuse.onnx", recipe="fuse", force=True, attribution=False)
    paths[FUSE] = work / "minilm-t-fuse.onnx"
    base = get_recipe("int8")
    for form in FORMS:
        if form not in {f.value for f in target.exact_forms(here)}:
            info[f"graphc int8 {form}"] = "not exact on this CPU: not built"
            continue
        steps = tuple(Step(s.pass_name, {**s.options, "form": form}) if s.pass_name == "quantize-int8" else s
                      for s in base.steps)
        path = work / f"minilm-t-int8-{form}.onnx"
        with rep.status(f"graphc int8 {form}"), b8.quiet():
            graphc.compress(fp32, path, recipe=replace(base, steps=steps, name=f"int8-{form}"), force=True,
                            attribution=False)
        paths[f"graphc int8 {form}"] = path
    steps = tuple(Step("quantize-nbits", NBITS8_OPTIONS) if s.pass_name == "quantize-int8" else s for s in base.steps)
    path = work / "minilm-t-int8-nbits8.onnx"
    with rep.status(NBITS8), b8.quiet():
        graphc.compress(fp32, path, recipe=replace(base, steps=steps, name="int8-nbits8"), force=True,
                        attribution=False)
    paths[NBITS8] = path
    with rep.status("graphc auto (compiles, validates and times its candidates)"), b8.quiet():
        t0 = time.perf_counter()
        result = graphc.compress(fp32, work / "minilm-t-auto.onnx", recipe="auto", shape_hint="8x128")
        info["auto_seconds"] = round(time.perf_counter() - t0, 1)
    paths[AUTO] = work / "minilm-t-auto.onnx"
    info["auto"] = result.auto
    return paths, info


def emulated_cosines(paths: dict[str, Path], n: int, ref, rep) -> dict[str, Any]:
    """Each int8 model's embeddings on ``n`` tweets from ORT's AVX2 kernels under qemu-user."""
    import numpy as np

    from graphc.checks import measure

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return {"error": "qemu-x86_64 not found (apt-get install qemu-user)"}
    chosen = {k: str(v) for k, v in paths.items() if "int8" in k}
    with tempfile.TemporaryDirectory() as tmp, rep.status(f"AVX2 (qemu EPYC-Rome): {len(chosen)} models × {n} tweets"):
        script = Path(tmp) / "emulated.py"
        script.write_text(EMULATED)
        proc = subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, str(script), str(n), json.dumps(chosen)],
                              capture_output=True, text=True, timeout=7200, cwd=str(b8.ROOT))
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"host": got["host"], "sentences": n,
            "models": {k: measure.cosine_stats(np.asarray(v), ref[:n]).to_dict() for k, v in got["models"].items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from graphc.checks import measure
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec
    from graphc.models.minilm import embed

    cfg = dict(QUICK if args.quick else FULL)
    rep = b8.Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec("minilm")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"cpu": cpu(), "config": {**cfg, "mode": "quick" if args.quick else "full",
                                                     "threads": args.threads, "seq": b8.SEQ}}
    with rep.status("fp32: graphc dynamo export"), b8.quiet():
        fp32_path, _ = cached_export("minilm", work, fresh=args.fresh)
    with rep.status("ORT: legacy export → optimize_model (fp32) → quantize_dynamic (int8)"):
        ort_int8 = b8.build_ort_int8(work, fresh=args.fresh)
    paths = {ORT_FP32: work / "minilm-ort-opt-fp32.onnx", ORT_INT8: ort_int8}
    graphc_paths, res["build"] = build(fp32_path, work, rep)
    paths.update(graphc_paths)

    torch_ref = b8.TorchReference(recipe, args.threads, work, fresh=args.fresh)
    texts = recipe.eval_texts(cfg["sentences"])
    feeds = recipe.feeds(texts, batch=32, max_length=b8.SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {cfg['sentences']} eval tweets") as cb:
        ref = torch_ref.embeddings(texts, feeds, embed, cb)
    texts8 = recipe.eval_texts(8)
    feed_b = {"b8": measure.pad_feed(recipe.feeds(texts8, batch=8, max_length=b8.SEQ)[0], b8.SEQ),
              "b8_longest": recipe.feeds(texts8, batch=8, max_length=b8.SEQ)[0]}
    res["config"]["real_tokens"] = {k: int(f["attention_mask"].sum()) for k, f in feed_b.items()}
    res["config"]["positions"] = {k: int(f["attention_mask"].size) for k, f in feed_b.items()}
    sessions = {k: measure.session(p, threads=args.threads) for k, p in paths.items()}
    latency = {}
    for key, label in SETTINGS:
        with rep.bar(f"latency {label}: {cfg['reps']} interleaved reps") as cb:
            latency[key] = measure.interleaved_latency(sessions, feed_b[key], reps=cfg["reps"], warmup=cfg["warmup"],
                                                       progress=cb)
    res["models"] = {}
    for name, sess in sessions.items():
        with rep.status(f"{name}: embeddings of {cfg['sentences']} eval tweets"):
            cos = measure.cosine_stats(measure.embeddings(sess, feeds, pool=embed), ref)
        res["models"][name] = {"path": str(paths[name]), "bytes": measure.files_bytes(paths[name]),
                               **{f"latency_{k}": latency[k][name].to_dict() for k, _ in SETTINGS},
                               "cosine_vs_torch": cos.to_dict()}
    if args.avx2_sentences:
        res["avx2_emulated"] = emulated_cosines(paths, args.avx2_sentences, ref, rep)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["models"]
    out = []
    for key, label in SETTINGS:
        best_ort = min(m[ORT_FP32][f"latency_{key}"]["median_ms"], m[ORT_INT8][f"latency_{key}"]["median_ms"])
        a = m[AUTO][f"latency_{key}"]["median_ms"]
        out.append({"target": f"auto {label} ≤ {TARGET_RATIO}× the faster ORT pipeline", "pass": a <= TARGET_RATIO * best_ort,
                    "measured": f"{a:.1f} vs {best_ort:.1f} ms ({a / best_ort:.3f}×)"})
    cos = m[AUTO]["cosine_vs_torch"]["mean"]
    out.append({"target": f"auto mean cosine ≥ {TARGET_COS}", "pass": cos >= TARGET_COS, "measured": f"{cos:.5f}"})
    fuse = m[FUSE]["latency_b8"]["median_ms"]
    for name in m:
        if name.startswith("graphc int8"):
            v = m[name]["latency_b8"]["median_ms"]
            chosen = res["build"]["auto"]["winner"].startswith("int8")
            out.append({"target": f"{name} not slower than fused fp32 (b8 × 128), or auto does not choose int8",
                        "pass": v <= fuse or not chosen, "measured": f"{v:.1f} vs {fuse:.1f} ms ({v / fuse:.3f}×)"})
    return out


def markdown(res: dict[str, Any]) -> str:
    c, cfg, m = res["cpu"], res["config"], res["models"]
    lines = [f"CPU: {c['name']} (target {c['target']}; flags {', '.join(c['flags'])}; u8×s8 saturates: "
             f"{c['u8s8_saturates']}). MiniLM, {cfg['threads']} threads, {cfg['mode']}: {cfg['reps']} interleaved reps, "
             f"cosine on {cfg['sentences']} eval tweets vs PyTorch fp32.", "",
             "| model | size (MB) | " + " | ".join(f"{label} (ms)" for _, label in SETTINGS) + " | mean cos | min cos |",
             "|---|---:|" + "---:|" * len(SETTINGS) + "---:|---:|"]
    for name, r in m.items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.2f} | "
                     + " | ".join(f"{r[f'latency_{k}']['median_ms']:.1f}" for k, _ in SETTINGS)
                     + f" | {r['cosine_vs_torch']['mean']:.5f} | {r['cosine_vs_torch']['min']:.4f} |")
    auto = res["build"]["auto"]
    lines += ["", f"auto chose **{auto['winner']}** ({res['build']['auto_seconds']} s); its candidates at b8 × 128:", "",
              "| candidate | status | latency (ms) | bytes | validation cosine |", "|---|---|---:|---:|---:|"]
    for cnd in auto["candidates"]:
        lat = f"{cnd['latency_ms']:.1f}" if cnd.get("latency_ms") is not None else "-"
        cos = f"{cnd['output_cosine']:.5f}" if cnd.get("output_cosine") is not None else "-"
        lines.append(f"| {cnd['candidate']} | {cnd['status']} | {lat} | {cnd['bytes'] or '-'} | {cos} |")
    if "avx2_emulated" in res:
        e = res["avx2_emulated"]
        if "error" in e:
            lines += ["", f"AVX2 (emulated): not measured: {e['error']}"]
        else:
            lines += ["", f"Computed by ORT's AVX2 kernels (qemu-user, -cpu EPYC-Rome; graphc saw target {e['host']}), "
                          f"{e['sentences']} tweets, cosine vs PyTorch fp32:", "", "| model | mean cos | min cos |",
                      "|---|---:|---:|"]
            for name, s in e["models"].items():
                lines.append(f"| {name} | {s['mean']:.5f} | {s['min']:.4f} |")
    lines += ["", "| target | result | measured |", "|---|---|---|"]
    for t in targets(res):
        lines.append(f"| {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['measured']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few reps, 64 sentences")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(b8.WORK), help="work folder (shared with bench_int8.py)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached exports and PyTorch embeddings")
    parser.add_argument("--avx2-sentences", type=int, default=0, metavar="N",
                        help="also each int8 model's cosine on N tweets on ORT's AVX2 kernels (qemu-user)")
    args = parser.parse_args(argv)
    res = run(args)
    res["targets"] = targets(res)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())

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
import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".graphc-cache" / "bench"
SEQ = 128
COSINE_TARGET = 0.995
ORT_PIPELINE = "legacy-eager-opset17/optimize_model-bert/quantize_dynamic-per_channel-QInt8 v1"

FP32, ORT_INT8, GRAPHC_INT8 = "fp32 (graphc export)", "ORT int8 (optimizer + quantize_dynamic)", "graphc int8"
MODELS = (FP32, ORT_INT8, GRAPHC_INT8)

FULL = {"reps_b1": 100, "reps_b8": 30, "warmup": 5, "sentences": 512, "probe_train": 4000, "probe_test": 2000}
QUICK = {"reps_b1": 10, "reps_b8": 4, "warmup": 2, "sentences": 64, "probe_train": 300, "probe_test": 200}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings, library loggers and stray prints of torch / ORT tools."""
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


class Reporter:
    """Progress on stderr with rich (tqdm-free); one bar per loop."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    def note(self, text: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}")

    @contextlib.contextmanager
    def bar(self, text: str) -> Iterator[Callable[[int, int], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        t0 = time.perf_counter()
        if not self.console.is_terminal:  # a log file: one line per loop, no bar redraws
            yield lambda done, total: None
            self.note(f"{text} ({time.perf_counter() - t0:.1f} s)")
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as prog:
            task = prog.add_task(text, total=None)
            yield lambda done, total: prog.update(task, completed=done, total=total)
        self.note(f"{text} ({time.perf_counter() - t0:.1f} s)")

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.console.status(text):
            yield
        self.note(f"{text} ({time.perf_counter() - t0:.1f} s)")


def _fingerprint(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- models


def build_ort_int8(work: Path, *, fresh: bool) -> Path:
    """ONNX Runtime's recommended int8 pipeline for a BERT encoder (cached)."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    from graphc.models.minilm import model_folder

    out = work / "minilm-ort-int8.onnx"
    stamp = work / "minilm-ort-int8.key"
    key = _fingerprint(ORT_PIPELINE, str(model_folder()))
    legacy = work / "minilm-legacy-fp32.onnx"
    optimized = work / "minilm-ort-opt-fp32.onnx"  # kept: ORT's optimizer fp32 is a reference too
    if not fresh and out.is_file() and optimized.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return out
    stamp.unlink(missing_ok=True)

    class Encoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with quiet(), torch.no_grad():
        hf = AutoModel.from_pretrained(str(model_folder()), attn_implementation="eager", dtype=torch.float32).eval()
        example = {"input_ids": torch.randint(1000, 2000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long),
                   "token_type_ids": torch.zeros(2, 16, dtype=torch.long)}
        torch.onnx.export(Encoder(hf).eval(), (), str(legacy), kwargs=example, dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          do_constant_folding=True)
        opt = optimize_model(str(legacy), model_type="bert", num_heads=12, hidden_size=384)
        fused = opt.get_fused_operator_statistics()
        opt.save_model_to_file(str(optimized))
        quantize_dynamic(str(optimized), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    (work / "minilm-ort-fusions.json").write_text(json.dumps(fused, indent=1))
    legacy.unlink(missing_ok=True)
    stamp.write_text(key + "\n")
    return out


def build_graphc_int8(fp32: Path, work: Path) -> tuple[Path, Any]:
    import graphc

    out = work / "minilm-graphc-int8.onnx"
    with quiet():
        result = graphc.compress(fp32, out, recipe="int8", force=True)
    return out, result


# --------------------------------------------------------------------------- measurement


class TorchReference:
    """PyTorch fp32 sentence embeddings, cached in the work folder by texts and versions
    (the reference does not change while graphc does; it is the slowest part of a run)."""

    def __init__(self, recipe: Any, threads: int, work: Path, *, fresh: bool) -> None:
        self.recipe, self.threads, self.work, self.fresh = recipe, threads, work, fresh
        self.module = None

    def _run(self, feed: dict) -> Any:
        if self.module is None:
            import torch

            torch.set_num_threads(self.threads)
            with quiet():
                self.module = self.recipe.load_torch()
        return self.recipe.torch_outputs([feed], self.module)[0]

    def embeddings(self, texts: list[str], feeds: list[dict], pool: Callable, progress: Callable | None) -> Any:
        import numpy as np

        from graphc import measure
        from graphc.models.minilm import model_folder

        key = _fingerprint("torch-embeddings v1", str(model_folder()), json.dumps([len(f["input_ids"]) for f in feeds]),
                           *texts)
        path = self.work / f"torch-emb-{key}.npy"
        if not self.fresh and path.is_file():
            return np.load(path)
        emb = measure.embeddings(self._run, feeds, pool=pool, progress=progress)
        np.save(path, emb)
        return emb


def run(args: argparse.Namespace) -> dict[str, Any]:
    from graphc import measure
    from graphc.demo import cached_export, length_sorted
    from graphc.models import data, get_model_recipe
    from graphc.models.minilm import SentimentProbe, embed

    cfg = dict(QUICK if args.quick else FULL)
    rep = Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_recipe("minilm")
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

    # --- latency (real tweets, padded to SEQ)
    latency: dict[str, dict[str, measure.Latency]] = {}
    texts8 = recipe.eval_texts(8)
    for batch, reps in ((1, cfg["reps_b1"]), (8, cfg["reps_b8"])):
        feed = measure.pad_feed(recipe.feeds(texts8[:batch], batch=batch, max_length=SEQ)[0], SEQ)
        with rep.bar(f"latency b{batch}×{SEQ}: {reps} interleaved reps, {cfg['warmup']} warm-up") as cb:
            latency[f"b{batch}"] = measure.interleaved_latency(sessions, feed, reps=reps, warmup=cfg["warmup"],
                                                               progress=cb)

    # --- cosine of pooled embeddings vs PyTorch fp32 (eval split, batches of 32, padded to longest)
    torch_ref = TorchReference(recipe, args.threads, work, fresh=args.fresh)
    eval_texts = recipe.eval_texts(cfg["sentences"])
    feeds = recipe.feeds(eval_texts, batch=32, max_length=SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {cfg['sentences']} eval tweets") as cb:
        ref = torch_ref.embeddings(eval_texts, feeds, embed, cb)
    cosine = {}
    for name, sess in sessions.items():
        with rep.bar(f"{name}: embeddings of {cfg['sentences']} eval tweets") as cb:
            cosine[name] = measure.cosine_stats(measure.embeddings(sess, feeds, pool=embed, progress=cb), ref)

    # --- sentiment probe trained on PyTorch fp32 embeddings
    train_texts, train_y = data.tweets("probe_train")
    test_texts, test_y = data.tweets("probe_test")
    train_texts, train_y = length_sorted(recipe, train_texts[: cfg["probe_train"]], train_y[: cfg["probe_train"]])
    test_texts, test_y = length_sorted(recipe, test_texts[: cfg["probe_test"]], test_y[: cfg["probe_test"]])
    train_feeds = recipe.feeds(train_texts, batch=32, max_length=SEQ)
    test_feeds = recipe.feeds(test_texts, batch=32, max_length=SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {len(train_texts)} probe_train tweets") as cb:
        probe = SentimentProbe().fit(torch_ref.embeddings(train_texts, train_feeds, embed, cb), train_y)
    accuracy = {}
    with rep.bar(f"PyTorch fp32 embeddings of {len(test_texts)} probe_test tweets") as cb:
        accuracy["PyTorch fp32"] = measure.probe_accuracy(
            probe, torch_ref.embeddings(test_texts, test_feeds, embed, cb), test_y)
    for name, sess in sessions.items():
        with rep.bar(f"{name}: embeddings of {len(test_texts)} probe_test tweets") as cb:
            accuracy[name] = measure.probe_accuracy(
                probe, measure.embeddings(sess, test_feeds, pool=embed, progress=cb), test_y)

    fusions_file = work / "minilm-ort-fusions.json"
    return {
        "config": {**cfg, "mode": "quick" if args.quick else "full", "threads": args.threads, "seq": SEQ},
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "onnxruntime": importlib.metadata.version("onnxruntime"),
            "torch": importlib.metadata.version("torch"),
            "transformers": importlib.metadata.version("transformers"),
        },
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
            "train": len(train_texts), "test": len(test_texts), "torch_fp32_accuracy": accuracy["PyTorch fp32"],
            "majority_accuracy": measure.majority_accuracy(test_y),
        },
        "ort_fusions": json.loads(fusions_file.read_text()) if fusions_file.is_file() else None,
        "graphc_compress": {
            "validation_passed": result.validation.passed if result.validation else None,
            "validation": result.validation.to_dict() if result.validation else None,
            "passes": [p.name for p in result.passes if p.modified],
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _cpu_name() -> str:
    """The CPU's model name, graphc's target for it and the flags that matter for int8."""
    from graphc.target import cpu_line

    return cpu_line().removeprefix("CPU: ")


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

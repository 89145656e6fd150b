"""What the benchmarks share: work folder, quiet library output, progress on stderr, cache keys,
the CPU's name, the cached model builds two benches use (ONNX Runtime's int8 pipeline, graphc's
fused fp32 MiniLM), the PyTorch reference embeddings, and the MiniLM measurements every MiniLM
bench makes: latency at b1/b8 × 128, pooled-embedding cosine vs PyTorch fp32 on eval tweets,
and a sentiment probe's accuracy.

The benchmarks are scripts (``python bench/bench_int8.py``); Python puts their folder first on
``sys.path``, so they import this module and each other by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".graphc-cache" / "bench"
SEQ = 128
ORT_PIPELINE = "legacy-eager-opset17/optimize_model-bert/quantize_dynamic-per_channel-QInt8 v1"
FUSED_PIPELINE = "graphc cleanup+fuse-ort(mha)+trim-outputs v1"

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


def print_json(res: Any, path: str | None) -> None:
    """``res`` as indented JSON on stdout, and into ``path`` when one is given."""
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def fingerprint(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return h.hexdigest()[:16]


def cpu_name() -> str:
    """The CPU's model name, graphc's target for it and the flags that matter for int8."""
    from graphc.core.target import cpu_line

    return cpu_line().removeprefix("CPU: ")


def environment() -> dict[str, str]:
    """Where a run happened: Python, machine, CPU and the library versions that move results."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
    }


# --------------------------------------------------------------------------- cached models


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
    key = fingerprint(ORT_PIPELINE, str(model_folder()))
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


def build_fused(fp32: Path, work: Path, *, fresh: bool) -> Path:
    """graphc's fp32 graph after cleanup, fuse-ort and trim-outputs (cached): what both
    graphc's int4 and (here) ORT's 4-bit quantizers quantize."""
    import graphc
    from graphc.core.recipes import BUILTIN

    out = work / "minilm-fused-fp32.onnx"
    stamp = work / "minilm-fused-fp32.key"
    export_key = fp32.with_suffix(".key")
    sources = [(ROOT / "passes" / f"{p}.py").read_text() for p in ("cleanup", "fuse_ort", "trim_outputs")]
    key = fingerprint(FUSED_PIPELINE, export_key.read_text() if export_key.is_file() else str(fp32.stat()),
                       *sources)
    if not fresh and out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return out
    steps = [s for s in BUILTIN["int4"].steps if not s.pass_name.startswith("quantize") and s.pass_name != "fp16-constants"]
    recipe = replace(BUILTIN["int4"], name="fused-fp32", steps=tuple(steps))
    with quiet():
        graphc.compress(fp32, out, recipe=recipe, force=True, validate=False, attribution=False)
    stamp.write_text(key + "\n")
    return out


# --------------------------------------------------------------------------- MiniLM measurements


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

        from graphc.checks import measure
        from graphc.models.minilm import model_folder

        key = fingerprint("torch-embeddings v1", str(model_folder()), json.dumps([len(f["input_ids"]) for f in feeds]),
                           *texts)
        path = self.work / f"torch-emb-{key}.npy"
        if not self.fresh and path.is_file():
            return np.load(path)
        emb = measure.embeddings(self._run, feeds, pool=pool, progress=progress)
        np.save(path, emb)
        return emb


def latency_b1_b8(sessions: dict, recipe: Any, cfg: dict, rep: Reporter) -> dict[str, dict[str, Any]]:
    """Median latency of each session at batch 1 and 8 × SEQ tokens (real tweets padded to SEQ),
    the sessions interleaved run by run: ``{"b1": {name: Latency}, "b8": {...}}``."""
    from graphc.checks import measure

    latency: dict[str, dict[str, Any]] = {}
    texts8 = recipe.eval_texts(8)
    for batch, reps in ((1, cfg["reps_b1"]), (8, cfg["reps_b8"])):
        feed = measure.pad_feed(recipe.feeds(texts8[:batch], batch=batch, max_length=SEQ)[0], SEQ)
        with rep.bar(f"latency b{batch}×{SEQ}: {reps} interleaved reps, {cfg['warmup']} warm-up") as cb:
            latency[f"b{batch}"] = measure.interleaved_latency(sessions, feed, reps=reps, warmup=cfg["warmup"],
                                                               progress=cb)
    return latency


def cosine_vs_torch(sessions: dict, recipe: Any, torch_ref: TorchReference, cfg: dict, rep: Reporter) -> dict[str, Any]:
    """Mean/min cosine of each session's pooled sentence embeddings vs PyTorch fp32 on
    ``cfg["sentences"]`` eval tweets (batches of 32, padded to the longest)."""
    from graphc.checks import measure
    from graphc.models.minilm import embed

    eval_texts = recipe.eval_texts(cfg["sentences"])
    feeds = recipe.feeds(eval_texts, batch=32, max_length=SEQ)
    with rep.bar(f"PyTorch fp32 embeddings of {cfg['sentences']} eval tweets") as cb:
        ref = torch_ref.embeddings(eval_texts, feeds, embed, cb)
    cosine = {}
    for name, sess in sessions.items():
        with rep.bar(f"{name}: embeddings of {cfg['sentences']} eval tweets") as cb:
            cosine[name] = measure.cosine_stats(measure.embeddings(sess, feeds, pool=embed, progress=cb), ref)
    return cosine


def probe_accuracies(sessions: dict, recipe: Any, torch_ref: TorchReference, cfg: dict,
                     rep: Reporter) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy of a sentiment probe (logistic regression) trained on PyTorch fp32 embeddings of
    ``cfg["probe_train"]`` tweets, on PyTorch fp32's and each session's embeddings of
    ``cfg["probe_test"]`` others; and the split (``train``/``test`` texts, ``test_y``)."""
    from graphc.checks import measure
    from graphc.front.demo import length_sorted
    from graphc.models import data
    from graphc.models.minilm import SentimentProbe, embed

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
    return accuracy, {"train": train_texts, "test": test_texts, "test_y": test_y}

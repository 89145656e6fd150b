"""graphc 4-bit recipes vs ONNX Runtime's 4-bit quantizers on SmolLM2-135M, judged by perplexity.

    python bench/bench_smollm2_int4.py [--windows 16] [--reps 3] [--json OUT] [--only NAME ...]

In one process, on CPU with ``--threads`` intra-op threads (default 2):

1. fp32: graphc's dynamo export (cached in ``.graphc-cache/bench/``), and PyTorch fp32 through
   the same windows (cached);
2. ORT int4 RTN, the size reference: ``MatMulNBitsQuantizer`` with
   ``DefaultWeightOnlyQuantConfig`` (round to nearest, 4-bit, block 128, symmetric,
   ``op_types_to_quantize=("MatMul", "Gather")``, accuracy_level 4), applied to graphc's fused
   fp32 graph (cleanup → fuse-ort → trim-outputs: what graphc's recipes quantize) in which the
   tied LM head is a plain initializer (the quantizer only takes constant weights), so ORT
   stores the embedding table and the head as two 4-bit copies;
3. ORT int4 HQQ: the same with ``HQQWeightOnlyQuantConfig`` (block 128; MatMul only: ORT's
   HQQ refuses Gather), the embedding table left fp32; ORT int4 GPTQ: ``GPTQWeightOnlyQuantConfig``
   (ORT's vendored Intel Neural Compressor GPTQ, block 128, symmetric, act order, MatMul only) on
   the first ``ORT_GPTQ_FEEDS`` of graphc's calibration batches (it holds every MatMul input of
   every batch in memory, so fewer than graphc's);
4. graphc variants (``VARIANTS``): the ``int4`` recipe and variants of it (quantizer, block,
   head/embedding precision), each built with ``graphc.compress`` on the fp32 export.

Reports bytes on disk, perplexity over ``--windows`` fixed windows of 512 tokens of the
Wikipedia eval split (``SmolLM2Spec.perplexity_feeds``; disjoint from the calibration
split GPTQ uses), its rise vs ONNX Runtime fp32 and vs PyTorch fp32, and median latency at
batch 1 × 512 tokens (models interleaved; few reps: the machine is shared and noisy).

Caution (ASSETS.md): SmolLM2's weights come from a Q4_1 GGUF, so every aligned block of 32
weights already lies on a 16-level asymmetric grid: asymmetric block-32 quantization
reproduces them almost exactly. Such variants are flagged ``q4_1-aligned`` in the table.
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

from harness import ROOT, WORK, Reporter, cpu_name, fingerprint, quiet

SEQ = 512
PPL_TARGET = 0.05  # perplexity within 5% of fp32
FUSED_PIPELINE = "graphc cleanup+fuse-ort(mha)+trim-outputs, head as initializer v2"

# what a graphc variant's bytes depend on (besides the recipe and the export)
GRAPHC_SOURCES = ("cleanup", "fuse_ort", "trim_outputs", "quantize_nbits", "quantize_gather_block", "_blockquant",
                  "../graphc/core/calibrate", "../graphc/core/moments",
                  "_quant", "fp16_constants", "mixed_precision", "_sensitivity", "_plan/precision", "awq_scale",
                  "split_vocab", "compact_scales")

FP32 = "fp32 (graphc export)"
ORT_RTN = "ORT int4 RTN b128 sym (MatMul+Gather)"
ORT_HQQ = "ORT int4 HQQ b128 (MatMul only)"
ORT_GPTQ = "ORT int4 GPTQ b128 sym (MatMul only)"
ORT_GPTQ_FEEDS = 8  # its calibration batches (4 x 128 tokens each): ORT keeps every MatMul input of every batch in RAM

# graphc variants: quantize-nbits options, quantize-gather-block options (None: recipe's),
# whether the weights' Q4_1 grid makes the variant look better than it is.
VARIANTS: dict[str, dict[str, Any]] = {
    # the built-in int4 recipe as a user runs it: on a causal LM, its decoder form (recipes/builtin/int4.toml)
    "graphc int4 (built-in)": {"builtin": "int4"},
    # its KL probes on the first 256 of each window's 512 tokens (half the probe time)
    "graphc int4 (built-in), 256-token probes": {"builtin": "int4", "sets": ["mixed-precision.probe_tokens=256"]},
    "graphc int4 (recipe)": {"nbits": None, "gather": None, "aligned": True},
    "graphc rtn b128 sym": {
        "nbits": {"bits": 4, "block_size": 128, "symmetric": True, "method": "rtn"},
        "gather": {"bits": 4, "block_size": 128, "symmetric": True, "method": "rtn"},
    },
    "graphc gptq b64 asym, head 8-bit": {
        "nbits": {"bits": 4, "block_size": 64, "symmetric": False, "method": "gptq", "act_order": True,
                  "head_bits": 8},
        "gather": {"bits": 8, "block_size": 64, "symmetric": False, "method": "mse"},
    },
    "graphc mse b64 asym, head 8-bit": {
        "nbits": {"bits": 4, "block_size": 64, "symmetric": False, "method": "mse", "head_bits": 8},
        "gather": {"bits": 8, "block_size": 64, "symmetric": False, "method": "mse"},
    },
    "graphc rtn b32 asym": {
        "nbits": {"bits": 4, "block_size": 32, "symmetric": False, "method": "rtn"},
        "gather": {"bits": 4, "block_size": 32, "symmetric": False, "method": "rtn"},
        "aligned": True,
    },
    "graphc recipes/smollm2-int4.toml": {"toml": "recipes/smollm2-int4.toml"},
    "graphc recipes/smollm2-int4.toml, mse": {"toml": "recipes/smollm2-int4.toml", "method": "mse"},
    # the planner's probes by mse instead of GPTQ (the recipe's before 2026-11-22)
    "graphc recipes/smollm2-int4.toml, mse probes": {"toml": "recipes/smollm2-int4.toml", "mp": {"method": "mse"}},
    # the recipe's sensitivities on 2 calibration batches instead of 1
    "graphc recipes/smollm2-int4.toml, 2 feeds": {"toml": "recipes/smollm2-int4.toml", "mp": {"feeds": 2}},
    # without the tied table's row tiers (the whole table one planned layer)
    "graphc recipes/smollm2-int4.toml, no split-vocab": {"toml": "recipes/smollm2-int4.toml", "drop": ["split-vocab"]},
    # calibration windows of 4 x 128 tokens (the model spec's before 2026-11-22) instead of 1 x 512
    "graphc recipes/smollm2-int4.toml, 128-token calibration": {"toml": "recipes/smollm2-int4.toml",
                                                               "calibration": (512, 32, 4, 128)},
    # ablations of the 2026-12-03 change (128 calibration windows of 512 tokens, damp 0.1): GPTQ's usual
    # damp 0.01, and the earlier 32 windows
    "graphc recipes/smollm2-int4.toml, damp 0.01": {"toml": "recipes/smollm2-int4.toml", "mp": {"damp": 0.01},
                                                    "nb": {"damp": 0.01}},
    "graphc recipes/smollm2-int4.toml, 32 calibration windows": {"toml": "recipes/smollm2-int4.toml",
                                                                 "calibration": (512, 32, 1, 512)},
    # 2-bit allowed in the plan (measured at 2 and 4 bits, 8 predicted), e.g. for rarely used vocabulary tiers
    "graphc recipes/smollm2-int4.toml, 2-bit allowed": {"toml": "recipes/smollm2-int4.toml",
                                                        "mp": {"bits": [2, 4, 8], "probe_bits": [2, 4]}},
    "graphc gptq b32 sym, head 8-bit": {
        "nbits": {"bits": 4, "block_size": 32, "symmetric": True, "method": "gptq", "act_order": True,
                  "head_bits": 8},
        "gather": {"bits": 8, "block_size": 32, "symmetric": True, "method": "mse"},
    },
    "graphc 8-bit b128 rtn": {
        "nbits": {"bits": 8, "block_size": 128, "symmetric": True, "method": "rtn"},
        "gather": {"bits": 8, "block_size": 128, "symmetric": True, "method": "rtn"},
    },
    "graphc 2-bit b32 gptq, head 8-bit": {
        "nbits": {"bits": 2, "block_size": 32, "symmetric": False, "method": "gptq", "act_order": True,
                  "head_bits": 8},
        "gather": {"bits": 8, "block_size": 32, "symmetric": False, "method": "mse"},
    },
}


# --------------------------------------------------------------------------- models


def cached_fp32(work: Path, *, fresh: bool) -> Path:
    """graphc's dynamo export of SmolLM2 (~2-5 min), reused while the exporter sources, the
    GGUF and the library versions are the same. (graphc.front.demo.cached_export also keys on every
    models/*.py, so any edit there would export again.)"""
    from graphc.exporters import export
    from graphc.models import smollm2

    out = work / "smollm2-export-fp32.onnx"
    stamp = work / "smollm2-export-fp32.key"
    sources = [p.read_text() for p in sorted((ROOT / "exporters").glob("*.py"))]
    key = fingerprint("smollm2 export v1", json.dumps(smollm2._source_stamp(smollm2.gguf_path())), *sources)
    if _key_ok(out, stamp, key, fresh):
        return out
    stamp.unlink(missing_ok=True)
    export(smollm2.SmolLM2Spec(), out)
    stamp.write_text(key + "\n")
    return out


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


REUSE = False  # --reuse-built: any earlier build counts, whatever the sources now


def _key_ok(out: Path, stamp: Path, key: str, fresh: bool) -> bool:
    if fresh or not out.is_file():
        return False
    return REUSE or (stamp.is_file() and stamp.read_text().strip() == key)


def build_fused(fp32: Path, work: Path, *, fresh: bool) -> Path:
    """graphc's fp32 graph after cleanup, fuse-ort and trim-outputs, the tied LM head's
    ``Transpose(table)`` folded to its own initializer (cached)."""
    import numpy as np
    import onnx_ir as ir

    import graphc
    from graphc.core import io
    from graphc.core.recipes import BUILTIN

    out = work / "smollm2-fused-fp32.onnx"
    stamp = work / "smollm2-fused-fp32.key"
    sources = [(ROOT / "passes" / f"{p}.py").read_text() for p in ("cleanup", "fuse_ort", "trim_outputs")]
    key = fingerprint(FUSED_PIPELINE, _read(fp32.with_suffix(".key")), *sources)
    if _key_ok(out, stamp, key, fresh):
        return out
    # the int4 recipe's graph steps up to its first weight change: no awq-scale (which would make
    # ORT's round-to-nearest better than on the export; it did in this bench until 2026-12-05), no
    # planning, no quantization; the encoder form's steps (no decoder form)
    steps = []
    for s in BUILTIN["int4"].steps:
        if s.pass_name in ("awq-scale", "split-vocab", "mixed-precision") or s.pass_name.startswith("quantize"):
            break
        steps.append(s)
    recipe = replace(BUILTIN["int4"], name="fused-fp32", steps=tuple(steps), decoder=None)
    with quiet():
        result = graphc.compress(fp32, recipe=recipe, force=True, validate=False, attribution=False)
    model = result.model
    for node in list(model.graph):
        if node.op_type == "Transpose" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            table = node.inputs[0].const_value.numpy()
            if table.ndim == 2:
                head = ir.Value(name=f"{node.inputs[0].name}.T", const_value=ir.tensor(np.ascontiguousarray(table.T)))
                model.graph.register_initializer(head)
                node.outputs[0].replace_all_uses_with(head)
                model.graph.remove(node, safe=True)
    io.save_model(model, out)
    stamp.write_text(key + "\n")
    return out


def build_ort_nbits(fused: Path, work: Path, algo: str, *, fresh: bool) -> Path:
    """ORT's MatMulNBitsQuantizer on the fused graph: RTN (MatMul+Gather) or HQQ (MatMul)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    out = work / f"smollm2-ort-int4-{algo}.onnx"
    stamp = work / f"smollm2-ort-int4-{algo}.key"
    extra = f" feeds {ORT_GPTQ_FEEDS}" if algo == "gptq" else ""
    key = fingerprint(f"ort-int4-{algo} block128 v1{extra}", _read(work / "smollm2-fused-fp32.key"))
    if _key_ok(out, stamp, key, fresh):
        return out
    if algo == "gptq":
        return build_ort_gptq(fused, out, stamp, key)
    if algo == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4,
                                              op_types_to_quantize=("MatMul", "Gather"),
                                              quant_axes=(("MatMul", 0), ("Gather", 1)), bits=4)
    else:
        config = HQQWeightOnlyQuantConfig(block_size=128, bits=4, op_types_to_quantize=("MatMul",))
    with quiet():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fused)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    stamp.write_text(key + "\n")
    return out


def build_ort_gptq(fused: Path, out: Path, stamp: Path, key: str) -> Path:
    """ORT's GPTQ (MatMul only, block 128, symmetric, act order) on graphc's calibration batches."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from graphc.models import get_model_spec

    recipe = get_model_spec("smollm2")
    texts = recipe.eval_texts(recipe.calibration_max_texts, split="calibration")
    feeds = recipe.feeds(texts, batch=recipe.validation_batch)[:ORT_GPTQ_FEEDS]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01, block_size=128,
                                       actorder=True, op_types_to_quantize=("MatMul",))
    with quiet():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fused)), block_size=128, is_symmetric=True, accuracy_level=4,
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    stamp.write_text(key + "\n")
    return out


def variant_recipe(name: str, spec: dict[str, Any]) -> Any:
    """The ``int4`` recipe (or the TOML recipe ``spec["toml"]``) with the variant's
    quantize-nbits / quantize-gather-block options; ``spec["method"]`` replaces the method of
    a TOML recipe's GPTQ quantize-nbits steps, ``spec["mp"]`` is merged into its mixed-precision
    options, ``spec["nb"]`` into its quantize-nbits options."""
    from graphc.core.recipes import BUILTIN, Step, get_recipe

    if spec.get("builtin"):
        from graphc.core.recipe_merge import apply_sets

        recipe = apply_sets(BUILTIN[spec["builtin"]], spec.get("sets", []))
        return replace(recipe, name=name) if spec.get("sets") else recipe
    if spec.get("toml"):
        base = get_recipe(ROOT / spec["toml"])
        steps = [Step(s.pass_name, {**s.options, "method": spec["method"]})
                 if spec.get("method") and s.pass_name == "quantize-nbits" and s.options.get("method") == "gptq" else s
                 for s in base.steps]
        merged = {"mixed-precision": spec.get("mp") or {}, "quantize-nbits": spec.get("nb") or {}}
        steps = [Step(s.pass_name, {**s.options, **merged.get(s.pass_name, {})}) for s in steps]
        steps = [s for s in steps if s.pass_name not in spec.get("drop", ())]
        return replace(base, name=name, steps=tuple(steps))
    steps = []
    for s in BUILTIN["int4"].steps:
        if s.pass_name == "quantize-nbits" and spec.get("nbits") is not None:
            s = Step(s.pass_name, dict(spec["nbits"]))
        elif s.pass_name == "quantize-gather-block" and spec.get("gather") is not None:
            s = Step(s.pass_name, dict(spec["gather"]))
        steps.append(s)
    # the encoder form's steps as written (no decoder form: these variants are explicit pipelines)
    return replace(BUILTIN["int4"], name=name, steps=tuple(steps), decoder=None)


def build_graphc(fp32: Path, work: Path, name: str, spec: dict[str, Any], *, fresh: bool) -> tuple[Path, dict]:
    """A graphc variant (cached while the recipe, the pass sources and the export are the same)."""
    import graphc
    from graphc.models import get_model_spec

    recipe = variant_recipe(name, spec)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    out = work / f"smollm2-{slug}.onnx"
    stamp = work / f"smollm2-{slug}.key"
    info = work / f"smollm2-{slug}.json"
    sources = [f.read_text() for p in GRAPHC_SOURCES if (f := ROOT / "passes" / f"{p}.py").is_file()]
    model_recipe = get_model_spec("smollm2")
    caps = (model_recipe.calibration_max_texts, model_recipe.calibration_max_feeds,
            model_recipe.calibration_batch, model_recipe.calibration_length)
    key = fingerprint(json.dumps(recipe.to_dict(), sort_keys=True), str(spec.get("calibration") or caps),
                       _read(fp32.with_suffix(".key")), *sources)
    if info.is_file() and _key_ok(out, stamp, key, fresh):
        return out, json.loads(info.read_text())
    t0 = time.perf_counter()
    if spec.get("calibration"):  # (texts, feeds, batch, length): other calibration feeds
        (model_recipe.calibration_max_texts, model_recipe.calibration_max_feeds,
         model_recipe.calibration_batch, model_recipe.calibration_length) = spec["calibration"]
    try:
        with quiet():
            result = graphc.compress(fp32, out, recipe=recipe, force=True, validate=False, attribution=False)
    finally:
        (model_recipe.calibration_max_texts, model_recipe.calibration_max_feeds,
         model_recipe.calibration_batch, model_recipe.calibration_length) = caps
    facts = {
        "seconds": round(time.perf_counter() - t0, 1),
        "recipe": recipe.to_dict()["passes"],
        "stats": {r.name: {**r.stats, "wall_s": round(r.wall_s, 1)} for r in result.passes
                  if r.name.startswith("quantize") or r.name == "mixed-precision"},
    }
    info.write_text(json.dumps(facts, indent=1, default=str) + "\n")
    stamp.write_text(key + "\n")
    return out, facts


# --------------------------------------------------------------------------- measurement


def torch_perplexity(recipe: Any, feeds: list, work: Path, threads: int, *, fresh: bool) -> dict:
    """PyTorch fp32 perplexity through the same windows (cached by windows and versions)."""
    import hashlib

    import numpy as np
    import torch

    from graphc.checks import measure
    from graphc.models import smollm2

    h = hashlib.sha256(b"".join(np.ascontiguousarray(f["input_ids"]).tobytes() for f in feeds)).hexdigest()[:12]
    cache = work / f"smollm2-torch-ppl-{fingerprint(h, str(smollm2.converted_folder()))}.json"
    if not fresh and cache.is_file():
        return json.loads(cache.read_text())
    torch.set_num_threads(threads)
    module = recipe.load_torch()
    ppl = measure.perplexity(lambda f: recipe.torch_outputs([f], module)[0], feeds).to_dict()
    cache.write_text(json.dumps(ppl) + "\n")
    return ppl


def perplexity_and_latency(rep: Any, paths: dict[str, Path], feeds: list, threads: int,
                           reps: int) -> tuple[dict[str, dict], dict[str, Any]]:
    """Each model's ORT perplexity over the feeds, and its latency on the first feed (``reps``
    interleaved repetitions after one warm-up; none when 0)."""
    from graphc.checks import measure

    ppl = {}
    for name, path in paths.items():
        with rep.bar(f"{name}: perplexity, {len(feeds)} windows × {SEQ}") as cb:
            ppl[name] = ort_perplexity(path, feeds, threads, cb)
    latency: dict[str, Any] = {}
    if reps > 0:
        sessions = {k: measure.session(p, threads=threads) for k, p in paths.items()}
        with rep.bar(f"latency b1×{SEQ}: {reps} interleaved reps, 1 warm-up") as cb:
            latency = measure.interleaved_latency(sessions, feeds[0], reps=reps, warmup=1, progress=cb)
        del sessions
    return ppl, latency


def ort_perplexity(path: Path, feeds: list, threads: int, progress: Any = None) -> dict:
    """ORT perplexity of one model (cached beside the model, keyed by its bytes and the windows)."""
    import hashlib

    import numpy as np

    from graphc.checks import measure

    h = hashlib.sha256(b"".join(np.ascontiguousarray(f["input_ids"]).tobytes() for f in feeds)).hexdigest()[:12]
    st = path.stat()
    key = f"{h}:{st.st_size}:{st.st_mtime_ns}"
    cache = path.with_suffix(".ppl.json")
    if cache.is_file():
        got = json.loads(cache.read_text())
        if got.get("key") == key:
            return got["ppl"]
    ppl = measure.perplexity(measure.session(path, threads=threads), feeds, progress=progress).to_dict()
    cache.write_text(json.dumps({"key": key, "ppl": ppl}) + "\n")
    return ppl


def run(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata
    import platform

    from graphc.checks import measure
    from graphc.models import get_model_spec

    global REUSE
    REUSE = args.reuse_built
    rep = Reporter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = get_model_spec("smollm2")
    t_start = time.perf_counter()
    want = set(args.only or [])

    def wanted(name: str) -> bool:
        return not want or name in want or name == FP32

    with rep.status("fp32: graphc dynamo export (cached)"), quiet():
        fp32_path = cached_fp32(work, fresh=args.fresh)
    paths: dict[str, Path] = {FP32: fp32_path}
    errors: dict[str, str] = {}
    built: dict[str, dict] = {}
    if wanted(ORT_RTN) or wanted(ORT_HQQ) or wanted(ORT_GPTQ):
        with rep.status("fused fp32 graph (cleanup → fuse-ort → trim-outputs; head as an initializer)"):
            fused = build_fused(fp32_path, work, fresh=args.fresh)
        for name, algo in ((ORT_RTN, "rtn"), (ORT_HQQ, "hqq"), (ORT_GPTQ, "gptq")):
            if not wanted(name):
                continue
            with rep.status(name):
                try:
                    paths[name] = build_ort_nbits(fused, work, algo, fresh=args.fresh)
                except Exception as e:  # noqa: BLE001 - report a peer tool's failure, measure the rest
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    rep.note(f"[red]{name} failed[/]: {errors[name]}")
    for name, spec in VARIANTS.items():
        if not wanted(name):
            continue
        with rep.status(f"{name}: graphc.compress"):
            paths[name], built[name] = build_graphc(fp32_path, work, name, spec, fresh=args.fresh)
    for name, path in args.file:
        paths[name] = Path(path)
    sizes = {k: measure.files_bytes(p) for k, p in paths.items()}

    feeds = recipe.perplexity_feeds(args.windows, seq=SEQ)
    with rep.status(f"PyTorch fp32 perplexity, {args.windows} windows × {SEQ}"):
        torch_ppl = torch_perplexity(recipe, feeds, work, args.threads, fresh=args.fresh)
    ppl, latency = perplexity_and_latency(rep, paths, feeds, args.threads, args.reps)

    ref = ppl[FP32]["perplexity"]
    return {
        "config": {"windows": args.windows, "seq": SEQ, "tokens": ppl[FP32]["tokens"], "threads": args.threads,
                   "reps": args.reps, "text": "Wikipedia eval split (gensim test data), windows from its start"},
        "environment": {
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
            "onnxruntime": importlib.metadata.version("onnxruntime"),
            "torch": importlib.metadata.version("torch"),
        },
        "torch_fp32": torch_ppl,
        "models": {
            name: {
                "path": str(paths[name]),
                "bytes": sizes[name],
                "perplexity": ppl[name],
                "rise_vs_ort_fp32": measure.relative_rise(ppl[name]["perplexity"], ref),
                "rise_vs_torch_fp32": measure.relative_rise(ppl[name]["perplexity"], torch_ppl["perplexity"]),
                "latency_b1": latency[name].to_dict() if name in latency else None,
                "q4_1_aligned": bool(VARIANTS.get(name, {}).get("aligned")),
                **({"graphc": built[name]} if name in built else {}),
            }
            for name in paths
        },
        "failed": errors,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    m, cfg, env = res["models"], res["config"], res["environment"]
    budget = m.get(ORT_RTN, {}).get("bytes")
    t = res["torch_fp32"]
    lines = [
        f"SmolLM2-135M, ONNX Runtime {env['onnxruntime']} CPU, {cfg['threads']} threads; perplexity over "
        f"{cfg['windows']} windows × {cfg['seq']} tokens ({cfg['tokens']} predicted) of the Wikipedia eval split; "
        f"PyTorch fp32 {t['perplexity']:.3f}; latency b1×{cfg['seq']}, {cfg['reps']} interleaved reps (noisy machine)",
        "",
        "| model | size (MB) | vs ORT RTN bytes | perplexity | rise vs fp32 | b1×512 median (ms) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in m.items():
        lat = r["latency_b1"]["median_ms"] if r["latency_b1"] else float("nan")
        note = "Q4_1-aligned: looks lossless (ASSETS.md)" if r["q4_1_aligned"] else ""
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / budget:.3f}× | {r['perplexity']['perplexity']:.3f} "
            f"| {r['rise_vs_ort_fp32']:+.2%} | {lat:.0f} | {note} |" if budget else
            f"| {name} | {r['bytes'] / 1e6:.2f} | - | {r['perplexity']['perplexity']:.3f} "
            f"| {r['rise_vs_ort_fp32']:+.2%} | {lat:.0f} | {note} |"
        )
    for name, why in res["failed"].items():
        lines.append(f"\n{name}: not measured, the quantizer failed: {why}")
    if budget:
        lines += ["", f"Target: bytes ≤ {ORT_RTN} ({budget:,} B) and perplexity within {PPL_TARGET:.0%} of fp32:", ""]
        for name, r in m.items():
            if name in VARIANTS:
                ok = r["bytes"] <= budget and r["rise_vs_ort_fp32"] <= PPL_TARGET
                lines.append(f"- {name}: {'PASS' if ok else 'MISS'} ({r['bytes']:,} B, {r['rise_vs_ort_fp32']:+.2%})"
                             + (" — Q4_1-aligned, not a fair test" if r["q4_1_aligned"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens (default 16)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved latency reps at b1×512 (0: none)")
    parser.add_argument("--only", nargs="*", help="measure only these models (fp32 always)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--work", default=str(WORK), help=f"work folder (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--fresh", action="store_true", help="rebuild cached exports, models and references")
    parser.add_argument("--file", nargs=2, action="append", default=[], metavar=("NAME", "PATH"),
                        help="also measure this model file (e.g. the output of a `graphc compress` run)")
    parser.add_argument("--reuse-built", action="store_true",
                        help="reuse every cached export and build even if the sources changed since "
                             "(the repository changes under a long session)")
    args = parser.parse_args(argv)
    res = run(args)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

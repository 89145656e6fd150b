"""Decode speed of SmolLM2-135M with a KV cache: fp32, fused fp32, graphc int4, ORT int4.

    python bench/bench_decode.py [--context 512] [--tokens 32] [--threads 2] [--json OUT]

In one process: exports SmolLM2 with its KV cache (``graphc export smollm2 --kv-cache``,
cached in ``.graphc-cache/bench/``), fuses it with graphc's ``fuse`` recipe (attention into
GroupQueryAttention over the cache, RMSNorm, rotary), compresses it with graphc's ``int4``
recipe (uniform: without its mixed-precision step; its fuse-ort step makes the same
GroupQueryAttention), once more with attention left unfused (``fuse-ort`` with
``attention = "none"``: the graph before KV-cache attention fusion existed), and with ONNX
Runtime's ``MatMulNBitsQuantizer`` (RTN, 4-bit, block 128, symmetric, MatMul and Gather),
then for each model prefills a ``--context``-token prompt of real Wikipedia text at batch 1
and decodes ``--tokens`` tokens greedily (graphc.front.generate), interleaving the models over 3
rounds and keeping each one's median decode rate. Also reports the bytes a decode step must
read (every weight once, plus the KV cache at that context) against this machine's memory
bandwidth measured with a large numpy copy: the rate that bandwidth allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".graphc-cache" / "bench"


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a large array copy (read + write), best of ``repeats``."""
    import numpy as np

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def kv_export(fresh: bool) -> Path:
    from graphc.exporters.decoder import export_decoder

    path = WORK / "smollm2-kv.onnx"
    if fresh or not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        print("exporting SmolLM2 with its KV cache ...", file=sys.stderr, flush=True)
        from graphc.models import get_model_spec

        export_decoder(get_model_spec("smollm2"), path)
    return path


def graphc_fused(fp32: Path, fresh: bool) -> Path:
    import graphc

    out = WORK / "smollm2-kv-fused.onnx"
    if fresh or not out.exists():
        print("graphc fuse ...", file=sys.stderr, flush=True)
        # force: on SmolLM2's logits (|max| ~ 40) the recipe's max abs 1e-4 is missed by float
        # reordering alone, 1.1e-4 with attention unfused, 1.3e-4 with GQA (rel 3e-6; cosine 1.0)
        result = graphc.compress(fp32, out, recipe="fuse", force=True, attribution=False)
        print(f"  fuse validation: max abs {result.validation.max_abs:.3g}, cosine {result.validation.output_cosine:.6f}",
              file=sys.stderr, flush=True)
    return out


def graphc_int4(fp32: Path, fresh: bool, *, attention: str | None = None) -> Path:
    """``attention``: override fuse-ort's attention target ("none": attention unfused)."""
    import graphc
    from graphc.core.recipes import recipe_from_dict

    out = WORK / f"smollm2-kv-graphc-int4{'-attention-' + attention if attention else '-gqa'}.onnx"
    if fresh or not out.exists():
        print(f"graphc int4 (attention {attention or 'fused'}) ...", file=sys.stderr, flush=True)
        # the int4 recipe's weights, without its per-layer sensitivity search (minutes on 210
        # MatMuls): decode speed depends on the kernels and bytes, which this keeps
        fuse = [{"name": "fuse-ort", "options": {"attention": attention}}] if attention else []
        recipe = recipe_from_dict({"name": "int4-uniform", "extends": "int4", "disable": ["mixed-precision"],
                                   "passes": fuse})
        graphc.compress(fp32, out, recipe=recipe, force=True, attribution=False)
    return out


def ort_int4(fp32: Path, fresh: bool) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out = WORK / "smollm2-kv-ort-int4.onnx"
    if fresh or not out.exists():
        print("ORT int4 (RTN, block 128) ...", file=sys.stderr, flush=True)
        config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4,
                                              op_types_to_quantize=("MatMul", "Gather"),
                                              quant_axes=(("MatMul", 0), ("Gather", 1)), bits=4)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from graphc.front.generate import Decoder
    from graphc.models import get_model_spec
    from graphc.checks.validate import make_session

    recipe = get_model_spec("smollm2")
    tokenizer = recipe.tokenizer()
    text = " ".join(recipe.eval_texts(40))
    prompt = tokenizer(text, return_tensors="np")["input_ids"][:, : args.context]
    if prompt.shape[1] < args.context:
        raise SystemExit(f"only {prompt.shape[1]} tokens of evaluation text")
    fp32 = kv_export(args.fresh)
    models = {"fp32": fp32, "fp32 fused": graphc_fused(fp32, args.fresh),
              "graphc int4 unfused attn": graphc_int4(fp32, args.fresh, attention="none"),
              "graphc int4": graphc_int4(fp32, args.fresh), "ORT int4 RTN b128": ort_int4(fp32, args.fresh)}
    decoders = {k: Decoder(p, session=make_session(p, threads=args.threads)) for k, p in models.items()}
    facts = {p.key: p.value for p in __import__("onnx").load(str(fp32), load_external_data=False).metadata_props}
    layers, kv_heads = int(facts["graphc.arch.num_layers"]), int(facts["graphc.arch.num_kv_heads"])
    head_dim = int(facts["graphc.arch.head_dim"])
    rates: dict[str, list[float]] = {k: [] for k in models}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, decoder in decoders.items():
            g = decoder.greedy(prompt, args.tokens)
            rates[name].append(g.decode_tokens_per_s)
            tokens[name] = g.tokens[0].tolist()
    bandwidth = memory_bandwidth()
    rows = []
    for name, path in models.items():
        weights = files_bytes(path)
        kv_bytes = 2 * layers * kv_heads * head_dim * (args.context + args.tokens // 2) * 4
        per_token = weights + kv_bytes
        rows.append({
            "model": name, "bytes": weights, "decode_tokens_per_s": round(statistics.median(rates[name]), 2),
            "bytes_per_token": per_token, "bandwidth_bound_tokens_per_s": round(bandwidth / per_token, 1),
            "same_tokens_as_fp32": sum(a == b for a, b in zip(tokens[name], tokens["fp32"])),
        })
    from graphc.core.target import cpu_line

    print(cpu_line())
    print(f"memory bandwidth (numpy copy): {bandwidth / 1e9:.1f} GB/s; context {args.context}, "
          f"{args.tokens} tokens, {args.threads} threads, batch 1")
    print(f"{'model':24s} {'bytes':>10s} {'tok/s':>7s} {'bytes/token':>12s} {'bound tok/s':>11s} {'same tokens':>11s}")
    for r in rows:
        print(f"{r['model']:24s} {r['bytes'] / 1e6:9.1f}M {r['decode_tokens_per_s']:7.2f} "
              f"{r['bytes_per_token'] / 1e6:11.1f}M {r['bandwidth_bound_tokens_per_s']:11.1f} "
              f"{r['same_tokens_as_fp32']:>5d}/{args.tokens}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

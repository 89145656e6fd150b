"""graphc's built-in `int8` vs ONNX Runtime's int8 quantizers on SmolLM2-135M, judged by perplexity.

    python bench/bench_smollm2_int8.py [--windows 16] [--reps 5] [--json OUT]

In one process, on CPU with ``--threads`` intra-op threads (default 2), on graphc's dynamo
export of SmolLM2 (cached in ``.graphc-cache/bench/``):

- ORT `quantize_dynamic` as users call it (defaults: int8 weights per tensor, dynamic uint8
  activations per tensor; MatMulInteger / DynamicQuantizeMatMul), and the same per channel, on the
  fused fp32 graph (cleanup, fuse-ort, trim-outputs; the tied head as its own initializer);
- ORT's ``MatMulNBitsQuantizer`` at 8 bits (round to nearest, block 128, symmetric,
  accuracy level 4; MatMul only: its Gather quantization takes 4 bits only): ORT's own weight-only int8;
- graphc ``compress --recipe int8`` (its decoder form), timed.

Reports bytes, perplexity over ``--windows`` windows of 512 tokens of the Wikipedia eval split
(text calibration never reads) and median latency at batch 1 x 512 tokens, models interleaved.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_smollm2_int4 import SEQ, build_fused, cached_fp32, perplexity_and_latency
from harness import WORK, Reporter, cpu_name, print_json, quiet

FP32 = "fp32 (graphc export)"
ORT_DYN = "ORT quantize_dynamic (defaults: per tensor)"
ORT_DYN_PC = "ORT quantize_dynamic per channel"
ORT_NB8 = "ORT MatMulNBits 8-bit RTN b128 sym (MatMul only)"
GRAPHC = "graphc int8 (built-in)"


def build_ort(fused: Path, out: Path, kind: str) -> float:
    """One ORT int8 model from the fused graph; the seconds it took."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    t = time.perf_counter()
    with quiet():
        if kind == "nbits8":
            config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=8,
                                                  op_types_to_quantize=("MatMul",))
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fused)), algo_config=config)
            quantizer.process()
            quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        else:
            quantize_dynamic(str(fused), str(out), weight_type=QuantType.QInt8, per_channel=kind == "per-channel")
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata

    import graphc
    from graphc.checks import measure
    from graphc.models import get_model_spec

    rep = Reporter()
    work = Path(args.work)
    out = work / "int8"
    out.mkdir(parents=True, exist_ok=True)
    spec = get_model_spec("smollm2")
    with rep.status("fp32: graphc dynamo export (cached)"), quiet():
        fp32 = cached_fp32(work, fresh=False)
    with rep.status("fused fp32 graph (cached)"):
        fused = build_fused(fp32, work, fresh=False)
    paths: dict[str, Path] = {FP32: fp32}
    seconds: dict[str, float] = {}
    for name, kind in ((ORT_DYN, "per-tensor"), (ORT_DYN_PC, "per-channel"), (ORT_NB8, "nbits8")):
        with rep.status(name):
            paths[name] = out / f"ort-{kind}.onnx"
            seconds[name] = round(build_ort(fused, paths[name], kind), 1)
    with rep.status(f"{GRAPHC}: graphc.compress"):
        t = time.perf_counter()
        with quiet():
            result = graphc.compress(fp32, out / "graphc-int8.onnx", recipe="int8")
        seconds[GRAPHC] = round(time.perf_counter() - t, 1)
        paths[GRAPHC] = out / "graphc-int8.onnx"
        validation = result.validation.to_dict() if result.validation is not None else None

    feeds = spec.perplexity_feeds(args.windows, seq=SEQ)
    ppl, latency = perplexity_and_latency(rep, paths, feeds, args.threads, args.reps)
    ref = ppl[FP32]["perplexity"]
    return {
        "config": {"windows": args.windows, "seq": SEQ, "threads": args.threads, "reps": args.reps,
                   "text": "Wikipedia eval split (gensim test data), windows from its start"},
        "environment": {"python": platform.python_version(), "cpu": cpu_name(),
                        "onnxruntime": importlib.metadata.version("onnxruntime")},
        "graphc_validation": validation,
        "models": {
            name: {
                "bytes": measure.files_bytes(path),
                "perplexity": ppl[name]["perplexity"],
                "rise_vs_fp32": measure.relative_rise(ppl[name]["perplexity"], ref),
                "latency_b1_ms": latency[name].to_dict()["median_ms"] if name in latency else None,
                "build_s": seconds.get(name),
            }
            for name, path in paths.items()
        },
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["models"]
    lines = ["| model | MB | perplexity | rise vs fp32 | b1 x 512 (ms) | built in (s) |", "|---|--:|--:|--:|--:|--:|"]
    for name, r in m.items():
        lat = f"{r['latency_b1_ms']:.0f}" if r["latency_b1_ms"] is not None else "-"
        built = f"{r['build_s']:.0f}" if r["build_s"] is not None else "-"
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | {r['rise_vs_fp32']:+.2%} | {lat} "
                     f"| {built} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens (default 16)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved latency reps at b1x512 (0: none)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--work", default=str(WORK), help="work folder (default .graphc-cache/bench)")
    args = parser.parse_args(argv)
    res = run(args)
    print(markdown(res))
    print_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

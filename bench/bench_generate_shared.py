"""graphc.front.generate on a genai folder's shared-buffer model, against the same graph with
separate buffers and against onnxruntime-genai on the folder itself (SmolLM2-135M).

    HF_HUB_OFFLINE=1 python bench/bench_generate_shared.py [--prompt 512] [--new-tokens 128] [--reps 3] [--json OUT]

From bench_genai.py's fp32 genai export (built there if missing), one int4 graph (``fuse-ort``,
then round-to-nearest 4-bit weights in blocks of 64 and projections packed: a minute to build, not
the built-in recipe's plan) is written twice, cached under ``.graphc-cache/bench/generate-shared/``:
as a plain .onnx (GroupQueryAttention copies the past into a new present every call) and as a
genai folder (one buffer per cache, written in place). Then, folders interleaved ``--reps``
times, a ``--prompt``-token prompt of held-out Wikipedia text and ``--new-tokens`` greedy tokens
at batch 1, median decode tokens/s:

- ``graphc.front.generate``, separate buffers (how it ran every fused graph before);
- ``graphc.front.generate``, the genai folder's model (the caches bound as past and present
  through ONNX Runtime's I/O binding);
- onnxruntime-genai's ``og.Generator`` on the same folder;

with each one's share of the copy-bandwidth bound (bench_genai.py's measure), whether the tokens
agree, and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import harness as b8  # bench/harness.py (the script's folder is on sys.path)

WORK = b8.WORK / "generate-shared"
RECIPE = """name = "int4-rtn-packed"
description = "bench: ORT fusions, 4-bit RTN weights in blocks of 64, packed projections"
[tolerance]
min_cosine = 0.9
[[passes]]
name = "fuse-ort"
[[passes]]
name = "quantize-nbits"
options = { bits = 4, block_size = 64, method = "rtn" }
[[passes]]
name = "pack-nbits"
"""


def build(fresh: bool) -> tuple[Path, Path]:
    import bench_genai
    import graphc

    src = bench_genai.build_graphc_fp32(False) / "model.onnx"
    WORK.mkdir(parents=True, exist_ok=True)
    recipe = WORK / "int4-rtn-packed.toml"
    recipe.write_text(RECIPE)
    plain, folder = WORK / "plain.onnx", WORK / "genai"
    if fresh or not plain.is_file():
        with b8.quiet():
            graphc.compress(src, plain, recipe=str(recipe), attribution=False)
    if fresh or not (folder / "genai_config.json").is_file():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        with b8.quiet():
            graphc.compress(src, folder, recipe=str(recipe), genai=True, attribution=False)
    return plain, folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    import numpy as np

    import bench_genai
    from graphc.core.session import make_session
    from graphc.core.target import cpu_summary
    from graphc.front.generate import Decoder
    from graphc.models import get_model_spec

    plain, folder = build(args.fresh)
    windows = get_model_spec("smollm2").perplexity_feeds(1, seq=512, split="eval")
    prompt = [int(t) for t in windows[0]["input_ids"][0][: args.prompt]]
    separate = Decoder(plain, session=make_session(plain, threads=args.threads))
    shared = Decoder(folder / "model.onnx", session=make_session(folder / "model.onnx", threads=args.threads))
    assert shared.shared and not separate.shared
    res = {"cpu": cpu_summary(), "config": vars(args).copy(), "load_before": os.getloadavg(),
           "bandwidth_gb_s": bench_genai.copy_bandwidth() / 1e9}
    labels = {"separate": "graphc.front.generate, separate buffers",
              "shared": "graphc.front.generate, shared buffers (I/O binding)",
              "genai": "onnxruntime-genai og.Generator"}
    rates: dict[str, list[float]] = {k: [] for k in labels}
    prefill: dict[str, list[float]] = {k: [] for k in labels}
    tokens: dict[str, list[int]] = {}
    ids = np.array([prompt])
    for _ in range(args.reps):
        for key, decoder in (("separate", separate), ("shared", shared)):
            out = decoder.greedy(ids, args.new_tokens)
            rates[key].append(out.decode_tokens_per_s)
            prefill[key].append(out.prefill_s * 1e3)
            tokens[key] = out.tokens[0].tolist()
        speed = bench_genai.decode_speed(folder, prompt, args.new_tokens)
        rates["genai"].append(speed["decode_tok_s"])
        prefill["genai"].append(speed["prefill_ms"])
    from graphc.exporters.genai import generate

    tokens["genai"] = generate(folder, prompt, args.new_tokens)
    step_bytes = bench_genai.bytes_per_token(folder, args.prompt + args.new_tokens // 2)
    bound = res["bandwidth_gb_s"] * 1e9 / step_bytes
    res["rows"] = {labels[k]: {"decode_tok_s": statistics.median(rates[k]), "all_tok_s": rates[k],
                               "prefill_ms": statistics.median(prefill[k]),
                               "bound_fraction": statistics.median(rates[k]) / bound,
                               "tokens_equal_genai": sum(a == b for a, b in zip(tokens[k], tokens["genai"]))}
                   for k in labels}
    res["bytes_per_token"] = step_bytes
    res["load_after"] = os.getloadavg()
    c = res["cpu"]
    print(f"CPU: {c['name']} (graphc target {c['target']}); copy bandwidth {res['bandwidth_gb_s']:.1f} GB/s; "
          f"load {res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}; {step_bytes / 1e6:.1f} MB a step")
    print("| run | prefill (ms) | decode tok/s | of bound | tokens equal to genai's |")
    print("|---|--:|--:|--:|--:|")
    for name, r in res["rows"].items():
        print(f"| {name} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['bound_fraction']:.1%} "
              f"| {r['tokens_equal_genai']}/{args.new_tokens} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())

"""graphc.front.generate on a genai folder's shared-buffer model, against the same graph with
separate buffers and against onnxruntime-genai on the folder itself (SmolLM2-135M).

    HF_HUB_OFFLINE=1 python bench/bench_generate_shared.py [--prompt 512] [--new-tokens 128] [--reps 3]
                                                           [--folder LABEL=DIR ...] [--json OUT]

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
- onnxruntime-genai's ``og.Generator`` on the same folder (on the folder's threads: genai's
  default, half the logical cores, where its config names none; ``--og-threads N`` overlays N);

with each one's share of the copy-bandwidth bound (bench_genai.py's measure), whether the tokens
agree, and the CPU. ``--folder``: another genai folder (e.g. the built-in ``int4``'s), measured
the same two ways (``graphc.front.generate`` on its model, ``og.Generator``) in the same rounds.
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
# a speed benchmark: RTN's accuracy is not measured here (a present's cosine is ~0.88 on SmolLM2)
[tolerance]
min_cosine = 0.5
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
    import bench_genai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_genai.add_decode_args(parser)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--folder", action="append", default=[], metavar="LABEL=DIR",
                        help="also measure this genai folder, through graphc.front.generate and og.Generator")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    import numpy as np

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
    # each run: (label, folder for bytes and genai's tokens, graphc Decoder or None for og.Generator)
    runs = [(labels["separate"], folder, separate), (labels["shared"], folder, shared), (labels["genai"], folder, None)]
    for extra in args.folder:
        label, _, path = extra.partition("=")
        other = Path(path)
        model = other / "model.onnx"
        runs += [(f"{label}: graphc.front.generate", other, Decoder(model, session=make_session(model, threads=args.threads))),
                 (f"{label}: og.Generator", other, None)]
    rates: dict[str, list[float]] = {r[0]: [] for r in runs}
    prefill: dict[str, list[float]] = {r[0]: [] for r in runs}
    tokens: dict[str, list[int]] = {}
    ids = np.array([prompt])
    for _ in range(args.reps):
        for name, where, decoder in runs:
            if decoder is not None:
                out = decoder.greedy(ids, args.new_tokens)
                rates[name].append(out.decode_tokens_per_s)
                prefill[name].append(out.prefill_s * 1e3)
                tokens[name] = out.tokens[0].tolist()
            else:
                speed = bench_genai.decode_speed(where, prompt, args.new_tokens, args.og_threads)
                rates[name].append(speed["decode_tok_s"])
                prefill[name].append(speed["prefill_ms"])
    from graphc.exporters.genai import generate

    genai_tokens = {}
    res["rows"] = {}
    for name, where, _ in runs:
        if where not in genai_tokens:
            genai_tokens[where] = generate(where, prompt, args.new_tokens)
        mine = tokens.get(name, genai_tokens[where])
        step_bytes = bench_genai.bytes_per_token(where, args.prompt + args.new_tokens // 2)
        rate = statistics.median(rates[name])
        res["rows"][name] = {"decode_tok_s": rate, "all_tok_s": rates[name], "prefill_ms": statistics.median(prefill[name]),
                             "bytes_per_token": step_bytes,
                             "bound_fraction": rate * step_bytes / (res["bandwidth_gb_s"] * 1e9),
                             "tokens_equal_genai": sum(a == b for a, b in zip(mine, genai_tokens[where]))}
    res["load_after"] = os.getloadavg()
    c = res["cpu"]
    print(f"CPU: {c['name']} (graphc target {c['target']}); copy bandwidth {res['bandwidth_gb_s']:.1f} GB/s; "
          f"load {res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}")
    print("| run | MB a step | prefill (ms) | decode tok/s | of bound | tokens equal to genai's |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, r in res["rows"].items():
        print(f"| {name} | {r['bytes_per_token'] / 1e6:.1f} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.1f} "
              f"| {r['bound_fraction']:.1%} | {r['tokens_equal_genai']}/{args.new_tokens} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())

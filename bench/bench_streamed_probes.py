"""Sensitivity probes on one whole-model session vs from each layer's cut vs segment by segment, on SmolLM2-135M.

    python bench/bench_streamed_probes.py [--segment-mb 64,128] [--layers 0] [--fused] [--workers N] [--json OUT]

The fp32 SmolLM2 export of bench/bench_smollm2_int4.py (cached in ``.graphc-cache/bench/``; tied table)
and the probe feed the built-in ``int4`` recipe measures on (one 512-token window of its
calibration text): every planned weight probed at 4-bit, block 64, round to nearest, with the KL
metric, (a) as ``mixed-precision`` does on a model that fits (``_sensitivity.Evaluator``: one
session, the weights as inputs, every probe a whole forward pass), (b) as it does by default
(``passes/_cut_evaluator.py``: one session from each cut to the outputs, each probe from its
layer's cut), the two alternating probe by probe, and (c) streamed, as on a model too large for
memory (``passes/_streamed_probes.py``: segment by segment; ``--segment-mb ""`` skips it).
Reports wall time of each, the largest difference between their errors, the CPU, and the
segment count. ``--layers N`` probes only the first N layers (0: all); ``--fused``: the graph
after ``fuse-ort`` (what the ``int4`` recipe probes), not the plain export. ``--workers N``: the
streamed probes also on a local Ray instance (``_streamed_probes.probe_on_workers``: the reference
once in this process, the probes of each start segment one task), with 1 and with N workers, each
compared with the in-process streamed errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment-mb", default="64,128")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--streamed-only", action="store_true", help="skip the whole-model and cut rows")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from bench.bench_smollm2_int4 import cached_fp32  # the cached export
    from graphc.checks.feeds import calibration_context
    from graphc.core import streaming
    from graphc.core.io import load_model
    from graphc.core.target import cpu_line
    from graphc.passes import _cut_evaluator, _probes, _streamed_probes
    from graphc.passes import _sensitivity as sens

    model = load_model(cached_fp32(ROOT / ".graphc-cache" / "bench", fresh=False))
    if args.fused:
        from graphc.core.pass_base import PassContext
        from graphc.passes.fuse_ort import FuseOrt

        model = FuseOrt(FuseOrt.Options(), PassContext())(model).model
    feeds = list(calibration_context(model, 32).calibration)[:1]
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=64, exclude=())
    if args.layers:
        layers = layers[: args.layers]
    config = sens.QuantConfig(4, 64)
    items = [_probes.ProbeItem(layer.value.name, layer.transposed, "rtn", (config,), (config,), None) for layer in layers]
    rows = []
    whole, whole_s = None, None
    if not args.streamed_only:
        start = time.perf_counter()
        evaluator = sens.Evaluator(model, layers, feeds, metric="kl")
        whole_build = time.perf_counter() - start
        start = time.perf_counter()
        cut = _cut_evaluator.CutEvaluator(model, layers, feeds, "kl")
        cut_build = time.perf_counter() - start
        shared = {"whole": _probes.ProbeShared("bench-whole", {}), "cut": _probes.ProbeShared("bench-cut", {})}
        seconds = {"whole": whole_build, "cut": cut_build}
        errors: dict[str, list] = {"whole": [], "cut": []}
        for item in items:  # alternating, probe by probe: the machine's drift hits both alike
            for name, ev in (("whole", evaluator), ("cut", cut)):
                _probes.register_local(shared[name].key, ev)
                start = time.perf_counter()
                errors[name].append(_probes.probe_layer(shared[name], item).measured[config])
                seconds[name] += time.perf_counter() - start
        whole, whole_s = errors["whole"], seconds["whole"]
        del evaluator
        rows.append({"path": "whole model", "seconds": round(whole_s, 1), "build_s": round(whole_build, 1)})
        print(json.dumps(rows[-1]), flush=True)
        diff = max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(errors["cut"], whole))
        rows.append({"path": "from each layer's cut", "cuts": cut.start_count, "seconds": round(seconds["cut"], 1),
                     "build_s": round(cut_build, 1), "ratio_to_whole": round(seconds["cut"] / whole_s, 3),
                     "max_rel_diff": float(f"{diff:.3g}")})
        print(json.dumps(rows[-1]), flush=True)
        del cut
    for mb in [int(x) for x in args.segment_mb.split(",") if x]:
        start = time.perf_counter()
        with streaming.streaming("always", segment_bytes=mb << 20):
            runner_segments = len(streaming.StreamedModel(model).segments)
            got = _streamed_probes.probe_results(model, items, feeds, "kl", symmetric=False, scale_dtype="float16",
                                                 damp=0.01)
        seconds = time.perf_counter() - start
        rows.append({"path": f"streamed, {mb} MB segments", "segments": runner_segments, "seconds": round(seconds, 1)})
        if whole is not None:
            diff = max(abs(g.measured[config] - w) / max(abs(w), 1e-12) for g, w in zip(got, whole))
            rows[-1].update(ratio_to_whole=round(seconds / whole_s, 3), max_rel_diff=float(f"{diff:.3g}"))
        print(json.dumps(rows[-1]), flush=True)
        for workers in ([1, args.workers] if args.workers else []):
            from graphc.core.ray_executor import RayExecutor

            executor = RayExecutor(workers=workers)
            try:
                start = time.perf_counter()
                with streaming.streaming("always", segment_bytes=mb << 20):
                    spread = _streamed_probes.probe_on_workers(
                        model, items, feeds, "kl", executor, symmetric=False, scale_dtype="float16", damp=0.01,
                        hessian=lambda i: None, hessian_key=lambda i: None)
                seconds = time.perf_counter() - start
            finally:
                executor.close()
            same = all(a.measured == b.measured and a.weight_error == b.weight_error for a, b in zip(spread, got))
            rows.append({"path": f"streamed, {mb} MB segments, on {workers} Ray worker(s)", "seconds": round(seconds, 1),
                         "ratio_to_in_process": round(seconds / rows[-1 if workers == 1 else -2]["seconds"], 3),
                         "identical_to_in_process": same})
            if workers > 1:
                rows[-1]["speedup_over_1_worker"] = round(rows[-2]["seconds"] / seconds, 3)
            print(json.dumps(rows[-1]), flush=True)
    print(cpu_line())
    print(f"{len(items)} probes, feed {[tuple(v.shape) for v in feeds[0].values()]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "probes": len(items), "fused": args.fused,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sensitivity probes on one whole-model session vs segment by segment, on SmolLM2-135M.

    python bench/bench_streamed_probes.py [--segment-mb 64,128] [--layers 0] [--json OUT]

The fp32 SmolLM2 export of bench/bench_smollm2_int4.py (cached in ``.graphc-cache/bench/``; tied table)
and the probe feed the built-in ``int4`` recipe measures on (one 512-token window of its
calibration text): every planned weight probed at 4-bit, block 64, round to nearest, with the KL
metric, (a) as ``mixed-precision`` does on a model that fits (``_sensitivity.Evaluator``: one
session, the weights as inputs, every probe a whole forward pass) and (b) streamed
(``passes/_streamed_probes.py``: each probe from its layer's segment on). Reports wall time of
each, the largest difference between their errors, the CPU, and the segment count. In one
process, the paths alternating; ``--layers N`` probes only the first N layers (0: all).
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
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from bench.bench_smollm2_int4 import cached_fp32  # the cached export
    from graphc.checks.feeds import calibration_context
    from graphc.core import streaming
    from graphc.core.io import load_model
    from graphc.core.target import cpu_line
    from graphc.passes import _probes, _streamed_probes
    from graphc.passes import _sensitivity as sens

    model = load_model(cached_fp32(ROOT / ".graphc-cache" / "bench", fresh=False))
    feeds = list(calibration_context(model, 32).calibration)[:1]
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=64, exclude=())
    if args.layers:
        layers = layers[: args.layers]
    config = sens.QuantConfig(4, 64)
    items = [_probes.ProbeItem(layer.value.name, layer.transposed, "rtn", (config,), (config,), None) for layer in layers]
    rows = []
    start = time.perf_counter()
    evaluator = sens.Evaluator(model, layers, feeds, metric="kl")
    shared = _probes.ProbeShared("bench", evaluator.payload())
    _probes.register_local("bench", evaluator)
    whole = [_probes.probe_layer(shared, item).measured[config] for item in items]
    whole_s = time.perf_counter() - start
    del evaluator
    rows.append({"path": "whole model", "seconds": round(whole_s, 1)})
    print(json.dumps(rows[-1]), flush=True)
    for mb in [int(x) for x in args.segment_mb.split(",")]:
        start = time.perf_counter()
        with streaming.streaming("always", segment_bytes=mb << 20):
            runner_segments = len(streaming.StreamedModel(model).segments)
            got = _streamed_probes.probe_results(model, items, feeds, "kl", symmetric=False, scale_dtype="float16",
                                                 damp=0.01)
        seconds = time.perf_counter() - start
        diff = max(abs(g.measured[config] - w) / max(abs(w), 1e-12) for g, w in zip(got, whole))
        rows.append({"path": f"streamed, {mb} MB segments", "segments": runner_segments, "seconds": round(seconds, 1),
                     "ratio_to_whole": round(seconds / whole_s, 3), "max_rel_diff": float(f"{diff:.3g}")})
        print(json.dumps(rows[-1]), flush=True)
    print(cpu_line())
    print(f"{len(items)} probes, feed {[tuple(v.shape) for v in feeds[0].values()]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "probes": len(items), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""mixed-precision's sensitivity probes on MiniLM: in this process, on 1 Ray worker, on 2.

    python bench/bench_ray.py [--method gptq|rtn] [--feeds 2] [--repeat 1] [--json OUT]

The pass runs as the ``int4`` recipe runs it (max_bits 3.95, GPTQ probes, log8 scales) on
graphc's fp32 MiniLM export with real tweets as calibration, once per configuration on a fresh
copy of the model:

- ``local``: graphc.executor.LocalExecutor, this process (ONNX Runtime and BLAS on every core);
- ``ray-1`` / ``ray-2``: a local Ray instance with 1 / 2 CPUs (graphc.ray_executor; each task
  one ORT thread), started before and stopped after the timed pass (start time reported apart).

``probe_s`` is the probe phase (the executor's map: sharing the model, building each worker's
session, every probe, results back); the Hessians (GPTQ) and the reference outputs are computed
before it in this process and are not part of it. The plan must be identical in every
configuration, and every probe's result bit-identical (checked). The load average before and after is printed: the machine may be
shared, and a busy neighbour slows the 2-worker run most. Markdown on stdout, JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import harness as h


class Capture:
    """Keeps the raw probe results (exact floats) of the executor it wraps."""

    def __init__(self, inner):
        self.inner, self.results = inner, []
        self.threads_per_item, self.workers = inner.threads_per_item, inner.workers

    def map(self, fn, items, **kw):
        out = self.inner.map(fn, items, **kw)
        self.results.append([(r.measured, r.weight_error) for r in out])
        return out


def run_once(model_path, calibration, executor, method: str, feeds: int) -> dict:
    from graphc.io import load_model
    from graphc.pass_base import PassContext
    from graphc.passes.mixed_precision import MixedPrecision

    model = load_model(model_path)
    capture = Capture(executor)
    ctx = PassContext(calibration=calibration, calibration_source="tweets", executor=capture)
    options = MixedPrecision.Options(max_bits=3.95, method=method, scale_dtype="log8", feeds=feeds)
    start = time.perf_counter()
    stats = MixedPrecision(options, ctx)(model).stats.to_dict()
    wall = time.perf_counter() - start
    return {"pass_s": round(wall, 2), "measure_s": stats["measure_s"], "probe_s": stats["probe_s"],
            "probes": stats["measurement_runs"], "layers": stats["layers_planned"],
            "plan": [(c["layer"], c["bits"], c["block_size"]) for c in stats["choices"]],
            "exact": repr(capture.results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    parser.add_argument("--feeds", type=int, default=2, help="calibration feeds each probe runs")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (the fastest is kept)")
    parser.add_argument("--configs", default="local,ray-1,ray-2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from graphc.demo import cached_export
    from graphc.executor import LocalExecutor
    from graphc.feeds import calibration_context
    from graphc.io import load_model
    from graphc.ray_executor import RayExecutor

    with h.quiet():
        fp32, _ = cached_export("minilm", h.WORK)
        calibration = calibration_context(load_model(fp32), 256).calibration
    rows, load = {}, {"before": os.getloadavg()}
    for name in args.configs.split(","):
        best, start_s = None, None
        for _ in range(args.repeat):
            if name == "local":
                executor = LocalExecutor()
            else:
                t = time.perf_counter()
                executor = RayExecutor(workers=int(name.split("-")[1]))
                start_s = round(time.perf_counter() - t, 2)
            try:
                r = run_once(fp32, calibration, executor, args.method, args.feeds)
            finally:
                executor.close()
            if best is None or r["probe_s"] < best["probe_s"]:
                best = r
        rows[name] = {**best, **({"ray_start_s": start_s} if start_s is not None else {})}
        print(f"{name}: probes {best['probe_s']:.1f} s", file=sys.stderr)
    load["after"] = os.getloadavg()
    plans = {json.dumps([r["plan"], r.pop("exact")]) for r in rows.values()}
    base = rows.get("ray-1") or rows.get("local")
    print(f"MiniLM mixed-precision probes ({args.method}, {args.feeds} feeds); CPU: {h.cpu_name()}; "
          f"{os.cpu_count()} CPUs; load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f}\n")
    print("| run | probes | probe phase s | speed-up vs ray-1 | whole pass s | Ray start s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        speed = f"{base['probe_s'] / r['probe_s']:.2f}x" if base else "-"
        print(f"| {name} | {r['probes']} | {r['probe_s']:.1f} | {speed} | {r['pass_s']:.1f} | {r.get('ray_start_s', '-')} |")
    print(f"\nsame plan and bit-identical probe results in every run: {len(plans) == 1}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "load": load, "cpu": h.cpu_name(), "same_plan": len(plans) == 1}, f, indent=1)
    return 0 if len(plans) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())

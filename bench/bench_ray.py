"""mixed-precision's sensitivity probes on MiniLM: in this process, on 1 Ray worker, on 2.

    python bench/bench_ray.py [--method gptq|rtn] [--feeds 2] [--repeat 1] [--json OUT]

The pass runs as the ``int4`` recipe runs it (max_bits 3.95, GPTQ probes, log8 scales) on
graphc's fp32 MiniLM export with real tweets as calibration, once per configuration on a fresh
copy of the model:

- ``local``: graphc.core.executor.LocalExecutor, this process (ONNX Runtime and BLAS on every core);
- ``ray-1`` / ``ray-2``: a local Ray instance with 1 / 2 CPUs (graphc.core.ray_executor; each task
  one ORT thread), started before and stopped after the timed pass (start time reported apart).

``probe_s`` is the probe phase (the executor's map: sharing the model, building each worker's
session, every probe, results back); the Hessians (GPTQ) and the reference outputs are computed
before it in this process and are not part of it. The plan must be identical in every
configuration, and every probe's result bit-identical (checked). The CPU seconds the work items
took where they ran are summed too: on a loaded machine wall time says more about the
neighbours than about the work, and the CPU time of 1 vs 2 workers shows what distributing costs.
Before each configuration a control measures what a second busy process adds on the machine
at that moment (two pure-Python loops vs one: 2.0x on two idle cores), the ceiling of the
2-worker speed-up then. The load average before and after is printed: the machine may be
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
    """Keeps the raw probe results (exact floats) of the executor it wraps, and the CPU seconds
    each work item took where it ran (``time.process_time`` of its process, every thread)."""

    def __init__(self, inner):
        self.inner, self.results, self.cpu = inner, [], []
        self.threads_per_item, self.workers = inner.threads_per_item, inner.workers

    def map(self, fn, items, *, on_result=None, **kw):
        def timed(shared, item):
            import time

            start = time.process_time()
            out = fn(shared, item)
            return out, time.process_time() - start

        report = None if on_result is None else (lambda i, r: on_result(i, r[0]))
        out = self.inner.map(timed, items, on_result=report, **kw)
        self.cpu.append([c for _, c in out])
        results = [r for r, _ in out]
        self.results.append([(r.measured, r.weight_error) for r in results])
        return results


SPIN = 15_000_000


def _spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def capacity() -> float:
    """Throughput of 2 busy processes over 1, measured now (~5-15 s): what a second core adds on
    this machine at this moment, with its neighbours' load (2.0 on two idle cores)."""
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(2)
    try:
        pool.map(_spin, [1000, 1000])  # both processes started before timing
        start = time.perf_counter()
        pool.apply(_spin, (SPIN,))
        one = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(_spin, [SPIN, SPIN], chunksize=1)
        two = time.perf_counter() - start
    finally:
        pool.terminate()
    return round(2 * one / two, 2)


def run_once(model_path, calibration, executor, method: str, feeds: int) -> dict:
    from graphc.core.io import load_model
    from graphc.core.pass_base import PassContext
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
            "task_cpu_s": round(sum(capture.cpu[0]), 2), "longest_task_cpu_s": round(max(capture.cpu[0]), 2),
            "exact": repr(capture.results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    parser.add_argument("--feeds", type=int, default=2, help="calibration feeds each probe runs")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (the fastest is kept)")
    parser.add_argument("--configs", default="local,ray-1,ray-2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from graphc.front.demo import cached_export
    from graphc.core.executor import LocalExecutor
    from graphc.checks.feeds import calibration_context
    from graphc.core.io import load_model
    from graphc.core.ray_executor import RayExecutor

    with h.quiet():
        fp32, _ = cached_export("minilm", h.WORK)
        calibration = calibration_context(load_model(fp32), 256).calibration
    rows, load = {}, {"before": os.getloadavg()}
    for name in args.configs.split(","):
        best, start_s, spare = None, None, capacity()
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
        rows[name] = {**best, "capacity_before": spare, **({"ray_start_s": start_s} if start_s is not None else {})}
        print(f"{name}: probes {best['probe_s']:.1f} s", file=sys.stderr)
    load["after"] = os.getloadavg()
    plans = {json.dumps([r["plan"], r.pop("exact")]) for r in rows.values()}
    base = rows.get("ray-1") or rows.get("local")
    print(f"MiniLM mixed-precision probes ({args.method}, {args.feeds} feeds); CPU: {h.cpu_name()}; "
          f"{os.cpu_count()} CPUs; load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f}\n")
    print("| run | probes | probe phase s | speed-up vs ray-1 | CPU s in the tasks | whole pass s | Ray start s "
          "| 2-vs-1 process capacity just before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        speed = f"{base['probe_s'] / r['probe_s']:.2f}x" if base else "-"
        print(f"| {name} | {r['probes']} | {r['probe_s']:.1f} | {speed} | {r['task_cpu_s']:.1f} | {r['pass_s']:.1f} "
              f"| {r.get('ray_start_s', '-')} | {r['capacity_before']:.2f}x |")
    if "ray-1" in rows and "ray-2" in rows:  # what 2 idle cores would give: the tasks' CPU time split in two
        one, two = rows["ray-1"], rows["ray-2"]
        bound = max(two["task_cpu_s"] / 2, two["longest_task_cpu_s"])
        print(f"\nCPU-bound estimate for 2 idle cores (not a measurement): 1 worker {one['task_cpu_s']:.1f} CPU s, "
              f"2 workers {two['task_cpu_s']:.1f} CPU s -> {one['task_cpu_s'] / bound:.2f}x")
    print(f"\nsame plan and bit-identical probe results in every run: {len(plans) == 1}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "load": load, "cpu": h.cpu_name(), "same_plan": len(plans) == 1}, f, indent=1)
    return 0 if len(plans) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())

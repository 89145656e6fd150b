"""Peak memory and time of compressing large models.

    python bench/bench_memory.py [--sizes 1gb,4gb,8gb] [--recipes cleanup,int4-nocalib] [--workers N] [--json OUT]

Writes synthetic Llama-architecture models (models/synthetic_llama.py: random weights from a
config, streamed to external data; cached under ``.graphc-cache/synthetic/``), then compresses
each with each recipe in a fresh process (``graphc compress --no-validate``: validation would
load the whole model into ONNX Runtime) and reports that process's peak resident memory
(VmHWM, which counts memory-mapped weight pages too), the wall time, and the output bytes.
``int4-nocalib`` is bench/recipes/int4-nocalib.toml: the int4 recipe with clipping-search
weights, since GPTQ's calibration runs the whole float model. ``--workers N``: the compress
sends its work to a local Ray instance with N CPUs; the Ray worker processes' resident memory is
then sampled every second from this process (``/proc``: processes titled ``ray::``), and the
largest single worker and the largest sum over workers are reported beside the driver's peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".graphc-cache" / "synthetic"
RECIPES = {"int4-nocalib": str(ROOT / "bench" / "recipes" / "int4-nocalib.toml")}

# Runs in the child: compress, then report this process's peak resident set.
_CHILD = """
import json, sys, time
import graphc

def hwm():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) * 1024

def reset():  # the peak so far starts again from the current resident set (Linux)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

stages, overall = {}, [0]

class Peaks:  # the peak resident memory of each stage: setup (load, reference run), each pass, the rest
    current = "setup"
    def _close(self, next_stage):
        stages[self.current] = max(stages.get(self.current, 0), hwm())
        overall[0] = max(overall[0], stages[self.current])
        reset()
        self.current = next_stage
    def before_pass(self, pass_, model):
        self._close(pass_.name)
    def after_pass(self, pass_, model, record):
        self._close("validation and save")

peaks = Peaks()
t = time.perf_counter()
workers = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "0" else None
r = graphc.compress(sys.argv[1], sys.argv[2], recipe=sys.argv[3], validate=sys.argv[4] == "1", attribution=False,
                    stream=sys.argv[5], force=True, instruments=[peaks], workers=workers)
peaks._close("done")
print(json.dumps({"peak_bytes": overall[0], "seconds": time.perf_counter() - t,
                  "stage_peaks": stages,
                  "passes": {p.name: round(p.wall_s, 1) for p in r.passes},
                  "validation": r.validation.to_dict() if r.validation is not None else None,
                  "written": [str(p) for p in r.written]}))
"""

def synthetic(size: str) -> Path:
    from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama

    path = CACHE / f"llama-{size}.onnx"
    if not (path.exists() and (CACHE / f"llama-{size}.onnx.data").exists()):
        print(f"writing synthetic {size} model to {path} ...", file=sys.stderr, flush=True)
        write_synthetic_llama(path, PRESETS[size])
    return path


def largest_tensor(size: str) -> int:
    from graphc.models.synthetic_llama import PRESETS

    return max(4 * math.prod(shape) for _, shape in PRESETS[size].tensor_shapes())


class RaySampler:
    """The resident memory of Ray worker processes (titled ``ray::...``), sampled every second."""

    def __init__(self) -> None:
        import threading

        self.largest_worker = self.largest_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            sizes = []
            for pid in os.listdir("/proc"):
                try:
                    if not pid.isdigit() or not open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::"):
                        continue
                    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
                    sizes.append(int(status["VmRSS"].split()[0]) * 1024)
                except (OSError, KeyError, ValueError):
                    continue
            if sizes:
                self.largest_worker = max(self.largest_worker, max(sizes))
                self.largest_sum = max(self.largest_sum, sum(sizes))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"ray_worker_peak_bytes": self.largest_worker, "ray_workers_sum_peak_bytes": self.largest_sum}


def run(model: Path, recipe: str, out_dir: Path, validate: bool = False, stream: str = "auto",
        workers: int = 0) -> dict:
    out = out_dir / f"{model.stem}-{recipe}.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sampler = RaySampler() if workers else None
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(out), RECIPES.get(recipe, recipe),
                           "1" if validate else "0", stream, str(workers)],
                          capture_output=True, text=True, env=env)
    ray_memory = sampler.stop() if sampler is not None else {}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(ray_memory)
    result["output_bytes"] = sum(Path(p).stat().st_size for p in result.pop("written"))
    for p in out_dir.glob(out.name + "*"):
        p.unlink()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1gb,4gb,8gb")
    parser.add_argument("--recipes", default="cleanup,int4-nocalib")
    parser.add_argument("--validate", action="store_true", help="validate each result against the original "
                        "(off by default: the figures in docs/results.md's first table were taken without)")
    parser.add_argument("--stream", default="auto", choices=("auto", "always", "never"),
                        help="graphc.compress's stream option (segment-by-segment runs; auto: over 1 GiB)")
    parser.add_argument("--workers", type=int, default=0, help="compress with a local Ray instance of N CPUs")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphc-mem-") as tmp:
        for size in args.sizes.split(","):
            model = synthetic(size)
            model_bytes = model.stat().st_size + (model.parent / (model.name + ".data")).stat().st_size
            for recipe in args.recipes.split(","):
                t = time.perf_counter()
                result = run(model, recipe, Path(tmp), args.validate, args.stream, args.workers)
                row = {"model": size, "model_bytes": model_bytes, "largest_tensor": largest_tensor(size),
                       "recipe": recipe, "validate": args.validate, "stream": args.stream, "workers": args.workers, "wall_s": round(time.perf_counter() - t, 1), **result}
                rows.append(row)
                print(json.dumps(row), flush=True)
    from graphc.core.target import cpu_line

    print(cpu_line())
    print(f"\n{'model':6s} {'bytes':>9s} {'largest':>9s} {'recipe':14s} {'peak RSS':>9s} {'time':>7s} {'output':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6s} {r['recipe']:14s} ERROR {r['error']}")
            continue
        print(f"{r['model']:6s} {r['model_bytes'] / 2**30:8.2f}G {r['largest_tensor'] / 2**20:8.0f}M {r['recipe']:14s} "
              f"{r['peak_bytes'] / 2**30:8.2f}G {r['seconds']:6.0f}s {r['output_bytes'] / 2**20:8.0f}M")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

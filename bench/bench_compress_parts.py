"""Parts of a calibrated compress, each against the form it replaced, alternating.

    python bench/bench_compress_parts.py [--reps 3] [--windows 24] [--sweep-against REV] [--json OUT]

- ``kl``: a probe's KL over a 512 x 49,152 block of logits (SmolLM2's vocabulary):
  ``_sensitivity.kl_rows`` (rows split over the cores, a buffer per thread) against the
  four-pass single-threaded formula it replaced; random logits, the results compared bit for bit;
- ``factor``: GPTQ's upper Cholesky factor of H^-1 at K = 576 and 1,536 (SmolLM2's widths):
  ``_blockquant._upper_inverse_factor`` against ``numpy.linalg.inv`` then ``cholesky``;
- ``sweep`` (with ``--sweep-against REV``): ``calibrate._sweep`` over ``--windows`` of the int4
  recipe's calibration windows on the fused SmolLM2 graph (bench/bench_smollm2_int4.py builds it),
  this checkout's against ``graphc/core/calibrate.py`` at git revision REV, sums compared bit for
  bit. Prints the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _alternate(forms: dict, reps: int, calls: int = 5) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(reps):
        for label, fn in forms.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[label].append(round((time.perf_counter() - start) / calls * 1000, 2))
    return times


def kl(reps: int) -> dict:
    from graphc.passes import _sensitivity as sens

    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((512, 49152)) * 3).astype(np.float32)
    out = ref + (rng.standard_normal(ref.shape) * 0.1).astype(np.float32)
    cached = sens.SoftmaxRef(ref)

    def before() -> np.ndarray:
        top = out.max(axis=-1)
        lse = np.log(np.exp(out - top[:, None]).sum(axis=-1, dtype=np.float64)) + top
        return cached.plogp - np.einsum("ij,ij->i", cached.p, out, dtype=np.float64) + cached.psum * lse

    same = bool(np.array_equal(before(), sens.kl_rows(out, cached)))
    return {"ms": _alternate({"before (one thread)": before, "kl_rows": lambda: sens.kl_rows(out, cached)}, reps),
            "bit_identical": same}


def factor(reps: int) -> dict:
    from graphc.passes import _blockquant as bq

    rng = np.random.default_rng(0)
    result = {}
    for k in (576, 1536):
        x = rng.standard_normal((4096, k)) * np.exp(rng.standard_normal(k))
        h = x.T @ x / 4096 + 0.1 * np.eye(k)
        want = np.linalg.cholesky(np.linalg.inv(h)).T
        rel = float(np.abs(bq._upper_inverse_factor(h.copy()) - want).max() / np.abs(want).max())
        result[f"K={k}"] = {"ms": _alternate({"inv then cholesky": lambda: np.linalg.cholesky(np.linalg.inv(h)).T,
                                               "_upper_inverse_factor": lambda: bq._upper_inverse_factor(h.copy())},
                                              reps), "max_rel_diff": rel}
    return result


def sweep(rev: str, windows: int, reps: int) -> dict:
    from graphc.checks.feeds import calibration_context
    from graphc.core import calibrate
    from graphc.core.io import load_model

    path = ROOT / ".graphc-cache" / "bench" / "smollm2-fused-fp32.onnx"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run bench/bench_smollm2_int4.py once first")
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:graphc/core/calibrate.py"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "calibrate_before.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location("calibrate_before", file)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
    model = load_model(path)
    feeds = list(calibration_context(model, 128, model_path=path).calibration)[:windows]
    names = sorted({v.name for v, _ in calibrate.weight_inputs(model) if v.name})
    times: dict[str, list[float]] = {rev: [], "this checkout": []}
    sums = {}
    for _ in range(reps):
        for label, module in ((rev, before), ("this checkout", calibrate)):
            start = time.perf_counter()
            sums[label], _ = module._sweep(model, names, feeds, [])
            times[label].append(round((time.perf_counter() - start) / len(feeds), 3))
    same = all(np.array_equal(sums[rev][n].gram, sums["this checkout"][n].gram)
               and np.array_equal(sums[rev][n].abs_sum, sums["this checkout"][n].abs_sum) for n in names)
    return {"s_per_window": times, "windows": len(feeds), "values": len(names), "bit_identical": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--sweep-against", metavar="REV", help="also time the calibration sweep against this revision's")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    from graphc.core.target import cpu_line

    out = {"cpu": cpu_line(), "kl": kl(args.reps), "factor": factor(args.reps)}
    if args.sweep_against:
        out["sweep"] = sweep(args.sweep_against, args.windows, args.reps)
    from harness import print_json  # bench/harness.py (the script's folder is on sys.path)

    print_json(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

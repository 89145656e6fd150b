"""GPTQ's peak memory and time on one wide layer, this tree against another commit's ``gptq``.

    python bench/bench_gptq_memory.py [--against COMMIT] [--rows 2048] [--cols 5632 4096] [--json OUT]

Each measurement runs in a fresh process: a random ``rows`` x ``cols`` weight and a correlated
float64 Hessian (the calibration sweep's form) are built first, then ``gptq`` (4 bits, block
64, act order, damp 0.1: the decoder ``int4`` recipe's settings) runs once; the report is the
process's peak resident memory during the call above what it held just before (Linux: the
peak reset through ``/proc/self/clear_refs`` after the inputs were built and one warm-up call
on a small layer; ``VmHWM`` after the call less ``VmRSS`` before), the call's time, and the
codes that differ between the two implementations. ``cols`` above 4096 take GPTQ's float32
path, the others its float64 one. The CPU is named.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib.util, json, sys, time
import numpy as np
path, rows, cols, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("bq_under_test", path)
bq = importlib.util.module_from_spec(spec); sys.modules["bq_under_test"] = bq; spec.loader.exec_module(bq)
rng = np.random.default_rng(0)
w = rng.standard_normal((rows, cols)).astype(np.float32)
mix = rng.standard_normal((cols, cols // 8)).astype(np.float32)
hess = np.zeros((cols, cols))
for _ in range(4):  # correlated inputs, a few windows of tokens
    x = rng.standard_normal((1024, cols // 8)).astype(np.float32) @ mix.T
    hess += (x.T @ x).astype(np.float64)
del x, mix
hess /= 4096
bq.gptq(w[:64, :256], hess[:256, :256], 4, 64, symmetric=False, act_order=True, damp=0.1)  # warm-up
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) reset to the current resident set
before = status("VmRSS")
t = time.perf_counter()
q = bq.gptq(w, hess, 4, 64, symmetric=False, act_order=True, damp=0.1)
seconds = time.perf_counter() - t
peak = status("VmHWM")
np.save(out, q.q)
print(json.dumps({"peak_above_mb": round((peak - before) / 1024, 1), "seconds": round(seconds, 2)}))
"""


def measure(module: Path, rows: int, cols: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(module), str(rows), str(cols), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="f6490c0", help="commit whose passes/_blockquant.py is compared "
                        "(default: the last one inverting the Hessian with numpy.linalg.inv then cholesky)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, nargs="+", default=[5632, 4096])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from graphc.core.target import cpu_line

    results = {"cpu": cpu_line(), "against": args.against, "rows": args.rows, "shapes": []}
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "blockquant_other.py"
        other.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.against}:passes/_blockquant.py"],
                                        capture_output=True, text=True, check=True).stdout)
        for cols in args.cols:
            here = measure(ROOT / "passes" / "_blockquant.py", args.rows, cols, Path(tmp) / "here.npy")
            there = measure(other, args.rows, cols, Path(tmp) / "there.npy")
            differ = float(np.mean(np.load(Path(tmp) / "here.npy") != np.load(Path(tmp) / "there.npy")))
            row = {"cols": cols, "this_tree": here, args.against: there, "codes_differ": differ}
            results["shapes"].append(row)
            print(f"{args.rows} x {cols}: this tree {here['peak_above_mb']} MB above, {here['seconds']} s; "
                  f"{args.against} {there['peak_above_mb']} MB above, {there['seconds']} s; codes differing {differ:.2e}",
                  flush=True)
    print(results["cpu"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

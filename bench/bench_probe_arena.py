"""The sensitivity probes' sessions with and without the process's shared memory arena, on SmolLM2-135M.

    python bench/bench_probe_arena.py [--model PLANNED.onnx] [--rounds 3] [--json OUT]

``mixed-precision`` runs each probe through one ONNX Runtime session per cut
(``passes/_cut_evaluator.py``). This runs the float model from every cut once (what the 216
probes of the built-in ``int4`` recipe run, one pass per cut), in a fresh process per mode, the
modes alternating round by round: ``own`` (each session without an arena, as before) and
``shared`` (every session on the one arena ``graphc.core.session.use_shared_arena`` registers).
Reports the seconds of each pass and each process's peak RSS, with the CPU. The model is the
graph ``mixed-precision`` sees (after ``awq-scale`` and ``split-vocab``): by default the one
``bench/bench_nbits_variants.py`` keeps (``.graphc-cache/bench/nbits-variants/planned.onnx``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ROOT / ".graphc-cache" / "bench" / "nbits-variants" / "planned.onnx"


def one(model_path: str, mode: str) -> dict:
    """Build the cut evaluator (``mode``: shared arena or not) and time two passes over its cuts."""
    from graphc.checks.feeds import calibration_context
    from graphc.core import session
    from graphc.core.io import load_model
    from graphc.passes import _cut_evaluator
    from graphc.passes import _sensitivity as sens

    if mode == "own":  # as before: each session without an arena
        session.use_shared_arena = lambda options: False  # noqa: E731 - the evaluator imports it when it builds
    model = load_model(model_path)
    feeds = list(calibration_context(model, 32).calibration)[:1]
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=64, exclude=())
    cut = _cut_evaluator.CutEvaluator(model, layers, feeds, "kl")
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        for k in cut.starts:
            cut._outputs(k, 0, {})
        passes.append(time.perf_counter() - start)
    return {"mode": mode, "cuts": len(cut.starts), "seconds": [round(s, 2) for s in passes],
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--one", choices=("own", "shared"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one)))
        return 0
    if not Path(args.model).is_file():
        parser.error(f"{args.model}: not found (bench/bench_nbits_variants.py writes it)")
    from graphc.core.target import cpu_line

    rows = []
    for r in range(args.rounds):
        for mode in ("own", "shared"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", mode],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]) | {"round": r})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for mode in ("own", "shared"):
        mine = [row for row in rows if row["mode"] == mode]
        summary[mode] = {"median_pass_s": round(statistics.median(s for row in mine for s in row["seconds"]), 2),
                         "peak_rss_gb": max(row["peak_rss_gb"] for row in mine)}
    summary["ratio"] = round(summary["shared"]["median_pass_s"] / summary["own"]["median_pass_s"], 3)
    print(cpu_line())
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "model": args.model, "rows": rows,
                                               "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

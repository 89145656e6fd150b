"""The calibration sweep on SmolLM2-135M: where its time goes, window by window.

    python bench/bench_sweep.py [--windows 8] [--json OUT]

The sweep is what ``awq-scale``, ``mixed-precision`` and ``quantize-nbits`` share
(``graphc.core.calibrate``): one forward pass per calibration window with every constant-weight
MatMul input exposed, and each input's x^T x added up. On the fused fp32 SmolLM2 graph of
bench/bench_smollm2_int4.py and the built-in recipe's calibration windows (512 tokens of
Wikipedia each), this times, per window: the plain forward (only the last hidden state fetched),
the forward with the inputs exposed, and the sums as ``calibrate._sweep`` computes them; then the
whole ``_sweep`` over ``--windows`` windows. ``--sessions``: also the time to build an ONNX
Runtime session of that model as one serialized message vs weightless plus its arrays
(``graphc.core.session.WEIGHTLESS_MIN``), alternating, three each, and whether their outputs on
one window are bit-identical. Prints the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--sessions", action="store_true")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from graphc.checks.feeds import calibration_context
    from graphc.core import calibrate
    from graphc.core.io import load_model
    from graphc.core.target import cpu_line

    path = ROOT / ".graphc-cache" / "bench" / "smollm2-fused-fp32.onnx"  # bench/bench_smollm2_int4.py builds it
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run bench/bench_smollm2_int4.py once first")
    model = load_model(path)
    feeds = list(calibration_context(model, 128, model_path=path).calibration)[: args.windows]
    names = sorted({v.name for v, _ in calibrate.weight_inputs(model) if v.name})
    session, inputs = calibrate.exposing_session(model, names, only=True)
    run = [{k: v for k, v in f.items() if k in inputs} for f in feeds]
    session.run(names, run[0])  # warm-up
    t_fwd = t_gram = 0.0
    for feed in run:
        start = time.perf_counter()
        outs = session.run(names, feed)
        t_fwd += time.perf_counter() - start
        start = time.perf_counter()
        for out in outs:
            rows = np.ascontiguousarray(out.reshape(-1, out.shape[-1]), dtype=np.float32)
            calibrate._gram(rows)
        t_gram += time.perf_counter() - start
    start = time.perf_counter()
    calibrate._sweep(model, names, feeds, [])
    t_sweep = time.perf_counter() - start
    n = len(run)
    sessions = _sessions(model, run[0]) if args.sessions else {}
    result = {**sessions,
        "cpu": cpu_line(), "windows": n, "tokens": int(sum(f["input_ids"].size for f in run)), "values": len(names),
        "forward_exposed_s": t_fwd / n, "grams_s": t_gram / n, "sweep_s_per_window": t_sweep / n,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _sessions(model, feed) -> dict:
    from graphc.core import session as sessions

    times: dict[str, list[float]] = {"serialized": [], "weightless": []}
    outs = {}
    for _ in range(3):
        for form, limit in (("serialized", 1 << 62), ("weightless", 0)):
            sessions.WEIGHTLESS_MIN = limit
            start = time.perf_counter()
            sess = sessions.make_session(model)
            times[form].append(time.perf_counter() - start)
            outs[form] = sess.run(None, feed)
            del sess
    same = all(np.array_equal(a, b) for a, b in zip(outs["serialized"], outs["weightless"]))
    return {"session_serialized_s": times["serialized"], "session_weightless_s": times["weightless"],
            "session_outputs_identical": same}


if __name__ == "__main__":
    raise SystemExit(main())

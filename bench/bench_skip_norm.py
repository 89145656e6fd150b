"""ONNX Runtime's fused skip + norm kernels against the split form ``split-skip-norm`` writes.

    python bench/bench_skip_norm.py [--threads 2] [--reps 15] [--json OUT]

One-node graphs (inputs [1, rows, hidden] with a dynamic sequence axis, as graphc's exports
have), each form in its own session at ORT's default optimization level (so that its own
SkipLayerNormFusion runs as it would for a user), alternating, median of ``reps`` rounds of 30
calls. Shapes: MiniLM's packed batch (229 tokens × 384) and a padded one (1024 × 384), a
SmolLM2 prefill (512 × 576) and a decode step (1 × 576). Prints the CPU, each pair's times,
the ratio and the largest output difference; the ops ORT kept after optimizing the split graph
show that it did not fuse the split form back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

SHAPES = [(229, 384), (1024, 384), (512, 576), (1, 576)]
CASES = [("SkipLayerNormalization", True), ("SkipSimplifiedLayerNormalization", False),
         ("SkipSimplifiedLayerNormalization", True)]


def graph(op: str, bias: bool, hidden: int, split: bool) -> bytes:
    rng = np.random.default_rng(0)
    shape = [1, "sequence", hidden]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [hidden], rng.uniform(lo, hi, hidden).astype(np.float32).tolist())
             for n, lo, hi in (("gamma", 0.5, 1.5), ("beta", -0.5, 0.5), ("bias", -0.5, 0.5))]
    simplified = op == "SkipSimplifiedLayerNormalization"
    if not split:
        ins = ["x", "s", "gamma"] + ([] if simplified else ["beta"]) + (["bias"] if bias else [])
        nodes = [helper.make_node(op, ins, ["y"], domain="com.microsoft", epsilon=1e-5)]
    else:  # the form split-skip-norm writes: (x + skip) + bias, then the plain op
        nodes = [helper.make_node("Add", ["x", "s"], ["sum"])]
        if bias:
            nodes.append(helper.make_node("Add", ["sum", "bias"], ["sum_b"]))
        total = "sum_b" if bias else "sum"
        if simplified:
            nodes.append(helper.make_node("SimplifiedLayerNormalization", [total, "gamma"], ["y"], axis=-1, epsilon=1e-5))
        else:
            nodes.append(helper.make_node("LayerNormalization", [total, "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "s")],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def kept_ops(model: bytes) -> list[str]:
    """The op types ONNX Runtime runs after optimizing ``model`` at its default level."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from graphc.checks import measure
    from graphc.core.target import cpu_line, cpu_summary

    print(cpu_line(), flush=True)
    rows = []
    rng = np.random.default_rng(1)
    for rows_n, hidden in SHAPES:
        feed = {"x": rng.standard_normal((1, rows_n, hidden)).astype(np.float32) * 3,
                "s": rng.standard_normal((1, rows_n, hidden)).astype(np.float32)}
        for op, bias in CASES:
            fused, split = (measure.session(graph(op, bias, hidden, s), threads=args.threads) for s in (False, True))
            kept = kept_ops(graph(op, bias, hidden, True))
            diff = float(np.abs(fused.run(None, feed)[0] - split.run(None, feed)[0]).max())
            times: dict[str, list[float]] = {"fused": [], "split": []}
            for _ in range(args.reps):
                for name, sess in (("fused", fused), ("split", split)):
                    t = time.perf_counter()
                    for _ in range(30):
                        sess.run(None, feed)
                    times[name].append((time.perf_counter() - t) / 30 * 1e6)
            f, s = statistics.median(times["fused"]), statistics.median(times["split"])
            row = {"op": op, "bias": bias, "rows": rows_n, "hidden": hidden, "fused_us": round(f, 1),
                   "split_us": round(s, 1), "ratio": round(s / f, 3), "max_diff": diff, "ort_kept": kept}
            rows.append(row)
            print(f"{op:34s} bias={bias!s:5s} {rows_n:5d} x {hidden}: fused {f:8.1f} us  split {s:8.1f} us  "
                  f"{s / f:5.2f}x  max diff {diff:.1e}  ORT ran {'+'.join(kept)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "onnxruntime": ort.__version__,
                                         "threads": args.threads, "reps": args.reps, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

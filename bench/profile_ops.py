"""Where an encoder's time goes, by op type: ONNX Runtime's profiler over 30 runs (after 5 warm-up runs) of MiniLM's
benchmark batch (8 held-out tweets padded to the longest, as bench_targets.py's "b8 padded to
longest"), 2 threads.

    python bench/profile_ops.py MODEL.onnx [MODEL.onnx ...]

Prints, per model, the kernel time per run and the 14 op types that take the most of it.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile

import onnxruntime as ort

import harness as b8  # bench/harness.py (the script's folder is on sys.path)
from graphc.models import get_model_spec

RUNS, WARMUP = 30, 5  # runs profiled, after warm-up runs left out


def kernel_times(session: ort.InferenceSession, warmup: int) -> tuple[collections.Counter, collections.Counter]:
    """Ends ``session``'s profiling: microseconds in kernels and kernel calls per op type, over
    the runs after the first ``warmup``."""
    trace = session.end_profiling()
    with open(trace, encoding="utf-8") as f:
        events = json.load(f)
    os.remove(trace)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after = starts[warmup] if len(starts) > warmup else 0
    by_op: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            by_op[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    return by_op, calls


def profile(path: str, feed: dict, threads: int = 2) -> tuple[float, list[tuple[str, float]]]:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling, so.log_severity_level = threads, True, 3
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    inputs = {k: v for k, v in feed.items() if k in names}
    for _ in range(WARMUP + RUNS):
        session.run(None, inputs)
    by_op, _ = kernel_times(session, WARMUP)
    total = sum(by_op.values())
    return total / RUNS / 1000, [(op, d / RUNS / 1000) for op, d in by_op.most_common(14)]


def main() -> None:
    recipe = get_model_spec("minilm")
    feed = recipe.feeds(recipe.eval_texts(8), batch=8, max_length=b8.SEQ)[0]
    print(f"CPU: {b8.cpu_name()}; batch 8 x {feed['attention_mask'].shape[1]}, "
          f"{int(feed['attention_mask'].sum())} real tokens; {RUNS} runs")
    for path in sys.argv[1:]:
        total, ops = profile(path, feed)
        print(f"{path}: {total:.2f} ms a run in kernels")
        for op, ms in ops:
            print(f"  {op:28s} {ms:7.3f} ms  {ms / total:6.1%}")


if __name__ == "__main__":
    main()

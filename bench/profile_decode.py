"""Where one decode step of an onnxruntime-genai folder goes, by op type: ONNX Runtime's profiler
over 40 single-token steps (after 5 warm-up steps) at a past of 512 tokens, 2 threads (``--threads``;
genai's own default on a 2-core machine without SMT is 1). A folder
in the ``past_present_share_buffer`` form gets what genai gives it: one buffer of ``max_buffer``
positions bound as both past and present (I/O binding); a separate-buffer folder gets pasts of
exactly 512 and new presents.

    python bench/profile_decode.py FOLDER [FOLDER ...] [--threads 2] [--rounds 1]

The first folder is profiled once unreported first (a process's first profile runs slow); with
``--rounds N`` the folders are profiled N times in turn and the medians printed. Prints, per
folder, the wall time of a step (the run call, profiler included), the kernel time per step
(the rest is the executor's own work between kernels), the number of kernels run per step, and the op
types that take the most of it (same inputs for every folder: run them in one call to compare);
then what a split LM head's logits reorder alone costs at 1 and at 512 tokens (the last-axis
``Gather`` it was written as before 2026-12-07, and the ``GatherElements`` it is now).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from profile_ops import kernel_times  # noqa: E402 - bench/ is not a package

STEPS, WARMUP, PAST = 40, 5, 512


def _feed(session: ort.InferenceSession, decoder: dict, shared: bool, max_buffer: int) -> dict:
    feed = {}
    heads, size = decoder["num_key_value_heads"], decoder["head_size"]
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = np.array([[42]], np.int64)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((1, PAST + 1), np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.array([[PAST]], np.int64)
        elif i.name.startswith("past_key_values"):
            length = max_buffer if shared else PAST
            feed[i.name] = np.random.default_rng(0).standard_normal((1, heads, length, size)).astype(np.float32)
    return feed


def profile(folder: Path, threads: int = 2, max_buffer: int = 1024
            ) -> tuple[float, int, list[tuple[str, float, int]], float]:
    """(kernel ms a step, kernels a step, the top op types as (op, ms, calls), wall ms a step)."""
    config = json.loads((folder / "genai_config.json").read_text())
    shared = bool(config["search"].get("past_present_share_buffer"))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling, so.log_severity_level = threads, True, 3
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(str(folder / config["model"]["decoder"]["filename"]), so,
                                   providers=["CPUExecutionProvider"])
    feed = _feed(session, config["model"]["decoder"], shared, max_buffer)
    binding = session.io_binding()  # as genai runs it: each past and its present are one buffer (shared form)
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        past = out.name.replace("present.", "past_key_values.")
        if shared and past in values:
            binding.bind_ortvalue_output(out.name, values[past])
        else:
            binding.bind_output(out.name, "cpu")
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            start = time.perf_counter()
        session.run_with_iobinding(binding)  # the same step again: the buffer's slot is overwritten in place
    wall = (time.perf_counter() - start) / STEPS * 1000
    by_op, calls = kernel_times(session, WARMUP)
    total = sum(by_op.values())
    ops = [(op, d / STEPS / 1000, calls[op] // STEPS) for op, d in by_op.most_common(12)]
    return total / STEPS / 1000, sum(calls.values()) // STEPS, ops, wall


def reorder_ms(seq: int, op: str = "Gather", vocab: int = 49152, threads: int = 2, reps: int = 5) -> float:
    """Median time of a split LM head's logits reorder (``split-vocab``) on [1, seq, vocab] by a
    permutation: a last-axis ``Gather`` (its form before 2026-12-07) or the ``GatherElements``
    over the permutation expanded to the logits' shape it writes now (int32, as the pass stores it)."""
    from onnx import TensorProto, helper, numpy_helper

    perm = np.random.default_rng(0).permutation(vocab)
    if op == "Gather":
        nodes = [helper.make_node("Gather", ["x", "perm"], ["y"], axis=-1)]
        inits = [numpy_helper.from_array(perm.astype(np.int64), "perm")]
    else:
        nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Expand", ["perm", "shape"], ["wide"]),
                 helper.make_node("GatherElements", ["x", "wide"], ["y"], axis=-1)]
        inits = [numpy_helper.from_array(perm.astype(np.int32), "perm")]
    graph = helper.make_graph(nodes, "reorder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, vocab])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, vocab])], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = {"x": np.random.default_rng(1).random((1, seq, vocab), dtype=np.float32)}
    assert np.array_equal(session.run(None, x)[0], x["x"][..., perm])
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, x)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main() -> None:
    import argparse
    import statistics

    import harness

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"CPU: {harness.cpu_name()}; one token after a past of {PAST}; {STEPS} steps, {args.threads} thread(s), "
          f"median of {args.rounds} round(s)")
    # the first folder profiled in a process ran ~20% slower than the same folder again (measured
    # 19.6 vs 15.9 ms a step): one unreported pass over it first
    profile(args.folders[0], args.threads)
    runs: dict[Path, list] = {path: [] for path in args.folders}
    for _ in range(args.rounds):
        for path in args.folders:
            runs[path].append(profile(path, args.threads))
    for path, results in runs.items():
        total = statistics.median(r[0] for r in results)
        wall = statistics.median(r[3] for r in results)
        kernels, ops = results[0][1], results[0][2]
        print(f"{path}: {wall:.2f} ms a step, of which {total:.2f} ms in {kernels} kernels")
        for op, _, n in ops:
            ms = statistics.median(dict((o, m) for o, m, _ in r[2]).get(op, 0.0) for r in results)
            print(f"  {op:34s} {ms:7.3f} ms  {ms / total:6.1%}  ({n} calls)")
    for op in ("Gather", "GatherElements"):
        print(f"a split head's logits reorder over 49,152 columns by {op}: {reorder_ms(1, op):.2f} ms at "
              f"1 token, {reorder_ms(512, op):.1f} ms at 512")


if __name__ == "__main__":
    main()

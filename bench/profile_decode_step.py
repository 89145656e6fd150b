"""Where a decode step's time goes: ONNX Runtime's profiler over greedy decode steps, per op type.

    python bench/profile_decode_step.py FOLDER [FOLDER ...] [--rounds 2] [--prompt 512] [--steps 64]
                                        [--threads 1] [--json OUT.json]

Each folder's ``model.onnx`` (a KV-cache decoder: a genai folder, the model builder's or
graphc's) runs in a fresh process per round, the folders interleaved: a prompt of ``--prompt``
random token ids, then ``--steps`` greedy decode steps through ``graphc.front.generate.Decoder``
(shared buffers where the model has that form) on ``--threads`` ONNX Runtime threads (genai's
default on a 2-core machine without SMT is one). Printed per folder (median over rounds): the
wall time of a step's ``run`` as ONNX Runtime's profiler records it, the sum of its kernels'
times, the difference (the executor's own work between nodes), and the kernel time and count
of each op type a step. The profiler adds a little to every node; compare folders with each
other, not with untimed runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(folder: Path, prompt: int, steps: int, threads: int) -> dict:
    """One folder's profile, in this process."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from graphc.front.generate import Decoder

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "decode")
        session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        decoder = Decoder(folder / "model.onnx", session=session)
        ids = np.random.default_rng(0).integers(100, 40000, size=(1, prompt))
        decoder.greedy(ids, steps + 1)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]  # after the prefill
    start = runs[0]["ts"]
    time_by_op: collections.Counter = collections.Counter()
    count_by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"].get("op_name", "?")
            time_by_op[op] += e["dur"]
            count_by_op[op] += 1
    n = len(runs)
    run_us = sum(r["dur"] for r in runs) / n
    kernel_us = sum(time_by_op.values()) / n
    return {"steps": n, "run_us": run_us, "kernel_us": kernel_us, "between_us": run_us - kernel_us,
            "ops": {op: {"us": t / n, "nodes": count_by_op[op] / n} for op, t in time_by_op.most_common()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one folder, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.folders[0], args.prompt, args.steps, args.threads)))
        return 0
    from graphc.core.target import cpu_line

    results: dict[str, list[dict]] = {str(f): [] for f in args.folders}
    for _ in range(args.rounds):
        for folder in args.folders:
            out = subprocess.run([sys.executable, __file__, str(folder), "--one", "--prompt", str(args.prompt),
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            results[str(folder)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{cpu_line()}. Prompt {args.prompt}, {args.steps} decode steps, {args.threads} thread(s), "
          f"median of {args.rounds} rounds (us a step).")
    summary = {}
    for folder, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in ("run_us", "kernel_us", "between_us")}
        ops = {op: statistics.median(r["ops"].get(op, {}).get("us", 0.0) for r in rounds) for op in rounds[0]["ops"]}
        nodes = {op: rounds[0]["ops"][op]["nodes"] for op in rounds[0]["ops"]}
        summary[folder] = {**med, "ops": {op: {"us": ops[op], "nodes": nodes[op]} for op in ops}, "rounds": rounds}
        print(f"{folder}: run {med['run_us']:.0f}, kernels {med['kernel_us']:.0f}, between nodes {med['between_us']:.0f}")
        for op in sorted(ops, key=ops.get, reverse=True)[:8]:
            print(f"    {op:34s} {ops[op]:7.0f} us  {nodes[op]:6.1f} nodes")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "config": {k: str(v) if isinstance(v, Path) else v
                                                                       for k, v in vars(args).items() if k != "one"},
                                         "folders": summary}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

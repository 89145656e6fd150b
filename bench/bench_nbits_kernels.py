"""One ``MatMulNBits`` node per bit width and accuracy level, timed on this CPU at decode (M = 1) and
prefill (M = 512) shapes of SmolLM2's projections.

    python bench/bench_nbits_kernels.py [--block 64] [--threads 2]

Each (K, N) builds 4-bit and 8-bit asymmetric RTN weights of one random matrix and runs them at
accuracy level 1 (float32 compute) and 4 (int8 activations), interleaved; prints median
milliseconds per call and the CPU. Which kernel ONNX Runtime picks differs per instruction set,
so the answer is per machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from graphc.core.target import cpu_line
from graphc.passes import _blockquant as bq

SHAPES = ((576, 1536), (1536, 576), (576, 192))  # gate/up, down, k/v


def session(w: np.ndarray, bits: int, block: int, level: int, threads: int) -> ort.InferenceSession:
    n, k = w.shape
    q = bq.quantize(w, bits, block, symmetric=False, method=bq.Method.RTN, scale_dtype=np.float32)
    b, s, zp = bq.matmul_nbits_arrays(q)
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(s.astype(np.float32), "S")]
    inputs = ["x", "B", "S"]
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(cpu_line())
    print(f"median ms per call, block {args.block}, {args.threads} threads")
    print("| K × N | M | 4-bit level 1 | 4-bit level 4 | 8-bit level 1 | 8-bit level 4 |")
    print("|---|--:|--:|--:|--:|--:|")
    for k, n in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        sessions = {(bits, level): session(w, bits, args.block, level, args.threads) for bits in (4, 8) for level in (1, 4)}
        for m in (1, 512):
            x = rng.standard_normal((m, k)).astype(np.float32)
            times: dict[tuple[int, int], list[float]] = {key: [] for key in sessions}
            for _ in range(3):
                for s in sessions.values():
                    s.run(None, {"x": x})
            for _ in range(200 if m == 1 else 20):
                for key, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, {"x": x})
                    times[key].append(time.perf_counter() - t0)
            cells = " | ".join(f"{np.median(times[key]) * 1e3:.3f}" for key in sorted(sessions))
            print(f"| {k} × {n} | {m} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

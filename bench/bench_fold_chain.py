"""fold-constants on long chains: seconds against chain length (linear expected).

    python bench/bench_fold_chain.py [--sizes 2500 5000 10000 20000] [--upstream]

Two chains of ``Add(prev, one)``: ``activation`` starts from the graph input (nothing folds;
the rewrite rules are tried on every node), ``constant`` starts from an initializer (every
node folds). ``--upstream`` times onnxscript's own ``optimize_ir`` instead, for comparison.
Each size runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def chain_model(n: int, kind: str):
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    prev = "one" if kind == "constant" else "x"
    nodes = []
    for i in range(n):
        nodes.append(helper.make_node("Add", [prev, "one"], [f"v{i}"]))
        prev = f"v{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "one")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def one(n: int, kind: str, upstream: bool) -> float:
    model = chain_model(n, kind)
    start = time.perf_counter()
    if upstream:
        from onnxscript.optimizer import optimize_ir

        from graphc.passes.cleanup import _should_fold

        optimize_ir(model, num_iterations=2, should_fold=_should_fold)
    else:
        from graphc.core.pass_base import PassContext
        from graphc.core.registry import get_pass

        get_pass("fold-constants").from_dict({}, PassContext())(model)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    ap.add_argument("--upstream", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("N", "KIND"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.upstream)))
        return
    print(f"{'kind':12s} {'nodes':>7s} {'seconds':>8s} {'us/node':>8s}")
    for kind in ("activation", "constant"):
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(n), kind] + (["--upstream"] if args.upstream else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            s = float(out)
            print(f"{kind:12s} {n:7d} {s:8.2f} {1e6 * s / n:8.0f}", flush=True)


if __name__ == "__main__":
    main()

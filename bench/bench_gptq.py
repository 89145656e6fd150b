"""GPTQ's speed against another commit's implementation, on SmolLM2-135M's layer shapes.

    python bench/bench_gptq.py [--against COMMIT] [--reps 3] [--json OUT]

The ``gptq`` of ``passes/_blockquant.py`` as it is ("old" below) and as it is at ``--against``
("new", read with ``git show``; default: 1ca9bdb, two-level lazy updates and the inverse
factor from a reversed Cholesky, not adopted: see docs/results.md), on random weights with the
shapes of SmolLM2-135M's projections (q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536) and a correlated Hessian, with the decoder ``int4`` recipe's settings (4 bits, block
64, act order, damp 0.1). In one process, the two alternating; reports the best of ``--reps``
per shape, the codes that differ and the output losses tr(D H D^T) of both, and the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536)}


def _other_module(commit: str, folder: Path):
    source = subprocess.run(["git", "show", f"{commit}:passes/_blockquant.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = folder / "_blockquant_other.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("graphc.passes._blockquant_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="1ca9bdb")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from graphc.core.target import cpu_line
    from graphc.passes import _blockquant as old

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        new = _other_module(args.against, Path(tmp))
        rng = np.random.default_rng(0)
        for label, (n, k) in SHAPES.items():
            mix = rng.standard_normal((k, k)) * 0.2 + np.eye(k)
            xs = rng.standard_normal((4096, k)) @ mix
            xs[:, :8] *= 10  # a few large channels, as after a transformer's norms
            h = xs.T @ xs / len(xs)
            w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
            best = {"old": np.inf, "new": np.inf}
            out = {}
            for _ in range(args.reps):
                for name, mod in (("old", old), ("new", new)):
                    start = time.perf_counter()
                    out[name] = mod.gptq(w, h, 4, 64, symmetric=False, act_order=True, damp=0.1)
                    best[name] = min(best[name], time.perf_counter() - start)
            losses = {}
            for name, q in out.items():
                d = w.astype(np.float64) - q.dequantize()
                losses[name] = float(np.einsum("ij,jk,ik->", d, h, d))
            rows.append({"shape": label, "n": n, "k": k, "old_s": round(best["old"], 4), "new_s": round(best["new"], 4),
                         "speedup": round(best["old"] / best["new"], 2),
                         "codes_differ": float(np.mean(out["old"].q != out["new"].q)),
                         "loss_old": float(f"{losses['old']:.6g}"), "loss_new": float(f"{losses['new']:.6g}")})
            print(json.dumps(rows[-1]), flush=True)
    print(cpu_line())
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "against": args.against, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

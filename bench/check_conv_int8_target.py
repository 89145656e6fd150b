"""Run the int8 Conv recipe's result on this CPU and print its outputs' agreement with fp32.

Run it on the host and under an emulated AVX2 CPU (qemu-user runs ONNX Runtime's real AVX2
kernels) to check that the int8 Conv formulation is exact there too:

    python bench/check_conv_int8_target.py MODEL.onnx H W
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python bench/check_conv_int8_target.py MODEL.onnx H W

It compresses with ``--target x86-avx2`` (the same file whatever CPU runs the script), feeds
one fixed image-like input, and prints the ISA ONNX Runtime sees, the max abs difference to
fp32, and the int8 model's first outputs (equal on both machines when the arithmetic
does not depend on the ISA beyond float rounding)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    model, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from graphc.front.api import compress
    from graphc.core.target import host
    from graphc.checks.validate import make_session

    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "int8.onnx"
        compress(model, out, recipe="int8", target="x86-avx2", validate=False)
        ref = make_session(model).run(None, {"x": x})[0]
        got = make_session(out).run(None, {"x": x})[0]
    print(f"host target {host().name}; max abs vs fp32 {np.abs(ref - got).max():.6g}; "
          f"int8 output[0] {[f'{v:.9g}' for v in got.ravel()[:2]]}")


if __name__ == "__main__":
    main()

"""Peak memory of one ``quantize-nbits`` work item (``quantize_job``: GPTQ, the relative error,
the weight's digest) on a random weight, above what its inputs hold.

    python bench/job_memory.py [--rows 32000] [--cols 4096] [--bits 4]

A random float32 ``rows`` x ``cols`` weight (an LM head by default: the 8 GB synthetic Llama's
32000 x 4096) and a float64 Hessian from 512 random tokens are built, the peak is reset
(Linux: ``/proc/self/clear_refs``), then the item runs with the decoder ``int4`` recipe's
settings (GPTQ, block 64, act order, damp 0.1, asymmetric, float16 scales). Printed: VmHWM
during the item less VmRSS before it, the memory still held after, the time, the CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _status() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    from graphc.core.target import cpu_name
    from graphc.passes import quantize_nbits as qn

    rng = np.random.default_rng(0)
    w_t = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    x = rng.standard_normal((512, args.cols), dtype=np.float32)
    hessian = (x.T @ x).astype(np.float64) / 512
    del x
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status()[0]
    start = time.perf_counter()
    options = qn._JobOptions(symmetric=False, scale_dtype="float16", damp=0.1, act_order=True, refit_scales=False)
    result = qn.quantize_job(options, qn._Job(w_t, hessian, "gptq", args.bits, 64))
    seconds = time.perf_counter() - start
    rss, peak = _status()
    print(f"CPU: {cpu_name()}")
    print(f"{args.rows} x {args.cols}, {args.bits}-bit GPTQ: peak {(peak - before) / 1e9:.2f} GB above the inputs, "
          f"{(rss - before) / 1e9:.2f} GB held after (the codes), {seconds:.0f} s; relative error {result[1]:.4f}")


if __name__ == "__main__":
    main()

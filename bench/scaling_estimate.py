"""On paper: the int4 recipe's sensitivity probes for Llama shapes (135M, 1B, 8B, 70B) on N Ray
workers. Prints the markdown tables of docs/distributed.md; computes, measures nothing.

    python bench/scaling_estimate.py [--core-gflops 30] [--probe-tokens 1024] [--hessian-tokens 65536]
                                     [--gbit 10] [--cores-per-node 16] [--workers 1,16,64,256,562]

What one probe is (graphc.passes.mixed_precision, as the int4 recipe runs it): GPTQ of one
weight on its input Hessian, then one forward pass of the whole model on the probe feeds with
only that weight replaced. So:

- probes = one per planned weight: 7 MatMuls per decoder layer (q, k, v, o, gate, up, down),
  the LM head, and the embedding table when it is not tied to the head;
- GPTQ layers (quantize-nbits) = the MatMuls and the head;
- shared once per node (Ray's object store; the workers of a node map it zero-copy): the fp32
  weights, the probe feeds and the reference outputs (logits: tokens x vocab floats);
- moved per probe: the item (~0.5 KB), the layer's Hessian (K x K float64, sent with the item),
  the result (~0.2 KB);
- compute per probe: 2 x params x tokens (the forward pass; attention's own products ignored)
  plus GPTQ's ~2 x N x K^2 + K^3 / 3 flops;
- serial before the probes, in the driver today: collecting the Hessians (one forward pass on
  ``--hessian-tokens``, plus K^2 x tokens accumulation per distinct input).

Assumptions, not measurements: ``--core-gflops`` is the fp32 throughput one worker (one core,
one ONNX Runtime thread) sustains; 30 GFLOP/s is what bench/bench_ray.py's MiniLM probes reached
on one Ray worker of a shared 2-core Sapphire Rapids VM (38 probes of ~34 GFLOP in 42.8 s, GPTQ
included, load average ~4): a quiet AVX-512 core does more, so the times are on the high side.
The network is one ``--gbit`` link out of the head node (a pessimistic bound: Ray also copies
objects between workers' nodes); machine-hours count nodes of ``--cores-per-node`` cores.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def matmuls(self) -> list[tuple[int, int]]:
        """(K, N) of every planned MatMul: K the input width (the Hessian's side)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        block = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
        return block * self.layers + [(h, self.vocab)]  # + the LM head

    @property
    def params(self) -> int:
        body = sum(k * n for k, n in self.matmuls())
        return body + (0 if self.tied else self.vocab * self.hidden)

    @property
    def probes(self) -> int:
        return len(self.matmuls()) + (0 if self.tied else 1)


SHAPES = [
    Shape("135M (SmolLM2-135M)", 576, 1536, 30, 9, 3, 64, 49152, True),
    Shape("1B (Llama-3.2-1B)", 2048, 8192, 16, 32, 8, 64, 128256, True),
    Shape("8B (Llama-3.1-8B)", 4096, 14336, 32, 32, 8, 128, 128256, False),
    Shape("70B (Llama-3.1-70B)", 8192, 28672, 80, 64, 8, 128, 128256, False),
]


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def hours(s: float) -> str:
    return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.0f} min" if s >= 60 else f"{s:,.0f} s"


def estimate(s: Shape, a: argparse.Namespace) -> dict:
    rate = a.core_gflops * 1e9
    bw = a.gbit * 1e9 / 8
    mm = s.matmuls()
    forward = 2 * s.params * a.probe_tokens
    gptq = [2 * n * k * k + k ** 3 / 3 for k, n in mm]
    t_probe = [(forward + g) / rate for g in gptq] + ([forward / rate] if not s.tied else [])
    hess_bytes = [8 * k * k for k, _ in mm]
    shared = 4 * s.params + a.probe_tokens * (8 + 4 * s.vocab)  # weights; feeds; reference logits
    # one Hessian per distinct MatMul input: q/k/v share one, gate/up one, o and down their own; the head
    inputs = [s.hidden, s.heads * s.head_dim, s.hidden, s.intermediate] * s.layers + [s.hidden]
    serial = (2 * s.params * a.hessian_tokens + sum(2 * k * k for k in inputs) * a.hessian_tokens) / rate
    return {"probes": s.probes, "gptq_layers": len(mm), "params": s.params, "shared": shared,
            "per_probe_mean": sum(hess_bytes) / len(t_probe) + 700, "per_probe_max": max(hess_bytes) + 700,
            "t_probe": t_probe, "t_total": sum(t_probe), "serial": serial, "bw": bw,
            # workers one head link keeps busy: each needs its probe's bytes within a probe's time
            "net_bound_workers": bw * (sum(t_probe) / len(t_probe)) / (sum(hess_bytes) / len(t_probe) + 700)}


def wall(e: dict, n: int, a: argparse.Namespace, spread_hessians: bool = False) -> float:
    """Serial part + the shared broadcast to every node + the probes in waves of n (longest first);
    ``spread_hessians``: the Hessians collected data-parallel on the same n workers instead."""
    nodes = math.ceil(n / a.cores_per_node)
    loads = [0.0] * n
    for t in sorted(e["t_probe"], reverse=True):
        loads[loads.index(min(loads))] += t
    probes = max(loads)
    net = max(nodes * e["shared"] / e["bw"], e["probes"] * e["per_probe_mean"] / e["bw"])
    return (e["serial"] / n if spread_hessians else e["serial"]) + probes + net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--core-gflops", type=float, default=30.0)
    p.add_argument("--probe-tokens", type=int, default=1024, help="2 feeds of 512 tokens (SmolLM2's recipe)")
    p.add_argument("--hessian-tokens", type=int, default=65536, help="SmolLM2's recipe: 128 feeds x 512")
    p.add_argument("--gbit", type=float, default=10.0)
    p.add_argument("--cores-per-node", type=int, default=16)
    p.add_argument("--workers", default="1,16,64,256,562")
    a = p.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    est = [(s, estimate(s, a)) for s in SHAPES]
    print(f"Assumptions: {a.core_gflops:g} GFLOP/s per worker core, {a.probe_tokens} probe tokens, "
          f"{a.hessian_tokens} Hessian tokens, {a.gbit:g} Gbit/s out of the head node, {a.cores_per_node} cores a node.\n")
    print("| model | params | probes | GPTQ layers | shared once per node | per probe (mean / max) | "
          "one probe, 1 core | all probes, 1 core | serial part (Hessians) | workers before the head's link is the bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, e in est:
        print(f"| {s.name} | {e['params'] / 1e9:.2f} B | {e['probes']} | {e['gptq_layers']} | {gb(e['shared'])} | "
              f"{gb(e['per_probe_mean'])} / {gb(e['per_probe_max'])} | {hours(sum(e['t_probe']) / len(e['t_probe']))} | "
              f"{hours(e['t_total'])} | {hours(e['serial'])} | {e['net_bound_workers']:,.0f} |")
    for spread, title in ((False, "as graphc runs it today (Hessians collected in the driver, serially)"),
                          (True, "if the Hessians were collected data-parallel on the same workers")):
        print(f"\nWall time and machine-hours (mh: nodes of {a.cores_per_node} cores x wall), {title}:\n")
        print("| model | " + " | ".join(f"{n} workers" for n in workers) + " |")
        print("|---|" + "---:|" * len(workers))
        for s, e in est:
            cells = []
            for n in workers:
                t = wall(e, min(n, e["probes"]), a, spread)
                cells.append(f"{hours(t)} ({math.ceil(n / a.cores_per_node) * t / 3600:,.1f} mh)")
            print(f"| {s.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

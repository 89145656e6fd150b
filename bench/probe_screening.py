"""Would short probes screen the plan? A simulation from two `graphc compress --json` runs.

    python bench/probe_screening.py FULL.json SHORT.json [--factors 1.5,2,3] [--json OUT]

FULL.json: a run of the built-in ``int4`` (its decoder form: ``mixed-precision`` probes every
weight at int4/b64 on one 512-token window); SHORT.json: the same command with ``--set
mixed-precision.probe_tokens=N`` (the probes on the window's first N tokens). From their
``mixed-precision`` stats (each layer's measured KL, the probes' seconds) this prints how well
the short KLs rank the layers, and what a two-stage plan would have cost and chosen: every layer
probed short, the short KLs rescaled by their median ratio to the full ones, then only the layers
whose marginal rate (KL saved per byte by going from 4 to 8 bits) lies within a factor f of the
plan's threshold probed again at full length. The plan here is a simplified knapsack (4 or 8
bits, the byte difference taken as half a byte a weight, the real plan's 8-bit bytes as the
budget), not the pass's planner; it is judged by the full probes' KL of the layers it leaves at
4 bits. Nothing is run: the time of a two-stage run is estimated from the two runs' probe
seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _stats(path: str) -> dict:
    run = json.loads(Path(path).read_text())
    return next(p["stats"] for p in run["passes"] if p["name"] == "mixed-precision")


def _kl(stats: dict, config: str = "int4/b64") -> dict[str, float]:
    return {s["layer"]: s["error"] for s in stats["sensitivities"] if s["config"] == config}


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def simulate(full: dict, short: dict, factors: list[float]) -> dict:
    f4, s4 = _kl(full), _kl(short)
    names = sorted(f4)
    weight_bytes = {c["layer"]: 0.5 * c["params"] for c in full["choices"]}  # 4 -> 8 bits: half a byte a weight
    budget = sum(weight_bytes[c["layer"]] for c in full["choices"] if c["bits"] == 8)

    def plan(kl: dict[str, float]) -> set[str]:
        chosen, used = set(), 0.0
        for n in sorted(names, key=lambda n: -kl[n] / weight_bytes[n]):
            if used + weight_bytes[n] <= budget:
                chosen.add(n)
                used += weight_bytes[n]
        return chosen

    def left_kl(eight: set[str]) -> float:  # the full probes' KL of what stays at 4 bits
        return round(sum(f4[n] for n in names if n not in eight), 6)

    ratios = sorted(s4[n] / f4[n] for n in names if f4[n] > 0)
    scale = statistics.median(ratios)
    scaled = {n: s4[n] / scale for n in names}
    reference, screened = plan(f4), plan(scaled)
    rate = {n: scaled[n] / weight_bytes[n] for n in names}
    inside = [rate[n] for n in screened]
    outside = [rate[n] for n in names if n not in screened]
    threshold = (min(inside) * max(outside)) ** 0.5 if inside and outside else 0.0
    per_full = full["probe_s"] / len(names)
    out = {
        "layers": len(names), "probe_s_full": full["probe_s"], "probe_s_short": short["probe_s"],
        "short_over_full_kl": {"median": round(scale, 4), "p10": round(ratios[len(ratios) // 10], 4),
                               "p90": round(ratios[9 * len(ratios) // 10], 4)},
        "rank_correlation": round(_spearman([s4[n] for n in names], [f4[n] for n in names]), 4),
        "full_plan_left_kl": left_kl(reference),
        "short_plan": {"differs_by": len(screened ^ reference), "left_kl": left_kl(screened)},
        "two_stage": {},
    }
    for f in factors:
        again = {n for n in names if threshold / f <= rate[n] <= threshold * f}
        mixed = plan({n: f4[n] if n in again else scaled[n] for n in names})
        out["two_stage"][str(f)] = {"probed_again": len(again), "differs_by": len(mixed ^ reference),
                                    "left_kl": left_kl(mixed),
                                    "estimated_probe_s": round(short["probe_s"] + len(again) * per_full, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full")
    parser.add_argument("short")
    parser.add_argument("--factors", default="1.5,2,3")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    res = simulate(_stats(args.full), _stats(args.short), [float(f) for f in args.factors.split(",")])
    from harness import print_json  # bench/harness.py (the script's folder is on sys.path)

    print_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

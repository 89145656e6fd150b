"""The planner's predicted error against its byte budget, from one recorded run's probes.

    python bench/plan_curve.py DUMP.json --mb 84.1 88 92.83 100 111.3 [--json OUT.json]

DUMP.json comes from ``bench/probe_dump.py`` (a ``--recipe int4`` run on a decoder: every
layer's options with bytes and predicted KL). The recorded planner call is solved again at each
budget (MB of planned weights; the bytes outside the planned layers as recorded), nothing
measured again: how the plan's predicted KL, and so the perplexity rise it predicts
(exp(KL) - 1), falls as bytes are added. The planner predicts too little on held-out text
(docs/results.md): read the curve for its shape and for where a measured point sits on it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path)
    parser.add_argument("--mb", type=float, nargs="+", required=True, help="budgets, MB (1e6 B) of planned weights")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from graphc.passes._plan import precision as pp

    call = json.loads(args.dump.read_text())["plans"][-1]
    layers = [[pp.Option(o["label"], o["nbytes"], o["error"]) for o in opts] for opts in call["layers"]]
    kwargs = dict(call["kwargs"])
    rows = []
    print(f"recorded budget {kwargs['max_bytes'] / 1e6:.2f} MB, {kwargs['fixed_bytes']:,.0f} B outside the layers")
    print("| budget (MB) | predicted KL | predicted rise | 8-bit layers |")
    print("|--:|--:|--:|--:|")
    for mb in args.mb:
        kwargs["max_bytes"] = int(mb * 1e6)
        pick = pp.plan(layers, **kwargs)
        kl = sum(layers[i][j].error for i, j in enumerate(pick))
        eight = sum(layers[i][j].label.startswith("int8") for i, j in enumerate(pick))
        rows.append({"budget_mb": mb, "predicted_kl": kl, "predicted_rise": math.expm1(kl), "layers_at_8_bits": eight})
        print(f"| {mb:.2f} | {kl:.4f} | {math.expm1(kl):+.2%} | {eight} |")
    if args.json:
        args.json.write_text(json.dumps({"dump": str(args.dump), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

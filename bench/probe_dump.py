"""Record what `mixed-precision`'s probes measured, for studies of the plan without re-running them.

    python bench/probe_dump.py OUT.json -- compress IN -o OUT.onnx --recipe int4 --json

Runs the graphc command line (everything after ``--``) in this process and writes OUT.json: for
each probed layer (in plan order) its weight's name, the measured output error (KL) of each
probe configuration, the round-to-nearest weight error of every candidate (relative, in the
Hessian's norm for GPTQ probes), and tr(W H W^T) where a Hessian was given; and the planner's
call (each layer's options with bytes and predicted errors, the byte budget, the bytes outside
the layers, its pick). Nothing in the run changes: the probe and planner functions are wrapped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then graphc's arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give graphc's arguments after --")

    from graphc.front.cli import main as graphc_main
    from graphc.passes import _probes
    from graphc.passes import _sensitivity as sens
    from graphc.passes._plan import precision as pp

    probes, plans = [], []
    probe_layer, plan = _probes.probe_layer, pp.plan

    def recorded_probe(shared, item):
        result = probe_layer(shared, item)
        den = None
        if item.hessian is not None:
            view = _probes.item_view(item, _probes._evaluator(shared).weights)
            den = sens.hessian_norm2(view, item.hessian)
        probes.append({"weight": item.weight, "members": [m[0] for m in item.members], "method": item.method,
                       "measured": {c.label: v for c, v in result.measured.items()},
                       "weight_error": {c.label: v for c, v in result.weight_error.items()}, "hessian_norm2": den})
        return result

    def recorded_plan(layers, **kw):
        pick = plan(layers, **kw)
        plans.append({"layers": [[{"label": o.label, "nbytes": o.nbytes, "error": o.error} for o in opts]
                                 for opts in layers],
                      "kwargs": {k: v for k, v in kw.items() if k != "pass_name"}, "pick": pick})
        return pick

    _probes.probe_layer, pp.plan = recorded_probe, recorded_plan
    code = graphc_main(command)
    args.out.write_text(json.dumps({"command": command, "probes": probes, "plans": plans}, indent=1))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""Could fewer probes plan as well? Predict the unprobed layers' KL from the probed ones, re-plan.

    python bench/probe_interpolation.py DUMP.json [--strides 2 3 4] [--json OUT.json]

DUMP.json comes from ``bench/probe_dump.py`` (a full ``--recipe int4`` run on a decoder). Each
probed layer has a measured KL at the probe configuration and a round-to-nearest weight error
``e`` (relative, in its input Hessian's norm). A layer's gain ``KL / e^2`` says how much of its
output error reaches the next-token distribution. Here only the layers of every ``stride``-th
block (the first and last blocks always, and everything outside the blocks, such as an LM
head's tiers) keep their measured KL; each other layer's gain is interpolated along the depth
from the probed layers of its own role (q/k/v/o/gate/up/down projections), linearly in log
gain, and its options' errors are scaled by predicted over measured KL. The planner then runs
with the recorded budget, and its pick is scored with the measured errors: the predicted KL of
the plan each stride gives, against the full plan's (lower is better; the full plan is the
optimum of the measured errors). Also printed: Spearman correlation of predicted and measured
KL over the unprobed layers, and how many layers' choices differ.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_BLOCK = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+?)(?:_proj)?\.weight$")


def roles(probes: list[dict], per_block: int) -> list[tuple[str | None, int | None]]:
    """(role, block) of each probed layer: by name where the weight has its module's name
    (model.layers.3.self_attn.q_proj.weight), else by position: the layers after those outside
    the blocks (an LM head's tiers: named ``..._tierN``) in topological order, ``per_block`` a
    block (a Llama block's q, k, v, o, gate, up, down: 7)."""
    named = [_BLOCK.search(p["weight"]) for p in probes]
    if all(m or "_tier" in p["weight"] for m, p in zip(named, probes)):
        return [(m.group(2), int(m.group(1))) if m else (None, None) for m in named]
    out, k = [], 0
    for p in probes:
        if "_tier" in p["weight"]:
            out.append((None, None))
        else:
            out.append((f"#{k % per_block}", k // per_block))
            k += 1
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


FEATURES = ("relative", "absolute", "none")


def predict(probes: list[dict], stride: int, label: str, per_block: int = 7, feature: str = "relative"
            ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted KL at ``label``, probed mask) for every layer. The gain interpolated is the KL
    over ``feature``: the relative weight error squared, that times tr(W H W^T) (``absolute``), or
    1 (``none``: the KL itself)."""
    kl = np.array([p["measured"][label] for p in probes])
    err = np.array([p["weight_error"][label] for p in probes]) ** 2
    if feature == "absolute":
        err = err * np.array([p["hessian_norm2"] or 1.0 for p in probes])
    elif feature == "none":
        err = np.ones_like(kl)
    gain = kl / np.maximum(err, 1e-30)
    roles_ = roles(probes, per_block)
    depths = [d for _, d in roles_ if d is not None]
    last = max(depths) if depths else 0
    probed = np.array([d is None or d % stride == 0 or d == last for _, d in roles_])
    pred = kl.copy()
    for i, (role, depth) in enumerate(roles_):
        if probed[i]:
            continue
        known = sorted((d, np.log(gain[j])) for j, (r, d) in enumerate(roles_) if probed[j] and r == role and d is not None)
        xs, ys = [k[0] for k in known], [k[1] for k in known]
        pred[i] = np.exp(np.interp(depth, xs, ys)) * err[i]
    return pred, probed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path)
    parser.add_argument("--strides", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--feature", choices=FEATURES, default="relative",
                        help="what the KL is divided by before interpolating (see predict)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from graphc.passes._plan import precision as pp

    data = json.loads(args.dump.read_text())
    probes, call = data["probes"], data["plans"][-1]
    label = next(iter(probes[0]["measured"]))
    layers = [[pp.Option(o["label"], o["nbytes"], o["error"]) for o in opts] for opts in call["layers"]]
    if len(layers) != len(probes):
        raise SystemExit(f"{len(layers)} planned layers but {len(probes)} probes: not one probe per layer")
    kwargs = call["kwargs"]
    full = call["pick"]

    def score(pick: list[int]) -> float:
        return sum(layers[i][j].error for i, j in enumerate(pick))

    rows = [{"stride": 1, "probes": len(probes), "plan_kl": score(full), "choices_differ": 0, "spearman": 1.0}]
    kl = np.array([p["measured"][label] for p in probes])
    for stride in args.strides:
        pred, probed = predict(probes, stride, label, feature=args.feature)
        scaled = [[pp.Option(o.label, o.nbytes, o.error * (pred[i] / kl[i] if kl[i] > 0 else 1.0)) for o in opts]
                  for i, opts in enumerate(layers)]
        pick = pp.plan(scaled, **kwargs)
        rows.append({"stride": stride, "probes": int(probed.sum()), "plan_kl": score(pick),
                     "choices_differ": sum(a != b for a, b in zip(pick, full)),
                     "spearman": spearman(pred[~probed], kl[~probed]),
                     "median_pred_over_measured": float(np.median(pred[~probed] / kl[~probed]))})
    for r in rows:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps({"dump": str(args.dump), "probe": label, "feature": args.feature, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

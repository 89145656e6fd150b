"""Which rewrites to leave out so that a model's output error stays within a budget, measured
on copies of the model with the rewrites really applied (not simulated): for ops whose error is
not a weight's alone (``DynamicQuantizeLSTM`` quantizes activations each step) or whose weights
the weights-as-inputs session of ``_conv_budget`` cannot reach.

The error of a trial is 1 - cosine of each output over all calibration feeds at once (as the
validation gate's output cosine: an output of one value per feed has a cosine only across
feeds), the worst output. The search: every candidate at once; if that misses the budget, each
alone, then the costliest left out one at a time until the measured joint error fits. Candidates
in If/Loop bodies are measured alone in any case: an error of (nearly) zero says no feed ran
them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphc.passes._conv_budget import UNCHANGED, MAX_FEEDS
from graphc.passes._quant import subgraphs


def keyed_nodes(model: ir.Model):
    """(key, graph, node) of every node of the main graph and its If/Loop/Scan bodies, keyed
    (graph index, node index): the same keys name the same nodes on a copy of the model, which
    is how a trial applies a rewrite; a key whose graph index is not 0 is inside a body."""
    for gi, graph in enumerate([model.graph, *subgraphs(model.graph)]):
        for ni, node in enumerate(graph):
            yield (gi, ni), graph, node


@dataclass
class TrialResult:
    all_error: float
    joint_error: float
    kept: dict[Hashable, float] = field(default_factory=dict)  # left out → its error alone
    unreached: list[Hashable] = field(default_factory=list)  # in a body no feed runs


def trial_budget(model: ir.Model, keys: Sequence[Hashable], apply: Callable[[ir.Model, Sequence[Hashable]], None],
                 feeds: Sequence[dict], budget: float, in_bodies: Sequence[Hashable] = (),
                 report: Callable[[int, int], None] | None = None) -> TrialResult:
    """``apply(copy, keys)`` rewrites the named candidates in a fresh copy of ``model``."""
    from graphc.checks.validate import make_session
    from graphc.passes._sensitivity import tensor_error

    feeds = list(feeds)[:MAX_FEEDS]
    proto = ir.serde.serialize_model(model)
    reference = make_session(proto)
    refs = [reference.run(None, f) for f in feeds]
    del reference

    def error(chosen: Sequence[Hashable]) -> float:
        trial = ir.serde.deserialize_model(proto)
        apply(trial, chosen)
        session = make_session(trial)
        outs = [session.run(None, f) for f in feeds]
        return max(float(tensor_error(np.concatenate([o[i].ravel() for o in outs]),
                                      np.concatenate([r[i].ravel() for r in refs]))[0])
                   for i in range(len(refs[0])))

    keys = list(keys)
    all_error = joint = error(keys)
    over = all_error > budget
    measured = keys if over else [k for k in keys if k in set(in_bodies)]
    alone = {}
    for i, key in enumerate(measured):
        alone[key] = error([key])
        if report is not None:
            report(i + 1, len(measured))
    result = TrialResult(all_error, joint, unreached=[k for k in measured if k in set(in_bodies)
                                                      and alone[k] <= UNCHANGED])
    if over:
        for key in sorted(keys, key=lambda k: -alone[k]):
            if joint <= budget:
                break
            result.kept[key] = alone[key]
            rest = [k for k in keys if k not in result.kept]
            joint = error(rest) if rest else 0.0
    result.joint_error = joint
    return result


def kept_float(pass_, model: ir.Model, keys: Sequence[tuple[int, int]], apply: Callable[[ir.Model, Sequence], None],
               names: dict, tag: str, what: str, stats) -> dict[tuple[int, int], str]:
    """:func:`trial_budget` for a pass with a ``max_error`` option over candidates keyed as
    :func:`keyed_nodes` keys them, its findings in ``stats`` (``{tag}_error_all_int8``,
    ``{tag}_error``, ``{tag}_unmeasured`` with a notice, a note); returns the candidates left
    float with the reason. ``names``: key → the name to report."""
    from graphc.core.errors import PassError
    from graphc.passes._conv_budget import unreached_note

    context, budget = pass_.context, pass_.options.max_error
    if not context.calibration:
        raise PassError(f"max_error={budget:g} needs calibration data, and none was given "
                        "(pass --inputs or a model with real data)", pass_name=pass_.name)
    result = trial_budget(model, keys, apply, context.calibration, budget, in_bodies=[k for k in keys if k[0] > 0],
                          report=lambda done, total: context.report(f"{what}, error alone", done, total))
    if result.unreached:
        stats.details[f"{tag}_unmeasured"] = [names[k] for k in result.unreached]
        stats.details.setdefault("notices", []).append(
            unreached_note(len(result.unreached), what, context.calibration_source))
    stats.details[f"{tag}_error_all_int8"] = round(result.all_error, 6)
    stats.details[f"{tag}_error"] = round(result.joint_error, 6)
    stats.notes.append(f"{what}: error budget {budget:g} on {context.calibration_source}: all int8 "
                       f"{result.all_error:.5f}, with {len(result.kept)} kept float {result.joint_error:.5f}")
    return {k: f"kept float for the error budget: alone it costs {e:.5f} (budget {budget:g})"
            for k, e in result.kept.items()}

"""One self-contained HTML report of a compression run.

``render_report(data)`` turns the run's facts (a plain dict, see below) into a single HTML
document: inline CSS, plots drawn as inline SVG here in Python, no scripts, no external URLs.
Every section is optional except the header; a section whose data is missing says so.

The data contract (every key optional unless marked):

- ``title``, ``model``, ``output``, ``date``, ``graphc_version``: strings.
- ``recipe``: a name, or ``{"name", "description"}``.
- ``bytes_before``, ``bytes_after``, ``params_before``, ``params_after``: ints (else taken from
  ``passes`` or ``layers``).
- ``layers``: ``[{"layer", "params_before", "params_after", "bytes_before", "bytes_after",
  "nodes_before", "nodes_after"}]``.
- ``attribution``: ``{"layers": [{"layer", "cosine", "min_cosine", "max_abs", "rel_error",
  "added_error"}], "worst_layer": str | None, "tensors": [{"name", "layer", "op_type", "cosine",
  "max_abs", "rel_error", "added_error"}]}``.
- ``sensitivities``: ``[{"layer", "metric", "value"}]``; ``planner``: ``[{"layer", "choice",
  "predicted", "measured"}]``.
- ``latency``: ``{"threads", "seq", "rows": [{"batch", "original_ms", "rewritten_ms"}]}``.
- ``passes``: ``[{"name", "wall_s", "modified", "stats", "bytes_before", "bytes_after",
  "disabled"?, "check"?}]`` (``PassRecord.to_dict()``).
- ``validation``: ``ValidationReport.to_dict()``.
- ``provenance``: a flat dict of strings.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from graphc.report.charts import (  # noqa: F401 - _nice_ticks re-exported for tests
    AFTER,
    BEFORE,
    CHART_CSS,
    _bytes,
    _cos,
    _e,
    _is_num,
    _ms,
    _nice_ticks,
    _num,
    _ratio,
    _slug,
    bar_chart,
    line_chart,
    timeline_chart,
)

MISSING = '<p class="missing">Not measured in this run.</p>'

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a202c;
 background:#f7fafc;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 6px}h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid #e2e8f0}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#4a5568;margin:2px 0}.missing{color:#718096;font-style:italic}
nav{margin:12px 0;font-size:13px}nav a{margin-right:14px;color:#2b6cb0;text-decoration:none}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{flex:1 1 200px;border:1px solid #e2e8f0;border-radius:6px;padding:10px 14px;background:#f7fafc}
.card .k{font-size:12px;color:#4a5568;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:18px;font-weight:600;margin-top:2px}.card .d{font-size:12px;color:#4a5568}
.pass{color:#276749}.fail{color:#c53030}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px;width:100%}table.narrow{width:auto;min-width:50%}
th,td{padding:4px 8px;border-bottom:1px solid #edf2f7;text-align:left;vertical-align:top}
th{background:#edf2f7;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.hl td{background:#fff5f5}tr.off td{color:#a0aec0;font-style:italic}
tfoot td{font-weight:600;border-top:2px solid #cbd5e0}
code{font-size:12px;word-break:break-all}.kv{margin-right:10px;white-space:nowrap}
details{margin:6px 0}summary{cursor:pointer;color:#2b6cb0}
.note{font-size:12px;color:#4a5568}
""" + CHART_CSS


# ---------------------------------------------------------------- tables


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, num: frozenset[int] | set[int] = frozenset(),
           row_class: Sequence[str] | None = None, foot: Sequence[Any] | None = None, narrow: bool = False) -> str:
    """Cells are escaped unless wrapped in ``_Raw``."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="num"' if i in num else ""
        return f"<{tag}{cls}>{v if isinstance(v, _Raw) else _e(v)}</{tag}>"

    out = ['<table class="narrow">' if narrow else "<table>", "<thead><tr>",
           *(cell("th", i, h) for i, h in enumerate(headers)), "</tr></thead><tbody>"]
    for r, cells in enumerate(rows):
        cls = row_class[r] if row_class and row_class[r] else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        out.extend(cell("td", i, v) for i, v in enumerate(cells))
        out.append("</tr>")
    out.append("</tbody>")
    if foot:
        out.extend(["<tfoot><tr>", *(cell("td", i, v) for i, v in enumerate(foot)), "</tr></tfoot>"])
    return "".join(out) + "</table>"


class _Raw(str):
    """Already-escaped HTML for ``_table``."""


def _kv_table(items: dict) -> str:
    return _table(["key", "value"], [(k, _Raw(f"<code>{_e(v)}</code>")) for k, v in items.items()], narrow=True)


def _compact(value: Any) -> str:
    """Stats rendered small: scalars inline, lists as a count with the items in a <details>."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, (list, dict)) and v:
                parts.append(f'<details><summary>{_e(k)}: {len(v)}</summary>{_compact_items(v)}</details>')
            else:
                shown = _cos(v) if "cosine" in str(k) and _is_num(v) else _num(v)
                parts.append(f'<span class="kv">{_e(k)}={_e(shown)}</span>')
        return "".join(parts)
    return _e(_num(value))


def _compact_items(v: list | dict) -> str:
    if isinstance(v, dict):
        return f"<div>{_compact(v)}</div>"
    items = []
    for item in v:
        if isinstance(item, dict) and "reason" in item:
            rest = {k: x for k, x in item.items() if k != "reason"}
            what = ", ".join(str(x) for x in rest.values())
            items.append(f"<li><code>{_e(what)}</code>: {_e(item['reason'])}</li>")
        elif isinstance(item, dict):
            items.append(f"<li>{_compact(item)}</li>")
        else:
            items.append(f"<li>{_e(item)}</li>")
    return f"<ul>{''.join(items)}</ul>"


# ---------------------------------------------------------------- sections


def _totals(data: dict) -> dict[str, Any]:
    passes, layers = data.get("passes") or [], data.get("layers") or []
    out = {}
    for key in ("bytes_before", "bytes_after", "params_before", "params_after"):
        value = data.get(key)
        if value is None and passes:
            value = (passes[0] if key.endswith("before") else passes[-1]).get(key)
        if value is None and layers:
            value = sum(r.get(key) or 0 for r in layers)
        out[key] = value
    return out


def _title(data: dict) -> str:
    model = data.get("model") or data.get("output")
    return data.get("title") or (f"graphc report: {os.path.basename(str(model))}" if model else "graphc report")


def _header(data: dict) -> str:
    from graphc import __version__

    recipe = data.get("recipe")
    name, desc = (recipe.get("name"), recipe.get("description")) if isinstance(recipe, dict) else (recipe, None)
    date = data.get("date") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model, output = data.get("model"), data.get("output")
    out = [f"<header><h1>{_e(_title(data))}</h1>"]
    if model or output:
        out.append(f'<p class="sub"><code>{_e(model or "?")}</code> → <code>{_e(output or "?")}</code></p>')
    if name:
        out.append(f'<p class="sub">recipe <b>{_e(name)}</b>{" — " + _e(desc) if desc else ""}</p>')
    out.append(f'<p class="sub">graphc {_e(data.get("graphc_version") or __version__)} · {_e(date)}</p></header>')

    t = _totals(data)
    cards = []
    if _is_num(t["bytes_before"]) or _is_num(t["bytes_after"]):
        share = (f"{100 * t['bytes_after'] / t['bytes_before']:.1f}% of the original"
                 if _is_num(t["bytes_before"]) and _is_num(t["bytes_after"]) and t["bytes_before"] else "")
        cards.append(("weights", f"{_bytes(t['bytes_before'])} → {_bytes(t['bytes_after'])}",
                      f"{_ratio(t['bytes_before'], t['bytes_after'])} smaller · {share}"))
    if _is_num(t["params_before"]) or _is_num(t["params_after"]):
        cards.append(("parameters", f"{_num(t['params_before'])} → {_num(t['params_after'])}", ""))
    val = data.get("validation")
    if val:
        verdict = '<span class="pass">PASSED</span>' if val.get("passed") else '<span class="fail">FAILED</span>'
        detail = f"output cosine {_cos(val.get('output_cosine'))} · worst row {_cos(val.get('min_row_cosine'))}"
        cards.append(("validation", _Raw(verdict), detail))
    worst = (data.get("attribution") or {}).get("worst_layer")
    if worst:
        cards.append(("worst layer", worst, "largest error added"))
    out.append('<div class="cards">')
    for k, v, d in cards:
        v = v if isinstance(v, _Raw) else _e(v)
        out.append(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div>'
                   f'<div class="d">{_e(d)}</div></div>')
    out.append("</div>")
    return "".join(out)


def _bytes_section(data: dict) -> str:
    layers = data.get("layers")
    if not layers:
        return MISSING
    names = [r.get("layer", "?") for r in layers]
    chart = bar_chart("plot-bytes", "Weight bytes per layer", names,
                      [("before", BEFORE, [r.get("bytes_before") for r in layers]),
                       ("after", AFTER, [r.get("bytes_after") for r in layers])],
                      axis_label="bytes of weights", fmt=_bytes)
    rows = [(r.get("layer", "?"), _num(r.get("params_before")), _num(r.get("params_after")),
             _bytes(r.get("bytes_before")), _bytes(r.get("bytes_after")),
             _ratio(r.get("bytes_before"), r.get("bytes_after")),
             f"{_num(r.get('nodes_before'))} → {_num(r.get('nodes_after'))}") for r in layers]
    tot = {k: sum(r.get(k) or 0 for r in layers) for k in ("params_before", "params_after", "bytes_before",
                                                            "bytes_after", "nodes_before", "nodes_after")}
    foot = ("total", _num(tot["params_before"]), _num(tot["params_after"]), _bytes(tot["bytes_before"]),
            _bytes(tot["bytes_after"]), _ratio(tot["bytes_before"], tot["bytes_after"]),
            f"{_num(tot['nodes_before'])} → {_num(tot['nodes_after'])}")
    table = _table(["layer", "params before", "params after", "bytes before", "bytes after", "ratio", "nodes"],
                   rows, num={1, 2, 3, 4, 5, 6}, foot=foot)
    return chart + table


def _error_section(data: dict) -> str:
    att = data.get("attribution")
    if not att or not att.get("layers"):
        return MISSING
    layers, worst = att["layers"], att.get("worst_layer")
    names = [r.get("layer", "?") for r in layers]

    def one_minus(x: Any) -> float | None:
        return 1.0 - x if _is_num(x) else None

    chart = line_chart("plot-error", "Error per layer output (log scale)", names,
                       [("1 − cosine", AFTER, [one_minus(r.get("cosine")) for r in layers]),
                        ("1 − worst row cosine", "#805ad5", [one_minus(r.get("min_cosine")) for r in layers]),
                        ("error added by the layer", "#dd6b20", [r.get("added_error") for r in layers])],
                       axis_label="error (log scale)", x_label="layer", highlight=worst)
    note = ('<p class="note">Hollow markers on the bottom line: zero or negative values (no error, or the '
            "layer reduced it). Hover a point for its value.</p>")
    rows = [(r.get("layer", "?"), _cos(r.get("cosine")), _cos(r.get("min_cosine")), _num(r.get("max_abs")),
             _num(r.get("rel_error")), _num(r.get("added_error"))) for r in layers]
    table = _table(["layer", "cosine", "worst row cosine", "max abs", "rel error", "added error"], rows,
                   num={1, 2, 3, 4, 5}, row_class=["hl" if n == worst else "" for n in names])
    tensors = att.get("tensors") or []
    if tensors:
        trows = [(t.get("name", "?"), t.get("layer", "?"), t.get("op_type", "?"), _cos(t.get("cosine")),
                  _num(t.get("max_abs")), _num(t.get("rel_error")), _num(t.get("added_error"))) for t in tensors]
        table += (f"<details><summary>{len(tensors)} tensors</summary>"
                  + _table(["tensor", "layer", "op", "cosine", "max abs", "rel error", "added error"], trows,
                           num={3, 4, 5, 6}) + "</details>")
    return chart + note + table


def _planner_section(data: dict) -> str:
    sens, plan = data.get("sensitivities"), data.get("planner")
    compression = _plan_section(data)
    if not sens and not plan:
        return compression or MISSING
    out = []
    if sens:
        by_metric: dict[str, list[dict]] = {}
        for r in sens:
            by_metric.setdefault(str(r.get("metric", "value")), []).append(r)
        out.append('<div id="plot-sensitivity">')
        for metric, rows in by_metric.items():
            out.append(bar_chart(f"plot-sensitivity-{_slug(metric)}", f"Sensitivity: {metric}",
                                 [r.get("layer", "?") for r in rows],
                                 [(metric, "#dd6b20", [r.get("value") for r in rows])], axis_label=metric))
        out.append("</div>")
    else:
        out.append("<h3>Sensitivities</h3>" + MISSING)
    if plan:
        names = [r.get("layer", "?") for r in plan]
        if any(_is_num(r.get("predicted")) or _is_num(r.get("measured")) for r in plan):
            out.append(bar_chart("plot-planner", "Planner: predicted vs measured", names,
                                 [("predicted", BEFORE, [r.get("predicted") for r in plan]),
                                  ("measured", AFTER, [r.get("measured") for r in plan])],
                                 axis_label="planner metric"))
        out.append(_table(["layer", "choice", "predicted", "measured"],
                          [(r.get("layer", "?"), r.get("choice", "—"), _num(r.get("predicted")),
                            _num(r.get("measured"))) for r in plan], num={2, 3}))
    else:
        out.append("<h3>Planner choices</h3>" + MISSING)
    return "".join(out) + compression


def _plan_section(data: dict) -> str:
    """The ``plan`` pass's budgets, rounds (predicted vs measured) and per-layer decisions
    (``passes[].stats.plan``)."""
    plans = [p["stats"]["plan"] for p in data.get("passes") or () if isinstance((p.get("stats") or {}).get("plan"), dict)]
    if not plans:
        return ""
    plan = plans[-1]
    budgets = {k: v for k, v in (plan.get("budgets") or {}).items() if v is not None}
    out = ["<h3>Compression plan</h3>", _kv_table(budgets) if budgets else "", f'<p class="note">{_e(plan.get("metric", ""))}; '
           f'{_e(plan.get("additivity", ""))}</p>']
    rounds = plan.get("rounds") or []
    orig = plan.get("original") or {}
    if rounds:
        last = rounds[-1]

        def pct(x: Any, ref: Any) -> float | None:
            return 100.0 * x / ref if _is_num(x) and _is_num(ref) and ref else None

        labels = ["1 − cos (%)", "bytes (% of original)", "MACs (% of original)"]
        pred, meas = last.get("predicted") or {}, last.get("measured") or {}
        out.append(bar_chart("plot-plan", "Plan: predicted vs measured", labels,
                             [("predicted", BEFORE, [pct(last.get("predicted_error"), 1), pct(pred.get("bytes"), orig.get("bytes")),
                                                     pct(pred.get("macs"), orig.get("macs"))]),
                              ("measured", AFTER, [pct(last.get("measured_error"), 1), pct(meas.get("bytes"), orig.get("bytes")),
                                                   pct(meas.get("macs"), orig.get("macs"))])],
                             axis_label="percent", fmt=lambda v: f"{v:.3g}"))
        out.append("<h3>Rounds</h3>" + _table(
            ["round", "error scale", "predicted error", "measured error", "predicted bytes", "measured bytes",
             "predicted MACs", "measured MACs", "met"],
            [(r.get("round"), _num(r.get("scale")), _num(r.get("predicted_error")), _num(r.get("measured_error")),
              _bytes((r.get("predicted") or {}).get("bytes")), _bytes((r.get("measured") or {}).get("bytes")),
              _num((r.get("predicted") or {}).get("macs")), _num((r.get("measured") or {}).get("macs")),
              "yes" if r.get("met") else "no") for r in rounds], num={0, 1, 2, 3, 4, 5, 6, 7}))
    decisions = plan.get("decisions") or []
    if decisions:
        rows = [(d.get("unit", "?"), d.get("layer", "?"), d.get("action", "?"), _num(d.get("predicted_error")))
                for d in decisions]
        out.append(f"<h3>Decisions ({len(decisions)} actions)</h3>"
                   + _table(["unit", "layer", "action", "predicted error (alone)"], rows, num={3}))
    else:
        out.append("<h3>Decisions</h3><p>No action chosen.</p>")
    sens = plan.get("sensitivities") or []
    if sens:
        out.append(f"<details><summary>{len(sens)} measured actions</summary>" + _table(
            ["unit", "action", "error alone"], [(s.get("unit"), s.get("action"), _num(s.get("error"))) for s in sens],
            num={2}) + "</details>")
    return "".join(out)


def _latency_section(data: dict) -> str:
    lat = data.get("latency")
    if not lat or not lat.get("rows"):
        return MISSING
    rows = lat["rows"]
    labels = [f"batch {r.get('batch', '?')}" for r in rows]
    chart = bar_chart("plot-latency", f"Latency (seq {lat.get('seq', '?')}, {lat.get('threads', '?')} threads)",
                      labels, [("original", BEFORE, [r.get("original_ms") for r in rows]),
                               ("rewritten", AFTER, [r.get("rewritten_ms") for r in rows])],
                      axis_label="milliseconds per run (lower is better)", fmt=lambda v: f"{v:.3g} ms")
    table = _table(["batch", "original", "rewritten", "speed-up"],
                   [(_num(r.get("batch")), _ms(r.get("original_ms")), _ms(r.get("rewritten_ms")),
                     _ratio(r.get("original_ms"), r.get("rewritten_ms"))) for r in rows], num={0, 1, 2, 3})
    return chart + table


def _passes_section(data: dict) -> str:
    passes = data.get("passes")
    if not passes:
        return MISSING
    chart = timeline_chart("plot-timeline", "Pass timeline", passes)
    rows, classes = [], []
    for i, p in enumerate(passes, 1):
        b0, b1 = p.get("bytes_before"), p.get("bytes_after")
        delta = _bytes(b1 - b0) if _is_num(b0) and _is_num(b1) else "—"
        state = "disabled" if p.get("disabled") else ("changed" if p.get("modified") else "no change")
        check = p.get("check")
        rows.append((i, p.get("name", "?"), state, f"{p.get('wall_s') or 0:.3g}",
                     f"{_bytes(b0)} → {_bytes(b1)}", delta, _Raw(_compact(p.get("stats") or {})),
                     _Raw(_compact(check)) if isinstance(check, dict) else "—"))
        classes.append("off" if p.get("disabled") else "")
    total = sum(p.get("wall_s") or 0 for p in passes)
    table = _table(["#", "pass", "result", "wall s", "bytes", "Δ bytes", "stats", "check"], rows,
                   num={0, 3, 5}, row_class=classes, foot=("", "total", "", f"{total:.3g}", "", "", "", ""))
    return chart + table


def _validation_section(data: dict) -> str:
    val = data.get("validation")
    if not val:
        return MISSING
    tol = val.get("tolerance") or {}
    verdict = '<span class="pass">passed</span>' if val.get("passed") else '<span class="fail">failed</span>'
    items = [("verdict", _Raw(verdict)), ("samples", _num(val.get("samples"))),
             ("input source", val.get("input_source", "—")), ("output cosine", _cos(val.get("output_cosine"))),
             ("worst row cosine", _cos(val.get("min_row_cosine"))), ("max abs", _num(val.get("max_abs")))]
    items += [(f"required {k.replace('_', ' ')}", _num(v)) for k, v in tol.items() if v is not None]
    out = [_table(["check", "value"], items, narrow=True)]
    outputs = val.get("outputs") or []
    if outputs:
        out.append("<h3>Outputs</h3>" + _table(
            ["output", "cosine", "worst row cosine", "max abs", "mean abs", "rel max"],
            [(o.get("name", "?"), _cos(o.get("cosine")), _cos(o.get("min_row_cosine")), _num(o.get("max_abs")),
              _num(o.get("mean_abs")), _num(o.get("rel_max"))) for o in outputs], num={1, 2, 3, 4, 5}))
    if val.get("task"):
        out.append("<h3>Task</h3>" + _kv_table(val["task"]))
    return "".join(out)


def _provenance_section(data: dict) -> str:
    prov = data.get("provenance")
    return _kv_table(prov) if prov else MISSING


SECTIONS = [
    ("bytes", "Bytes per layer", _bytes_section),
    ("error", "Per-layer error", _error_section),
    ("planner", "Sensitivities and planner choices", _planner_section),
    ("latency", "Latency", _latency_section),
    ("passes", "Pass timeline", _passes_section),
    ("validation", "Validation", _validation_section),
    ("provenance", "Provenance", _provenance_section),
]


def render_report(data: dict) -> str:
    """The whole report as one HTML document (no scripts, no external resources)."""
    title = _title(data)
    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name, _ in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{_e(name)}</h2>{fn(data)}</section>' for key, name, fn in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{_header(data)}<nav>{nav}</nav>{body}</main></body></html>\n"
    )


def write_report(data: dict, path: str | os.PathLike) -> str:
    """Render and write atomically (temp file beside ``path``, then ``os.replace``); returns the path."""
    path = os.fspath(path)
    text = render_report(data)
    fd, tmp = tempfile.mkstemp(prefix=".graphc-tmp-", suffix=".html", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

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
import html
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

Series = tuple[str, str, Sequence[float | None]]  # (name, colour, one value per category)

BEFORE, AFTER, BAD, GREY = "#a0aec0", "#2b6cb0", "#c53030", "#718096"
MISSING = '<p class="missing">Not measured in this run.</p>'
CHART_W = 1000

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
svg.chart{display:block;max-width:100%;height:auto;margin:8px 0}
svg.chart text{font-size:12px;fill:#2d3748}svg.chart .t{font-size:14px;font-weight:600}
svg.chart .ax{stroke:#4a5568}svg.chart .grid{stroke:#e2e8f0}
.note{font-size:12px;color:#4a5568}
"""


# ---------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return str(n)


def _cos(x: Any) -> str:
    return f"{x:.6f}" if isinstance(x, (int, float)) else "—"


def _ms(x: Any) -> str:
    return f"{x:.3g} ms" if isinstance(x, (int, float)) else "—"


def _short(text: Any, n: int = 28) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _slug(text: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(before: Any, after: Any) -> str:
    if not (_is_num(before) and _is_num(after)) or after <= 0:
        return "—"
    return f"{before / after:.2f}×"


# ---------------------------------------------------------------- charts


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (``lo <= 0 <= hi`` for bar charts)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag * 1.0000001)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(start, stop + 1)]


def _svg_open(plot_id: str, title: str, width: float, height: float) -> str:
    return (
        f'<svg id="{_e(plot_id)}" class="chart" role="img" aria-labelledby="{_e(plot_id)}-title" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
        f'<title id="{_e(plot_id)}-title">{_e(title)}</title>'
        f'<text class="t" x="8" y="20">{_e(title)}</text>'
    )


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    out = []
    for name, colour in items:
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14:.1f}" y="{y:.1f}">{_e(name)}</text>')
        x += 24 + 7 * len(name)
    return "".join(out)


def bar_chart(
    plot_id: str,
    title: str,
    labels: Sequence[Any],
    series: Sequence[Series],
    *,
    axis_label: str,
    fmt: Callable[[Any], str] = _num,
    highlight: Any = None,
) -> str:
    """Horizontal grouped bars: one group per label, one bar per series; ``None`` draws no bar."""
    values = [v for _, _, vals in series for v in vals if _is_num(v)]
    ticks = _nice_ticks(min([0.0, *values]), max([0.0, *values]) or 1.0)
    lo, hi = ticks[0], ticks[-1]
    label_w = 16 + 6.8 * min(28, max([len(str(lb)) for lb in labels] or [4]))
    x0, x1 = label_w, CHART_W - 90
    bar_h, gap = 13, 10
    group_h = bar_h * len(series) + gap
    top = 50
    height = top + group_h * len(labels) + 46
    sx = lambda v: x0 + (v - lo) / (hi - lo) * (x1 - x0)
    out = [_svg_open(plot_id, title, CHART_W, height), _legend([(n, c) for n, c, _ in series], x0, 40)]
    bottom = top + group_h * len(labels)
    for t in ticks:
        out.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{bottom}"/>'
                   f'<text x="{sx(t):.1f}" y="{bottom + 16}" text-anchor="middle">{_e(fmt(t))}</text>')
    for i, label in enumerate(labels):
        gy = top + i * group_h + gap / 2
        if highlight is not None and label == highlight:
            out.append(f'<rect x="0" y="{gy - gap / 2:.1f}" width="{CHART_W}" height="{group_h}" fill="#fff5f5"/>')
        colour = BAD if highlight is not None and label == highlight else "#2d3748"
        out.append(f'<text x="{x0 - 8:.1f}" y="{gy + group_h / 2 - 1:.1f}" text-anchor="end" '
                   f'style="fill:{colour}"><title>{_e(label)}</title>{_e(_short(label))}</text>')
        for j, (name, col, vals) in enumerate(series):
            v = vals[i] if i < len(vals) else None
            if not _is_num(v):
                continue
            a, b = sorted((sx(0.0), sx(v)))
            y = gy + j * bar_h
            out.append(f'<rect x="{a:.1f}" y="{y:.1f}" width="{max(b - a, 1):.1f}" height="{bar_h - 2}" '
                       f'fill="{col}"><title>{_e(label)} · {_e(name)}: {_e(fmt(v))}</title></rect>'
                       f'<text x="{b + 4:.1f}" y="{y + bar_h - 3:.1f}" style="font-size:10px">{_e(fmt(v))}</text>')
    out.append(f'<line class="ax" x1="{sx(0.0):.1f}" y1="{top}" x2="{sx(0.0):.1f}" y2="{bottom}"/>'
               f'<line class="ax" x1="{x0:.1f}" y1="{bottom}" x2="{x1:.1f}" y2="{bottom}"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{bottom + 36}" text-anchor="middle">{_e(axis_label)}</text></svg>')
    return "".join(out)


def line_chart(
    plot_id: str,
    title: str,
    labels: Sequence[Any],
    series: Sequence[Series],
    *,
    axis_label: str,
    x_label: str,
    highlight: Any = None,
) -> str:
    """Points joined by lines over categories, log-scaled y; values <= 0 sit hollow on the floor."""
    positive = [v for _, _, vals in series for v in vals if _is_num(v) and v > 0]
    d_lo = math.floor(math.log10(min(positive))) if positive else -9
    d_hi = math.ceil(math.log10(max(positive))) if positive else d_lo + 1
    d_hi = max(d_hi, d_lo + 1)
    x0, x1, top, bottom = 80, CHART_W - 20, 52, 292
    height = bottom + 100
    n = max(len(labels), 1)
    step = (x1 - x0) / n
    sx = lambda i: x0 + (i + 0.5) * step
    sy = lambda v: bottom - (math.log10(v) - d_lo) / (d_hi - d_lo) * (bottom - top)
    out = [_svg_open(plot_id, title, CHART_W, height), _legend([(nm, c) for nm, c, _ in series], x0, 40)]
    for i, label in enumerate(labels):
        if highlight is not None and label == highlight:
            out.append(f'<rect x="{sx(i) - step / 2:.1f}" y="{top}" width="{step:.1f}" '
                       f'height="{bottom - top}" fill="#fed7d7"/>'
                       f'<text x="{sx(i):.1f}" y="{top + 14}" text-anchor="middle" style="fill:{BAD}">worst</text>')
    for d in range(d_lo, d_hi + 1):
        y = sy(10.0**d)
        out.append(f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
    every = max(1, math.ceil(n / 40))
    for i, label in enumerate(labels):
        if i % every == 0:
            colour = BAD if highlight is not None and label == highlight else "#2d3748"
            out.append(f'<text transform="translate({sx(i):.1f},{bottom + 12}) rotate(-35)" text-anchor="end" '
                       f'style="fill:{colour}"><title>{_e(label)}</title>{_e(_short(label, 22))}</text>')
    for name, colour, vals in series:
        points = []
        for i, v in enumerate(vals[: len(labels)]):
            if not _is_num(v):
                points.append(None)
                continue
            points.append((sx(i), sy(v) if v > 0 else bottom, v))
        run: list[str] = []
        for p in [*points, None]:
            if p is None:
                if len(run) > 1:
                    out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(run)}"/>')
                run = []
            else:
                run.append(f"{p[0]:.1f},{p[1]:.1f}")
        for i, p in enumerate(points):
            if p is not None:
                fill = colour if p[2] > 0 else "#fff"
                out.append(f'<circle cx="{p[0]:.1f}" cy="{p[1]:.1f}" r="3.5" fill="{fill}" stroke="{colour}">'
                           f'<title>{_e(labels[i])} · {_e(name)}: {p[2]:.4g}</title></circle>')
    out.append(f'<line class="ax" x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}"/>'
               f'<line class="ax" x1="{x0}" y1="{bottom}" x2="{x1}" y2="{bottom}"/>'
               f'<text transform="translate(16,{(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{_e(axis_label)}</text>'
               f'<text x="{(x0 + x1) / 2:.0f}" y="{height - 6}" text-anchor="middle">{_e(x_label)}</text></svg>')
    return "".join(out)


def timeline_chart(plot_id: str, title: str, passes: Sequence[dict]) -> str:
    """Gantt-like bars: each pass starts where the previous one ended."""
    total = sum(p.get("wall_s") or 0.0 for p in passes) or 1e-3
    ticks = _nice_ticks(0.0, total)
    label_w = 16 + 6.8 * min(28, max([len(str(p.get("name", ""))) for p in passes] or [4]))
    x0, x1, top, row = label_w, CHART_W - 120, 50, 20
    bottom = top + row * len(passes)
    sx = lambda v: x0 + v / ticks[-1] * (x1 - x0)
    legend = [("changed the model", AFTER), ("no change", BEFORE), ("disabled", "#e2e8f0")]
    out = [_svg_open(plot_id, title, CHART_W, bottom + 46), _legend(legend, x0, 40)]
    for t in ticks:
        out.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{bottom}"/>'
                   f'<text x="{sx(t):.1f}" y="{bottom + 16}" text-anchor="middle">{t:.3g}</text>')
    start = 0.0
    for i, p in enumerate(passes):
        wall = p.get("wall_s") or 0.0
        y = top + i * row
        name = p.get("name", "?")
        out.append(f'<text x="{x0 - 8:.1f}" y="{y + 14}" text-anchor="end"><title>{_e(name)}</title>'
                   f'{_e(_short(name))}</text>')
        if p.get("disabled"):
            out.append(f'<rect x="{sx(start):.1f}" y="{y + 4}" width="3" height="{row - 6}" fill="#e2e8f0"/>'
                       f'<text x="{sx(start) + 8:.1f}" y="{y + 14}" style="fill:#a0aec0">disabled</text>')
            continue
        colour = AFTER if p.get("modified") else BEFORE
        b0, b1 = p.get("bytes_before"), p.get("bytes_after")
        delta = f" · {_bytes(b1 - b0)}" if _is_num(b0) and _is_num(b1) and b1 != b0 else ""
        width = max(sx(start + wall) - sx(start), 1.5)
        out.append(f'<rect x="{sx(start):.1f}" y="{y + 3}" width="{width:.1f}" height="{row - 6}" fill="{colour}">'
                   f'<title>{_e(name)}: {wall:.4g} s (from {start:.4g} s){_e(delta)}</title></rect>'
                   f'<text x="{sx(start) + width + 4:.1f}" y="{y + 14}" style="font-size:10px">'
                   f'{wall:.3g} s{_e(delta)}</text>')
        start += wall
    out.append(f'<line class="ax" x1="{x0:.1f}" y1="{top}" x2="{x0:.1f}" y2="{bottom}"/>'
               f'<line class="ax" x1="{x0:.1f}" y1="{bottom}" x2="{x1:.1f}" y2="{bottom}"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{bottom + 36}" text-anchor="middle">'
               f'wall time, cumulative (s)</text></svg>')
    return "".join(out)


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
    if not sens and not plan:
        return MISSING
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

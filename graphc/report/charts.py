"""Formatting helpers and inline-SVG charts (bar, line, x-y, timeline) for the HTML report.

Charts are drawn here in Python as SVG strings: no JavaScript, no external resources. Every
string that reaches the markup goes through ``_e`` (html.escape).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from graphc.core.errors import GraphcError

Series = tuple[str, str, Sequence[float | None]]  # (name, colour, one value per category)
XYSeries = tuple[str, str, Sequence[tuple[float | None, float | None]]]  # (name, colour, (x, y) points)

BEFORE, AFTER, BAD, GREY = "#a0aec0", "#2b6cb0", "#c53030", "#718096"
CHART_W = 1000
# The charts' classes (class="chart" on the <svg>; t: title, ax: axis, grid: grid line).
CHART_CSS = """
svg.chart{display:block;max-width:100%;height:auto;margin:8px 0}
svg.chart text{font-size:12px;fill:#2d3748}svg.chart .t{font-size:14px;font-weight:600}
svg.chart .ax{stroke:#4a5568}svg.chart .grid{stroke:#e2e8f0}
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




def _log_ticks(lo: float, hi: float) -> list[float]:
    """Decades covering ``[lo, hi]`` (both > 0), with 2× and 5× between them when it spans ≤ 2."""
    d_lo, d_hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    d_hi = max(d_hi, d_lo + 1)
    steps = (1, 2, 5) if d_hi - d_lo <= 2 else (1,)
    ticks = [m * 10.0**d for d in range(d_lo, d_hi) for m in steps] + [10.0**d_hi]
    first = max(t for t in ticks if t <= lo * (1 + 1e-9))
    last = min(t for t in ticks if t >= hi * (1 - 1e-9) and t > first)
    return [t for t in ticks if first <= t <= last]


def _place_note(px: float, py: float, width: float, taken: list[tuple[float, float, float, float]],
                lo: float, hi: float) -> tuple[float, float, str]:
    """Where a label of ``width`` pixels goes beside the point (px, py): above right, above left,
    below right, below left, the first spot inside [lo, hi] that overlaps no box in ``taken``
    (else the first inside); its box is added to ``taken``. Returns (x, baseline y, anchor)."""
    spots = [(px + 7, py - 5, "start"), (px - 7, py - 5, "end"), (px + 7, py + 15, "start"), (px - 7, py + 15, "end")]

    def box(spot: tuple[float, float, str]) -> tuple[float, float, float, float]:
        x, y, anchor = spot
        left = x if anchor == "start" else x - width
        return left, y - 10, left + width, y + 2

    def free(b: tuple[float, float, float, float]) -> bool:
        return lo <= b[0] and b[2] <= hi and not any(
            b[0] < t[2] and t[0] < b[2] and b[1] < t[3] and t[1] < b[3] for t in taken)

    inside = [s for s in spots if lo <= box(s)[0] and box(s)[2] <= hi] or spots
    spot = next((s for s in spots if free(box(s))), inside[0])
    taken.append(box(spot))
    return spot


def xy_chart(
    plot_id: str,
    title: str,
    series: Sequence[XYSeries],
    *,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    x_fmt: Callable[[Any], str] = _num,
    y_fmt: Callable[[Any], str] = _num,
    guides: Sequence[tuple[float, str]] = (),
    notes: Sequence[tuple[float, float, str] | tuple[float, float, str, str]] = (),
) -> str:
    """Points at numeric (x, y), each series' points joined in the order given. A point with a
    missing or non-finite coordinate is left out and breaks its line; on a log y axis a y ≤ 0
    sits hollow on the floor. ``guides``: (y, label) dashed horizontal lines, inside the y range;
    ``notes``: (x, y, text[, colour]) labels written beside those points, each moved to another
    side of its point where it would overlap a label already drawn."""
    pts = [(x, y) for _, _, ps in series for x, y in ps if _is_num(x) and _is_num(y)]
    x0, x1, top, bottom = 80, CHART_W - 20, 52, 352
    height = bottom + 50
    out = [_svg_open(plot_id, title, CHART_W, height), _legend([(nm, c) for nm, c, _ in series], x0, 40)]
    if not pts:
        out.append(f'<text x="{(x0 + x1) / 2:.0f}" y="{(top + bottom) / 2:.0f}" text-anchor="middle">'
                   f'no data</text></svg>')
        return "".join(out)
    xt = _nice_ticks(min(x for x, _ in pts), max(x for x, _ in pts))
    guides = [(y, label) for y, label in guides if _is_num(y) and (y > 0 or not log_y)]
    pts_y = pts + [(xt[0], y) for y, _ in guides]  # the y range covers the guides
    positive = [y for _, y in pts_y if y > 0]
    if log_y:
        yt = _log_ticks(min(positive), max(positive)) if positive else [1.0, 10.0]
        ylo, yhi = math.log10(yt[0]), math.log10(yt[-1])
        fy = math.log10
    else:
        yt = _nice_ticks(min(y for _, y in pts_y), max(y for _, y in pts_y))
        ylo, yhi, fy = yt[0], yt[-1], float
    sx = lambda v: x0 + (v - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)
    sy = lambda v: bottom if log_y and v <= 0 else bottom - (fy(v) - ylo) / (yhi - ylo) * (bottom - top)
    for t in xt:
        out.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{bottom}"/>'
                   f'<text x="{sx(t):.1f}" y="{bottom + 16}" text-anchor="middle">{_e(x_fmt(t))}</text>')
    for t in yt:
        out.append(f'<line class="grid" x1="{x0}" y1="{sy(t):.1f}" x2="{x1}" y2="{sy(t):.1f}"/>'
                   f'<text x="{x0 - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_e(y_fmt(t))}</text>')
    taken: list[tuple[float, float, float, float]] = []  # text boxes drawn so far (left, top, right, bottom)
    for y, label in guides:
        out.append(f'<line x1="{x0}" y1="{sy(y):.1f}" x2="{x1}" y2="{sy(y):.1f}" stroke="{GREY}" '
                   f'stroke-dasharray="6 4"/><text x="{x0 + 4}" y="{sy(y) - 4:.1f}" '
                   f'style="fill:{GREY}">{_e(label)}</text>')
        taken.append((x0 + 4, sy(y) - 15, x0 + 4 + 7 * len(label), sy(y) - 1))
    for name, colour, ps in series:
        run: list[str] = []
        for p in [*ps, (None, None)]:
            x, y = p
            if not (_is_num(x) and _is_num(y)):
                if len(run) > 1:
                    out.append(f'<polyline fill="none" stroke="{_e(colour)}" stroke-width="2" points="{" ".join(run)}"/>')
                run = []
                continue
            run.append(f"{sx(x):.1f},{sy(y):.1f}")
        for x, y in ps:
            if _is_num(x) and _is_num(y):
                fill = "#fff" if log_y and y <= 0 else _e(colour)
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{fill}" stroke="{_e(colour)}">'
                           f'<title>{_e(name)}: {_e(x_fmt(x))}, {_e(y_fmt(y))}</title></circle>')
    for x, y, text, *colour in notes:
        if _is_num(x) and _is_num(y):
            tx, ty, anchor = _place_note(sx(x), sy(y), 6.2 * len(text), taken, x0, x1)
            fill = f";fill:{_e(colour[0])}" if colour else ""
            out.append(f'<text class="note" x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" '
                       f'style="font-size:11px{fill}">{_e(text)}</text>')
    out.append(f'<line class="ax" x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}"/>'
               f'<line class="ax" x1="{x0}" y1="{bottom}" x2="{x1}" y2="{bottom}"/>'
               f'<text transform="translate(16,{(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{_e(y_label)}</text>'
               f'<text x="{(x0 + x1) / 2:.0f}" y="{height - 6}" text-anchor="middle">{_e(x_label)}</text></svg>')
    return "".join(out)


def standalone_svg(chart: str) -> str:
    """A chart from this module as an .svg file's text: the SVG namespace, a white background
    and the chart styles (which the HTML report otherwise supplies) inside it."""
    head, sep, rest = chart.partition(">")
    if not head.startswith("<svg") or not sep:
        raise GraphcError("standalone_svg: expects an <svg> element from graphc.report.charts")
    style = CHART_CSS + "svg.chart{font-family:system-ui,sans-serif;background:#fff}\n"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n{head} xmlns="http://www.w3.org/2000/svg">'
            f"<style>{style}</style>{rest}\n")

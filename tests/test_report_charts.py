"""report_charts.xy_chart / standalone_svg: numeric points land where their values say, strings
are escaped, missing values break lines instead of breaking the chart."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from graphc.core.errors import GraphcError
from graphc.report.charts import standalone_svg, xy_chart

NS = "{http://www.w3.org/2000/svg}"


def circles(svg: str) -> list[tuple[float, float]]:
    return [(float(c.get("cx")), float(c.get("cy"))) for c in ET.fromstring(svg).iter("circle")]


def test_points_map_linearly_with_y_up():
    pts = [(0.0, 1.0), (0.1, 3.0), (0.3, 2.0)]
    svg = xy_chart("p", "t", [("a", "#000", pts)], x_label="x", y_label="y")
    got = circles(svg)
    assert len(got) == 3
    (ax, ay), (bx, by), (cx, cy) = got
    # equal steps in x are equal steps in pixels; larger y is higher up (smaller cy)
    assert (cx - ax) == pytest.approx(3 * (bx - ax), abs=0.2)
    assert by < cy < ay
    assert (ay - cy) == pytest.approx(cy - by, abs=0.2)
    line = ET.fromstring(svg).find("polyline")
    assert line is not None and len(line.get("points").split()) == 3


def test_log_y_spaces_equal_ratios_equally():
    pts = [(0.0, 20.0), (0.1, 200.0), (0.2, 2e4)]
    svg = xy_chart("p", "t", [("a", "#000", pts)], x_label="x", y_label="y", log_y=True)
    (_, ay), (_, by), (_, cy) = circles(svg)
    assert (ay - by) * 2 == pytest.approx(by - cy, abs=0.3)
    # every point inside the plot area, between the extreme grid lines
    ys = [float(g.get("y1")) for g in ET.fromstring(svg).iter("line") if g.get("class") == "grid"
          and g.get("y1") == g.get("y2")]
    assert min(ys) <= cy < ay <= max(ys)


def test_missing_points_break_the_line_and_names_are_escaped():
    evil = "<script>alert(1)</script>"
    pts = [(0.0, 1.0), (0.1, 2.0), (0.2, None), (0.3, math.nan), (0.4, 3.0), (0.5, 4.0)]
    svg = xy_chart("p", evil, [(evil, "#123", pts), ("empty", "#456", [])], x_label=evil, y_label="y & z")
    assert "<script" not in svg and "&lt;script&gt;" in svg and "y &amp; z" in svg
    root = ET.fromstring(svg)
    assert len(circles(svg)) == 4
    assert [len(p.get("points").split()) for p in root.iter("polyline")] == [2, 2]
    assert not re.search(r"\b(nan|inf)\b", svg, flags=re.IGNORECASE)


def test_log_y_nonpositive_sits_hollow_on_the_floor():
    svg = xy_chart("p", "t", [("a", "#000", [(0.0, 10.0), (1.0, 0.0)])], x_label="x", y_label="y", log_y=True)
    root = ET.fromstring(svg)
    hollow = [c for c in root.iter("circle") if c.get("fill") == "#fff"]
    assert len(hollow) == 1 and float(hollow[0].get("cy")) == max(y for _, y in circles(svg))


@pytest.mark.parametrize("series", [[], [("a", "#000", [])], [("a", "#000", [(None, 1.0), (1.0, None)])]])
def test_no_data_is_said_not_drawn(series):
    svg = xy_chart("p", "t", series, x_label="x", y_label="y", log_y=True)
    root = ET.fromstring(svg)
    assert not list(root.iter("circle")) and "no data" in svg


@pytest.mark.parametrize("log_y", [False, True])
def test_guide_lies_at_its_y_widening_the_range_and_notes_sit_by_their_points(log_y):
    pts = [(1.0, 0.02), (2.0, 0.05)]
    svg = xy_chart("p", "t", [("a", "#000", pts)], x_label="x", y_label="y", log_y=log_y,
                   guides=[(0.01, "cos <0.99>")], notes=[(2.0, 0.05, "b & c"), (None, 1.0, "dropped")])
    root = ET.fromstring(svg)
    (ax, ay), (bx, by) = circles(svg)
    guide = next(ln for ln in root.iter("line") if ln.get("stroke-dasharray"))
    gy = float(guide.get("y1"))
    assert gy == float(guide.get("y2")) and gy > ay > by  # below both points: 0.01 < 0.02 < 0.05
    grid = [float(g.get("y1")) for g in root.iter("line") if g.get("class") == "grid" and g.get("y1") == g.get("y2")]
    assert min(grid) <= gy <= max(grid)  # the y range grew to hold the guide
    if log_y:  # equal ratios, equal distances: 0.01 → 0.02 as far as 0.02 → 0.04
        assert gy - ay == pytest.approx((ay - by) * math.log10(2) / math.log10(2.5), abs=0.3)
    texts = {t.text: t for t in root.iter("text")}
    assert "cos <0.99>" in texts and "dropped" not in texts
    note = texts["b & c"]
    assert abs(float(note.get("x")) - bx) < 10 and abs(float(note.get("y")) - by) < 20


def test_notes_on_one_point_go_to_different_sides_in_their_colours():
    pts = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    names = ["first", "second", "third", "fourth"]
    notes = [(1.0, 2.0, n, "#ab1234") for n in names[:2]] + [(1.0, 2.0, n) for n in names[2:]]
    svg = xy_chart("p", "t", [("a", "#000", pts)], x_label="x", y_label="y", notes=notes)
    root = ET.fromstring(svg)
    px, py = circles(svg)[1]  # the point (1, 2): circles come in the order given
    boxes = []
    for t in root.iter("text"):
        if t.get("class") == "note":
            x, y, w = float(t.get("x")), float(t.get("y")), 6.2 * len(t.text)
            left = x if t.get("text-anchor") == "start" else x - w
            boxes.append((t.text, left, y - 10, left + w, y + 2, t.get("style")))
    assert [b[0] for b in boxes] == names
    for i, a in enumerate(boxes):  # four sides of one point, no two labels overlapping
        assert abs((a[1] + a[3]) / 2 - px) < 60 and abs((a[2] + a[4]) / 2 - py) < 20
        for b in boxes[i + 1:]:
            assert not (a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]), (a[0], b[0])
    assert "#ab1234" in boxes[0][5] and "#ab1234" in boxes[1][5] and "fill" not in boxes[2][5]


def test_standalone_svg_is_a_namespaced_document_with_its_styles():
    text = standalone_svg(xy_chart("p", "t", [("a", "#000", [(0.0, 1.0), (1.0, 2.0)])], x_label="x", y_label="y"))
    root = ET.fromstring(text.encode())
    assert root.tag == f"{NS}svg" and root.find(f"{NS}style") is not None
    assert ".grid" in root.find(f"{NS}style").text
    assert len(list(root.iter(f"{NS}circle"))) == 2
    with pytest.raises(GraphcError):
        standalone_svg("<div>not a chart</div>")

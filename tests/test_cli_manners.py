"""The command line's manners: --json anywhere and on failure, help with recipes, examples and
exit codes, --set, tolerance flags, notices for flags that do nothing, progress."""

import io
import json

import onnx
import onnx_ir as ir
import pytest

from graphc.front.cli import build_parser, main
from graphc.front.cli_help import EXIT_CODES
from graphc.core.errors import RecipeError
from graphc.core.progress import JsonProgress, LineProgress, RichProgress, make_progress
from graphc.core.recipe_merge import apply_sets, parse_set
from graphc.core.recipes import get_recipe, recipe_from_dict, recipe_names
from tests.passes.graphs import mlp


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(mlp(), path)
    return path


def _one_json(text: str) -> dict:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return json.loads(lines[0])


@pytest.mark.parametrize("argv", [["--json", "passes"], ["passes", "--json"]])
def test_json_before_or_after_the_command(argv, capsys):
    assert main(argv) == 0
    assert "passes" in _one_json(capsys.readouterr().out)


def test_json_on_failure(tmp_path, capsys):
    missing = tmp_path / "nope.onnx"
    assert main(["--json", "inspect", str(missing)]) == 1
    out = capsys.readouterr()
    data = _one_json(out.out)
    assert data["exit_code"] == 1 and str(missing) in data["error"] and data["type"] == "ModelLoadError"
    assert out.err.count("\n") == 1 and out.err.startswith("graphc: error: ")
    assert main(["compress", "--json"]) == 2  # usage error: still one JSON object
    out = capsys.readouterr()
    assert _one_json(out.out)["exit_code"] == 2 and out.err.count("\n") == 1
    assert main(["passes"]) == 0 and not capsys.readouterr().out.startswith("{")


def test_help_lists_recipes_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in recipe_names()) and "auto" in text
    assert "examples:" in text and "graphc compress" in text
    for code, _ in EXIT_CODES:
        assert f"\n  {code} " in text
    assert {c for c, _ in EXIT_CODES} == {0, 1, 2, 3, 70, 130}


def test_every_positional_argument_is_described():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if not action.option_strings:
                assert action.help, f"graphc {name}: positional {action.dest} has no help"


# ----------------------------------------------------------------------------- --set


def test_parse_set_reads_toml_values():
    assert parse_set("quantize-int8.per_channel=false") == ("quantize-int8", "per_channel", False)
    assert parse_set("mixed-precision.bits=[4, 8]") == ("mixed-precision", "bits", [4, 8])
    assert parse_set("fuse-ort.attention=mha") == ("fuse-ort", "attention", "mha")
    assert parse_set('fuse-ort.attention="mha"') == ("fuse-ort", "attention", "mha")
    for bad in ("quantize-int8", "per_channel=false", "x.=1", "q.o=[1,"):
        with pytest.raises(RecipeError):
            parse_set(bad)


def test_set_changes_one_option_and_checks_it():
    base = get_recipe("int8")
    recipe = apply_sets(base, ["quantize-int8.per_channel=false"])
    step = next(s for s in recipe.steps if s.pass_name == "quantize-int8")
    assert step.options["per_channel"] is False and step.options["outlier_ratio"] == 4.0
    assert [s.pass_name for s in recipe.steps] == base.pass_names()
    with pytest.raises(RecipeError, match="'prune-heads' is not in recipe 'int8'"):
        apply_sets(base, ["prune-heads.fraction=0.5"])
    with pytest.raises(RecipeError, match="'nonsense' is not a pass"):
        apply_sets(base, ["nonsense.x=1"])
    with pytest.raises(RecipeError, match="unknown option"):
        apply_sets(base, ["quantize-int8.per_chanel=false"])
    with pytest.raises(RecipeError, match=r"per_channel must be a boolean \(true or false\)"):
        apply_sets(base, ["quantize-int8.per_channel=maybe"])


def test_cli_set_is_written_in_the_provenance(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--set", "quantize-int8.per_channel=false",
                 "--json"]) == 0
    capsys.readouterr()
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    steps = json.loads(meta["graphc.recipe_json"])["passes"]
    assert next(s for s in steps if s["name"] == "quantize-int8")["options"]["per_channel"] is False
    assert main(["compress", str(model_path), "-o", str(tmp_path / "x.onnx"), "--set", "quantize-int8.nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set quantize-int8.nope=1" in err and "unknown option" in err
    assert not (tmp_path / "x.onnx").exists()


def test_a_bad_option_value_is_refused_before_any_pass_runs(model_path, tmp_path, capsys, monkeypatch):
    """A value only a late pass checks (mixed-precision's size_like, after fusion and AWQ's
    calibration sweep in int4) is refused before the first pass runs, in one line."""
    from graphc.core.pass_base import GraphcPass

    ran = []
    call = GraphcPass.call
    monkeypatch.setattr(GraphcPass, "call", lambda self, model: ran.append(self.name) or call(self, model))
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", "int4",
                 "--set", "mixed-precision.size_like=bogus"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "size_like='bogus'" in err and "genai-int4" in err
    assert ran == [] and not out.exists()
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", "int4"]) == 0  # the same run, valid
    assert "mixed-precision" in ran


# ----------------------------------------------------------------- extends merges [[passes]] by name


def test_extends_merges_passes_by_name():
    base = get_recipe("int8")
    recipe = recipe_from_dict({"extends": "int8", "passes": [
        {"name": "quantize-int8", "options": {"per_channel": False}},
        {"name": "cse", "after": "fold-constants"},
        {"name": "shape-inference"},
    ]})
    names = recipe.pass_names()
    assert names == [*base.pass_names()[:2], "cse", *base.pass_names()[2:], "shape-inference"]
    step = next(s for s in recipe.steps if s.pass_name == "quantize-int8")
    assert step.options == {**next(s for s in base.steps if s.pass_name == "quantize-int8").options,
                            "per_channel": False}
    assert recipe.tolerance == base.tolerance


@pytest.mark.parametrize("entry, message", [
    ({"name": "cse", "after": "nowhere"}, "which is not in the recipe"),
    ({"name": "quantize-int8", "before": "fp16-constants"}, "already in the recipe"),
    ({"name": "cse", "after": "fold-constants", "before": "cse"}, "both 'after' and 'before'"),
])
def test_extends_merge_errors(entry, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"extends": "int8", "passes": [entry]})


def test_after_needs_extends():
    with pytest.raises(RecipeError, match="unknown key"):
        recipe_from_dict({"passes": [{"name": "cse", "after": "fold-constants"}]})


def test_extends_a_packaged_file_recipe():
    recipe = recipe_from_dict({"extends": "remove-padding", "tolerance": {"min_cosine": 0.5}})
    assert recipe.pass_names() == get_recipe("remove-padding").pass_names() and recipe.tolerance.min_cosine == 0.5


# ------------------------------------------------------------------ tolerance flags and notices


def test_min_cosine_flag_replaces_the_recipe_tolerance(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--min-cosine", "1.0"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vs required 1.0" in err and not out.exists()
    assert main(["compress", str(model_path), "-o", str(out), "--min-cosine", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["validation"]["tolerance"]["min_cosine"] == 0.5


def test_max_ppl_rise_without_perplexity_is_a_notice(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--recipe", "int8", "--max-ppl-rise", "0.05",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"] == "int8"  # a tolerance here, not a plan budget: int8 has no plan step
    assert data["validation"]["tolerance"]["max_ppl_rise"] == 0.05
    assert any("max_ppl_rise 0.05 not checked" in n for n in data["notices"])


def test_zero_budget_and_other_no_ops_get_a_notice(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), "-o", str(out), "--max-flops", "0", "--shape-hint", "1x8",
                 "--no-validate", "--force", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"] == "int8"
    notices = "\n".join(data["notices"])
    assert "--max-flops 0 means no limit" in notices and "--shape-hint only applies" in notices
    assert "--force does nothing with --no-validate" in notices


def test_auto_refuses_recipe_changes(model_path, tmp_path, capsys):
    assert main(["compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "auto",
                 "--set", "quantize-int8.per_channel=false"]) == 1
    assert "does not apply to --recipe auto" in capsys.readouterr().err


# ----------------------------------------------------------------------------- progress


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Pass:
    def __init__(self, name: str) -> None:
        self.name = name


class _Record:
    wall_s, modified = 0.5, True


def test_line_progress_is_periodic_and_quiet_on_quick_runs():
    clock, stream = _Clock(), io.StringIO()
    p = LineProgress(3, stream=stream, interval=5.0, clock=clock)
    p.before_pass(_Pass("fuse-ort"), None)
    p("fuse-ort", 1, 10)
    assert stream.getvalue() == ""  # nothing before 5 s
    clock.t = 6.0
    p("fuse-ort", 5, 10)
    clock.t = 7.0
    p("fuse-ort", 6, 10)  # within 5 s of the last line
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "[1/3] fuse-ort 5/10" in lines[0] and "~6s left" in lines[0]
    clock.t = 12.0
    p.after_pass(_Pass("fuse-ort"), None, _Record())
    p.before_pass(_Pass("quantize-int8"), None)
    assert "[2/3] quantize-int8" in stream.getvalue().splitlines()[-1]


def test_json_progress_events():
    clock, stream = _Clock(), io.StringIO()
    p = JsonProgress(1, stream=stream, clock=clock)
    p.before_pass(_Pass("plan"), None)
    p("plan", 1, 4)
    p("plan", 2, 4)  # same instant: throttled
    p("plan", 4, 4)  # a step's last event always comes
    p.after_pass(_Pass("plan"), None, _Record())
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["pass", "progress", "progress", "pass", "stage"]
    assert events[0] == {"event": "pass", "status": "start", "index": 1, "total": 1, "name": "plan", "t": 0.0}
    assert [e["done"] for e in events if e["event"] == "progress"] == [1, 4]
    assert events[-1]["stage"] == "validating"


def test_make_progress_picks_the_rendering():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert make_progress(None, as_json=False, total_passes=2, stream=io.StringIO()) is None  # scripts: quiet
    assert isinstance(make_progress(True, as_json=False, total_passes=2, stream=io.StringIO()), LineProgress)
    assert make_progress(None, as_json=True, total_passes=2, stream=io.StringIO()) is None
    assert isinstance(make_progress(True, as_json=True, total_passes=2, stream=io.StringIO()), JsonProgress)
    assert make_progress(False, as_json=False, total_passes=2, stream=Tty()) is None
    bar = make_progress(None, as_json=False, total_passes=2, stream=Tty())
    assert isinstance(bar, RichProgress)
    bar.before_pass(_Pass("x"), None)
    bar("x", 1, 2)
    bar.after_pass(_Pass("x"), None, _Record())
    bar.close()


def test_cli_json_progress_on_stderr(model_path, tmp_path, capsys):
    assert main(["--json", "compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--progress"]) == 0
    out = capsys.readouterr()
    data = _one_json(out.out)
    events = [json.loads(line) for line in out.err.splitlines()]
    starts = [e["name"] for e in events if e["event"] == "pass" and e["status"] == "start"]
    assert starts == [p["name"] for p in data["passes"] if not p.get("disabled")]
    assert all(e["total"] == len(data["passes"]) for e in events if e["event"] == "pass")

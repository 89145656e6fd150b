"""The README's examples run as written (on a tiny stand-in model, where they name files), and
the recipe example of docs/extending.md means what that page says."""

import re
import shlex
import tomllib
from pathlib import Path

import onnx_ir as ir
import pytest

from graphc.front.cli import build_parser
from graphc.core.recipes import recipe_from_dict
from tests.passes.graphs import mlp

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_README_LINES = 250


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_links_resolve():
    assert README.count("\n") <= MAX_README_LINES
    links = re.findall(r"\]\(([^)#]+)\)", README)
    local = [link for link in links if not link.startswith("http")]
    assert local and all((ROOT / link).exists() for link in local), [l for l in local if not (ROOT / l).exists()]


def test_no_internal_issue_references_in_docs():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bissues? ?#?\d", text, flags=re.I), path


def test_extending_recipe_example_merges_as_documented():
    from graphc.core.recipes import get_recipe

    block, decoder = _blocks("toml", (ROOT / "docs" / "extending.md").read_text(encoding="utf-8"))
    recipe = recipe_from_dict(tomllib.loads(block))
    # the [decoder] example is a valid table of a recipe that extends a built-in
    variant = recipe_from_dict({"name": "x", "extends": "int4", **tomllib.loads(decoder)}).decoder
    assert variant is not None and variant.tolerance.max_ppl_rise == 0.05
    base = get_recipe("int8").pass_names()
    assert recipe.pass_names() == [*base[:2], "cse", *[n for n in base[2:] if n != "quantize-embedding"]]
    step = next(s for s in recipe.steps if s.pass_name == "quantize-int8")
    assert step.options["per_channel"] is False and "outlier_ratio" in step.options


def test_toml_recipe_example_is_a_valid_recipe():
    (block,) = _blocks("toml")
    recipe = recipe_from_dict(tomllib.loads(block))
    assert "quantize-embedding" not in recipe.pass_names() and recipe.tolerance.min_cosine == 0.99


def test_cli_examples_parse():
    lines = [l.split("#")[0].strip() for b in _blocks("sh") for l in b.splitlines()]
    commands = [l for l in lines if l.startswith("graphc ")]
    assert len(commands) >= 5
    parser = build_parser()
    for line in commands:
        if line.split()[1:] == ["--version"]:
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args(["--version"])
            assert exit_.value.code == 0
            continue
        required = re.sub(r"\[[^\]]*\]", "", line)  # drop optional [..] groups
        parser.parse_args(shlex.split(required)[1:])
        optional = re.sub(r"[\[\]]", "", line)  # and with every optional part given
        parser.parse_args(shlex.split(optional)[1:])


def test_python_example_runs(tmp_path, monkeypatch):
    (block,) = _blocks("python")
    ir.save(mlp(), tmp_path / "minilm.onnx")  # a tiny stand-in with the README's file name
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme", "print": lambda *a, **k: None})
    assert (tmp_path / "minilm.int8.onnx").exists()


# the README's commands that need a real model (exports from Hugging Face weights) or a model
# builder folder (and int4-genai, made from it; tests/test_builder_input.py runs that form and
# `graphc generate` on a tiny one): parsed above, not run
_NOT_RUN = ("graphc export", "builder-fp32/", "int4-genai")


def _stand_ins(folder: Path) -> None:
    """The README's file names as tiny models and data: minilm.onnx and any.onnx (an MLP) with
    feeds.npz, model.onnx (an encoder) with its tokenizer beside it and notes.txt, vit.onnx (a
    Conv image model) with photos/, smollm2.onnx (a causal LM's signature)."""
    import numpy as np

    from tests import calibration_builders as cb

    ir.save(mlp(), folder / "minilm.onnx")
    model = mlp()
    ir.save(model, folder / "any.onnx")
    feed = {v.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 2 for d in v.shape])
            .astype(np.float32) for v in model.graph.inputs}
    np.savez(folder / "feeds.npz", **feed)
    cb.encoder(folder / "model.onnx")
    cb.make_tokenizer(folder)
    (folder / "notes.txt").write_text("\n".join(cb.lines(40)) + "\n")
    cb.vision(folder / "vit.onnx")
    cb.decoder(folder / "smollm2.onnx")
    cb.image_folder(folder / "photos")


def test_cli_examples_run(tmp_path, monkeypatch, capsys):
    """Every README command on a model file, run as written (required part) on a tiny stand-in
    with the README's file names: exit 0, or 3 where a tiny random model misses a tolerance."""
    from graphc.front.cli import main

    _stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    lines = [l.split("#")[0].strip() for b in _blocks("sh") for l in b.splitlines()]
    commands = [re.sub(r"\[[^\]]*\]", "", l) for l in lines if l.startswith("graphc ")]
    ran = []
    for line in commands:
        if any(s in line for s in _NOT_RUN) or line.split()[1:] == ["--version"]:
            continue
        argv = shlex.split(line)[1:]
        assert main(argv) in (0, 3), line
        ran.append(argv)
    capsys.readouterr()
    assert {"compress", "validate", "inspect", "report", "passes"} <= {a[0] if a[0] != "--json" else a[1] for a in ran}
    assert sum("--calibration-data" in a for a in ran) == 2 and any("--inputs" in a for a in ran)

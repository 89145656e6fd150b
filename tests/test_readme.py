"""The README's examples run as written (on a tiny stand-in model, where they name files)."""

import re
import shlex
import sys
import tomllib
from pathlib import Path

import onnx_ir as ir

from graphc.cli import build_parser
from graphc.recipes import recipe_from_dict
from tests.passes.graphs import mlp

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


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

"""The package as users install it: discovery, package data, version, fast import, the wheel."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import graphc
from graphc.core.recipes import BUILTIN, file_recipes, get_recipe, list_recipes, recipe_names

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("graphc", "passes", "exporters", "models", "recipes")


def test_every_source_folder_is_a_package():
    """setup.py finds sub-packages by their __init__.py: a folder of modules without one would
    be left out of the wheel (and work only from a checkout)."""
    missing = []
    for top in MAPPED:
        for folder, dirs, files in os.walk(ROOT / top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files) and "__init__.py" not in files:
                missing.append(os.path.relpath(folder, ROOT))
    assert not missing, f"folders of modules without __init__.py: {missing}"


def test_packaged_recipes_by_name():
    assert set(file_recipes()) == {p.stem for p in (ROOT / "recipes").glob("*.toml")} - set(BUILTIN)
    recipe = get_recipe("smollm2-int4")
    assert recipe.name == "smollm2-int4" and "mixed-precision" in recipe.pass_names()
    assert "smollm2-int4" in recipe_names() and "remove-padding" in recipe_names()
    assert {"int8", "smollm2-int4"} <= {r.name for r in list_recipes()}


def test_version_from_metadata():
    assert graphc.__version__ == version("graphc")
    out = subprocess.run([sys.executable, "-m", "graphc.front.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"graphc {graphc.__version__} (onnx ")
    assert out.stdout.count("\n") == 1


def test_import_and_help_load_no_onnx():
    """``import graphc`` and ``graphc --help`` must not import ONNX, onnx_ir or ONNX Runtime."""
    code = ("import sys, graphc, graphc.front.cli\n"
            "try:\n    graphc.front.cli.build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'numpy', 'onnxscript') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-300:]


def test_lazy_api_names_resolve():
    from graphc.front.api import compress

    assert graphc.compress is compress and "compress" in dir(graphc)
    import importlib

    from graphc.front.api import validate

    importlib.import_module("graphc.checks.validate")  # the module of that name lives in graphc.checks

    assert getattr(graphc, "validate") is validate and graphc.checks.validate.__name__ == "graphc.checks.validate"
    with pytest.raises(AttributeError):
        graphc.no_such_name  # noqa: B018
    code = "import graphc; print(graphc.core.io.load_model.__name__, graphc.checks.measure.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["load_model", "graphc.checks.measure"], out.stderr[-500:]


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_tree():
    """.ci/wheel_check.sh: build the wheel, install it in a fresh venv, run graphc from a temp dir."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / ".ci" / "wheel_check.sh")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert "wheel check: OK" in out.stdout

"""graphc's layers import downwards only: core never imports checks or front, checks never
imports front (lazy imports inside functions included)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "graphc"
IMPORT = re.compile(r"^\s*(?:from|import)\s+graphc\.(\w+)", re.M)
ABOVE = {"core": {"checks", "front"}, "checks": {"front"}}


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_layer_imports_only_below(layer):
    wrong = [f"{path.relative_to(ROOT.parent)} imports graphc.{m}"
             for path in sorted((ROOT / layer).glob("*.py"))
             for m in IMPORT.findall(path.read_text()) if m in ABOVE[layer]]
    assert not wrong, wrong


def test_every_layer_has_modules():
    for layer in ("core", "checks", "front"):
        assert len(list((ROOT / layer).glob("*.py"))) > 3, layer


def test_exporters_never_import_the_model_specs():
    """graphc.models builds on the exporters' wrappers; the exporters take a spec object."""
    folder = ROOT.parent / "exporters"
    wrong = [p.name for p in sorted(folder.glob("*.py"))
             if re.search(r"^\s*(?:from|import)\s+graphc\.models\b", p.read_text(), re.M)]
    assert not wrong, wrong

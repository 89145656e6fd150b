"""Fixtures for the fuzz suite: the real tiny exports, made once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, object]:
    """Tiny BERT and tiny Llama (graphc.models.fixtures) from the dynamo and the legacy
    torch exporter: label -> path."""
    pytest.importorskip("transformers")
    from graphc.models.fixtures import export_tiny

    folder = tmp_path_factory.mktemp("tiny_exports")
    paths = {}
    for kind in ("bert", "llama"):
        for dynamo in (True, False):
            label = f"{kind}-{'dynamo' if dynamo else 'legacy'}"
            path = folder / f"{label}.onnx"
            result = export_tiny(kind, path, dynamo=dynamo)
            assert getattr(result, "exporter", "dynamo" if dynamo else "legacy") == ("dynamo" if dynamo else "legacy")
            paths[label] = path
    return paths

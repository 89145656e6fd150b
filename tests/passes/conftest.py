"""Fixtures shared by the pass tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer synthetic Llama (hidden 64, 4 heads, 2 KV heads, vocabulary 256) with its weights in
    external data: the path of its .onnx."""
    from graphc.models.synthetic_llama import PRESETS, write_synthetic_llama

    path = tmp_path_factory.mktemp("tiny-llama") / "tiny.onnx"
    write_synthetic_llama(path, PRESETS["tiny"])
    return path

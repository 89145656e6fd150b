"""Checking a result against its original: validation with ONNX Runtime, the feeds it runs on
(the user's, real texts and images, synthesized), task metrics, per-layer attribution,
inspection and provenance. Built on ``graphc.core``; never imports ``graphc.front``."""

from graphc.core import submodules_on_access

__getattr__ = submodules_on_access(__name__)

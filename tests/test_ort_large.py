"""Sessions for in-memory models past protobuf's 2 GB: weights supplied beside the bytes."""

import numpy as np
import onnx_ir as ir

from graphc.core import ort_large
from graphc.checks.validate import make_session
from tests.passes.graphs import mlp


def _feed():
    return {"x": np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)}


def test_supplied_initializers_give_the_same_outputs(monkeypatch):
    model = mlp()
    ref = make_session(model).run(None, _feed())
    monkeypatch.setattr(ort_large, "PROTO_LIMIT", 0)
    monkeypatch.setattr(ort_large, "MIN_EXTERNAL", 1)
    assert ort_large.needs_external(model)
    sess = make_session(model)
    assert len(sess._graphc_arrays) == 4  # every weight went beside the bytes
    for a, b in zip(ref, sess.run(None, _feed())):
        np.testing.assert_array_equal(a, b)
    # the model itself is untouched: its weights are still in memory, in place
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def test_external_data_models_are_read_in_place(tmp_path, monkeypatch):
    model = mlp()
    ref = make_session(model).run(None, _feed())
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data", size_threshold_bytes=0)
    loaded = ir.load(path)
    monkeypatch.setattr(ort_large, "PROTO_LIMIT", 0)
    monkeypatch.setattr(ort_large, "MIN_EXTERNAL", 1)
    for a, b in zip(ref, make_session(loaded).run(None, _feed())):
        np.testing.assert_array_equal(a, b)


def test_small_external_tensors_are_supplied_too(tmp_path, monkeypatch):
    """A large model's small external tensors (norm gains) cannot stay references: the bytes
    have no folder to resolve them against."""
    model = mlp()
    ref = make_session(model).run(None, _feed())
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data", size_threshold_bytes=0)
    loaded = ir.load(path)
    monkeypatch.setattr(ort_large, "PROTO_LIMIT", 0)  # large, but every tensor below MIN_EXTERNAL
    sess = make_session(loaded)
    assert len(sess._graphc_arrays) == 4
    for a, b in zip(ref, sess.run(None, _feed())):
        np.testing.assert_array_equal(a, b)

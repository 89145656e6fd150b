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


def _if_mlp(tmp_path):
    """The mlp with an If whose branches hold their own weight (saved as external data beside it)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    proto = ir.serde.serialize_model(mlp())
    out = proto.graph.output[0].name
    proto.graph.output[0].name = "body"
    for node in proto.graph.node:
        node.output[:] = ["body" if o == out else o for o in node.output]

    def branch(name):
        w = numpy_helper.from_array(rng.standard_normal((1,)).astype(np.float32), f"{name}_w")
        return helper.make_graph([helper.make_node("Add", ["body", f"{name}_w"], [f"{name}_o"])], name, [],
                                 [helper.make_value_info(f"{name}_o", helper.make_tensor_type_proto(TensorProto.FLOAT, None))],
                                 initializer=[w])

    proto.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    proto.graph.node.append(helper.make_node("If", ["cond"], [out], then_branch=branch("a"), else_branch=branch("b")))
    path = tmp_path / "if.onnx"
    ir.save(ir.serde.deserialize_model(proto), path, external_data="if.onnx.data", size_threshold_bytes=0)
    return ir.load(path)


def test_weightless_sessions_match_and_never_see_later_in_place_changes(tmp_path, monkeypatch):
    """Above WEIGHTLESS_MIN an in-memory model reaches ORT as a weightless protobuf plus its arrays
    (fast to build); the outputs are the serialized path's bit for bit, external data in subgraphs
    included, and the session holds copies: a later in-place write to the model's weights does
    not reach it."""
    from graphc.core import session as sessions

    model = mlp()
    for value in model.graph.initializers.values():  # writable arrays, as a pass makes them
        value.const_value = ir.tensor(np.array(value.const_value.numpy()), name=value.name)
    feed = _feed()
    ref = make_session(model).run(None, feed)
    monkeypatch.setattr(sessions, "WEIGHTLESS_MIN", 1)
    monkeypatch.setattr(ort_large, "MIN_EXTERNAL", 1)
    sess = make_session(model)
    assert len(sess._graphc_arrays) == 4
    for a, b in zip(ref, sess.run(None, feed)):
        np.testing.assert_array_equal(a, b)
    for value in model.graph.initializers.values():  # in place, after the session was built
        value.const_value.numpy()[...] = 0
    for a, b in zip(ref, sess.run(None, feed)):
        np.testing.assert_array_equal(a, b)

    loaded = _if_mlp(tmp_path)  # every tensor external, two of them inside If branches
    cond = {**feed, "cond": np.array(True)}
    monkeypatch.setattr(sessions, "WEIGHTLESS_MIN", 1 << 40)
    want = make_session(loaded).run(None, cond)
    monkeypatch.setattr(sessions, "WEIGHTLESS_MIN", 1)
    sess = make_session(loaded)
    assert sess._graphc_arrays
    for a, b in zip(want, sess.run(None, cond)):
        np.testing.assert_array_equal(a, b)

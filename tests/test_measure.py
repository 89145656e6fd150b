"""graphc.checks.measure on a tiny hand-built encoder-like ONNX model (no torch, fast)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.checks import measure
from graphc.core.errors import ValidationError

VOCAB, HIDDEN = 50, 8


def tiny_encoder(path, *, seed: int = 0, external: bool = False, scale: float = 1.0):
    """input_ids, attention_mask [B, S] → last_hidden_state [B, S, H] = Gather(E) @ W."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w = (rng.standard_normal((HIDDEN, HIDDEN)) * scale).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["last_hidden_state"]),
        helper.make_node("Identity", ["attention_mask"], ["mask_out"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["batch", "seq"])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(proto, str(path))
    return path, emb, w


def feed(batch: int = 2, seq: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2:] = 0
    return {"input_ids": rng.integers(1, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


@pytest.fixture
def model(tmp_path):
    return tiny_encoder(tmp_path / "tiny.onnx")


def test_session_and_feed_for(model):
    path, emb, w = model
    sess = measure.session(path, threads=2)
    f = {**feed(), "token_type_ids": np.zeros((2, 6), np.int64)}  # extra input is dropped
    out = sess.run(None, measure.feed_for(sess, f))[0]
    np.testing.assert_allclose(out, emb[f["input_ids"]] @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValidationError, match="attention_mask"):
        measure.feed_for(sess, {"input_ids": f["input_ids"]})
    with pytest.raises(ValidationError):
        measure.session(path.parent / "missing.onnx")


def test_pad_feed():
    f = feed(seq=5)
    padded = measure.pad_feed(f, 9, {"input_ids": 3})
    assert padded["input_ids"].shape == (2, 9)
    assert (padded["input_ids"][:, 5:] == 3).all() and (padded["attention_mask"][:, 5:] == 0).all()
    np.testing.assert_array_equal(padded["attention_mask"][:, :5], f["attention_mask"])
    with pytest.raises(ValueError):
        measure.pad_feed(f, 4)


def test_latency_stats():
    lat = measure.latency_stats([0.003, 0.001, 0.002, 0.010], warmup=2)
    assert lat.median_ms == pytest.approx(2.5)
    assert lat.min_ms == pytest.approx(1.0)
    assert lat.reps == 4 and lat.warmup == 2
    assert set(lat.to_dict()) == {"median_ms", "mean_ms", "p10_ms", "p90_ms", "min_ms", "reps", "warmup"}
    with pytest.raises(ValueError):
        measure.latency_stats([])


def test_interleaved_latency(tmp_path, model):
    other, _, _ = tiny_encoder(tmp_path / "other.onnx", seed=3)
    sessions = {"a": measure.session(model[0]), "b": measure.session(other)}
    calls = []
    res = measure.interleaved_latency(sessions, feed(), reps=5, warmup=2, progress=lambda d, t: calls.append((d, t)))
    assert set(res) == {"a", "b"}
    assert all(r.reps == 5 and r.median_ms > 0 and r.min_ms <= r.median_ms for r in res.values())
    assert calls[-1] == (14, 14) and len(calls) == 14
    # one feed per model
    res = measure.interleaved_latency(sessions, {"a": feed(), "b": feed(batch=1)}, reps=2, warmup=0)
    assert res["b"].reps == 2
    with pytest.raises(ValueError):
        measure.interleaved_latency(sessions, {"a": feed()}, reps=1)
    with pytest.raises(ValueError):
        measure.interleaved_latency(sessions, feed(), reps=0)


def test_mean_pool_ignores_masked_tokens():
    h = np.zeros((1, 3, 2), np.float32)
    h[0, 0] = [3.0, 0.0]
    h[0, 1] = [1.0, 0.0]
    h[0, 2] = [0.0, 100.0]  # masked out
    pooled = measure.mean_pool(h, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(pooled, [[1.0, 0.0]])
    rng = np.random.default_rng(0)
    pooled = measure.mean_pool(rng.standard_normal((4, 5, 7)), np.ones((4, 5), np.int64))
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0)


def test_embeddings_session_and_callable_agree(model):
    path, emb, w = model
    sess = measure.session(path)
    feeds = [feed(seed=1), feed(batch=3, seq=4, seed=2)]
    got = measure.embeddings(sess, feeds)
    assert got.shape == (5, HIDDEN)
    ref = measure.embeddings(lambda f: emb[f["input_ids"]] @ w, feeds)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    by_name = measure.embeddings(sess, feeds, output="last_hidden_state")
    np.testing.assert_allclose(by_name, got)
    seen = []
    measure.embeddings(sess, feeds, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]


def test_cosine_stats(model):
    path, _, _ = model
    feeds = [feed(seed=s) for s in range(3)]
    a = measure.embeddings(measure.session(path), feeds)
    same = measure.cosine_stats(a, a)
    assert same.mean == pytest.approx(1.0) and same.min == pytest.approx(1.0) and same.count == 6
    rng = np.random.default_rng(0)
    b = a + 0.1 * rng.standard_normal(a.shape)
    stats = measure.cosine_stats(b, a)
    assert stats.min <= stats.p01 <= stats.mean < 1.0
    assert stats.min == pytest.approx(measure.row_cosines(b, a).min())
    assert measure.row_cosines(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0
    with pytest.raises(ValidationError):
        measure.cosine_stats(a[:2], a)


def test_files_bytes_counts_external_data(tmp_path):
    inline, _, _ = tiny_encoder(tmp_path / "inline.onnx")
    assert measure.files_bytes(inline) == inline.stat().st_size
    ext, _, _ = tiny_encoder(tmp_path / "ext.onnx", external=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file()
    assert measure.files_bytes(ext) == ext.stat().st_size + data.stat().st_size
    assert data.stat().st_size >= (VOCAB * HIDDEN + HIDDEN * HIDDEN) * 4


def test_probe_helpers():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 40)
    x = rng.standard_normal((80, 4)) * 0.1
    x[:, 0] += np.where(y == 1, 2.0, -2.0)
    probe = measure.train_probe(x, y)
    assert measure.probe_accuracy(probe, x, y) == 1.0
    assert measure.probe_accuracy(probe, -x, y) == 0.0

    class Constant:
        def predict(self, x):
            return np.zeros(len(x), np.int64)

    assert measure.probe_accuracy(Constant(), x, y) == 0.5
    assert measure.majority_accuracy(np.array([1, 1, 1, 0])) == 0.75
    assert measure.majority_accuracy(np.array([])) == 0.0

"""The run's moments cache: one calibration sweep serves awq-scale, mixed-precision's held-out
GPTQ probes and quantize-nbits, with the same result as each pass sweeping for itself."""

import numpy as np
import onnx_ir as ir
import pytest

from graphc.checks.validate import make_session, synthesize_inputs
from graphc.core.calibrate import exposing_session, input_moments
from graphc.core.manager import PassManager
from graphc.core.moments import MomentsCache
from graphc.core.pass_base import PassContext
from graphc.core.registry import get_pass
from tests.passes.test_awq_scale import _block

STEPS = [
    ("awq-scale", {"bits": 4, "block_size": 32, "symmetric": False, "method": "rtn"}),
    ("mixed-precision", {"max_bits": 5.0, "bits": [4, 8], "block_sizes": [32], "method": "gptq", "probe_block": 32,
                         "feeds": 1, "held_out": True, "embeddings": False}),
    ("quantize-nbits", {"bits": 4, "block_size": 32, "symmetric": False, "method": "gptq", "act_order": True}),
]


def _feeds(model, count=5):
    return synthesize_inputs(model, count=count, seed=3, shapes={"x": [2, 16, 64]})


def _run(cache):
    model = _block(seed=1)
    feeds = _feeds(model)
    context = PassContext(calibration=feeds, calibration_source="synthetic", moments=cache)
    passes = [get_pass(name).from_dict(options, context) for name, options in STEPS]
    records = PassManager(passes).run(model)
    return model, feeds, records


def _weights(model):
    return {name: v.const_value.numpy().copy() for name, v in sorted(model.graph.initializers.items())
            if v.const_value is not None}


def test_one_sweep_serves_three_passes_with_the_same_result():
    cache = MomentsCache()
    cached, feeds, records = _run(cache)
    plain, _, plain_records = _run(None)
    assert cache.sweeps == 1  # awq's sweep; mixed-precision (held out) and quantize-nbits read it
    assert cache.hits == 2
    assert [r.modified for r in records] == [r.modified for r in plain_records] == [True, True, True]
    plan = records[1].stats["choices"]
    assert [c["bits"] for c in plan] == [c["bits"] for c in plain_records[1].stats["choices"]]
    a, b = _weights(cached), _weights(plain)
    assert a.keys() == b.keys()
    for name in a:  # float32 vs float64 Gram products: the same codes, scales to float rounding
        if a[name].dtype == np.uint8:
            assert np.mean(a[name] != b[name]) < 0.01, name
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-6, err_msg=name)
    out = make_session(cached).run(None, feeds[0])[0]
    ref = make_session(plain).run(None, feeds[0])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-3)


def test_held_out_sums_equal_a_sweep_of_the_remaining_feeds():
    model = _block(seed=2)
    feeds = _feeds(model)
    values = [n.inputs[0] for n in model.graph if n.op_type == "MatMul"]
    cache = MomentsCache()
    cache.prepare(feeds, [2])
    whole = input_moments(model, values, feeds, pass_name="t", cache=cache)
    tail = input_moments(model, values, feeds[2:], pass_name="t", cache=cache)
    assert cache.sweeps == 1 and cache.hits == 1
    direct_tail = input_moments(model, values, feeds[2:], pass_name="t")
    direct_whole = input_moments(model, values, feeds, pass_name="t")
    for name in direct_tail:
        assert tail[name].tokens == direct_tail[name].tokens == 3 * 2 * 16
        np.testing.assert_allclose(tail[name].gram, direct_tail[name].gram, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tail[name].abs_mean, direct_tail[name].abs_mean, rtol=1e-6)
        np.testing.assert_allclose(whole[name].gram, direct_whole[name].gram, rtol=1e-6, atol=1e-6)


def test_the_sweep_reports_its_progress_feed_by_feed_and_segment_by_segment():
    from graphc.core import streaming

    model = _block(seed=2)
    feeds = _feeds(model)
    values = [n.inputs[0] for n in model.graph if n.op_type == "MatMul"]
    seen = []
    cache = MomentsCache()
    cache.prepare(feeds, [])
    input_moments(model, values, feeds, pass_name="t", cache=cache, report=lambda d, t: seen.append((d, t)))
    assert seen == [(i + 1, len(feeds)) for i in range(len(feeds))]
    seen.clear()
    with streaming.streaming("always", segment_bytes=1):
        input_moments(model, values, feeds, pass_name="t", report=lambda d, t: seen.append((d, t)))
    assert len(seen) >= 2 and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, len(seen) + 1))


def test_other_feeds_and_other_values_are_not_answered_from_the_cache():
    model = _block(seed=2)
    feeds = _feeds(model)
    values = [n.inputs[0] for n in model.graph if n.op_type == "MatMul"]
    cache = MomentsCache()
    cache.prepare(feeds, [])
    input_moments(model, values, feeds, pass_name="t", cache=cache)
    assert cache.lookup(["n1"], feeds[1:]) is None  # no snapshot announced for 1 held-out feed
    assert cache.lookup(["n1"], feeds[::-1]) is None
    assert cache.lookup(["h"], feeds) is None  # not a MatMul input: not collected
    assert cache.lookup(["n1", "prod"], feeds) is not None  # every MatMul input was collected at once
    # a request the cache cannot serve sweeps for itself and leaves the cache as it was
    input_moments(model, values, feeds[::-1], pass_name="t", cache=cache)
    assert cache.sweeps == 1


def test_rescale_follows_a_value_divided_per_channel():
    model = _block(seed=4)
    feeds = _feeds(model)
    n1 = next(n.inputs[0] for n in model.graph if n.name == "q_proj")
    cache = MomentsCache()
    cache.prepare(feeds, [1])
    before = input_moments(model, [n1], feeds, pass_name="t", cache=cache)[n1.name]
    s = np.linspace(0.5, 2.0, 64)
    cache.rescale(n1.name, s)
    after = input_moments(model, [n1], feeds, pass_name="t", cache=cache)[n1.name]
    np.testing.assert_allclose(after.gram, before.gram / np.outer(s, s), rtol=1e-12)
    np.testing.assert_allclose(after.abs_mean, before.abs_mean / s, rtol=1e-12)
    held = input_moments(model, [n1], feeds[1:], pass_name="t", cache=cache)[n1.name]
    direct = input_moments(model, [n1], feeds[1:], pass_name="t")[n1.name]
    np.testing.assert_allclose(held.gram, direct.gram / np.outer(s, s), rtol=1e-5, atol=1e-6)


def test_a_pass_that_changes_activations_empties_the_cache():
    model = _block(seed=5)
    feeds = _feeds(model)
    cache = MomentsCache()
    context = PassContext(calibration=feeds, calibration_source="synthetic", moments=cache)
    steps = [("awq-scale", STEPS[0][1]), ("quantize-nbits", {"bits": 4, "block_size": 32, "method": "rtn"}),
             ("quantize-nbits", STEPS[2][1])]
    passes = [get_pass(name).from_dict(options, context) for name, options in steps]
    PassManager(passes).run(model)
    # awq swept (and kept the cache), the RTN quantize-nbits changed the activations (cache emptied),
    # the GPTQ one (nothing left to quantize) asked nothing
    assert cache.sweeps == 1 and len(cache) == 0


@pytest.mark.parametrize("only", [False, True])
def test_exposing_session_only_runs_what_the_values_need(only):
    model = _block(seed=6)
    feeds = _feeds(model, count=1)
    session, _ = exposing_session(model, ["n2"], only=only)
    names = [o.name for o in session.get_outputs()]
    assert names == (["n2"] if only else ["y", "n2"])
    got = session.run(["n2"], feeds[0])[0]
    ref, _ = exposing_session(model, ["n2"])
    np.testing.assert_array_equal(got, ref.run(["n2"], feeds[0])[0])


def test_dead_nodes_are_left_out_of_a_sweep():
    from graphc.core import calibrate

    model = _block(seed=6)
    proto = ir.serde.serialize_model(model)
    del proto.graph.output[:]
    proto.graph.output.add().name = "n2"
    calibrate._drop_dead_nodes(proto.graph)
    kept = {n.name for n in proto.graph.node if n.name}
    assert "rms" in kept and "q_proj" in kept
    assert not kept & {"gate_proj", "up_proj", "down_proj"}


def test_a_tied_head_reading_the_table_through_a_transpose_is_collected():
    from onnx import TensorProto, helper, numpy_helper

    from graphc.core.calibrate import weight_inputs

    table = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]),
         helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
         helper.make_node("MatMul", ["e", "tt"], ["logits"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 50])],
        [numpy_helper.from_array(table, "table")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(v.name, k) for v, k in weight_inputs(model)] == [("e", 16)]


def test_sums_on_disk_give_the_in_memory_results_bit_for_bit():
    """A streamed sweep's sums live on disk and are derived on access (held-out differences,
    AWQ's rescaling, means): the same numbers as the in-memory forms."""
    from graphc.core.calibrate import _moments
    from graphc.core.moments import SpillFolder, Sums

    rng = np.random.default_rng(0)
    g = rng.standard_normal((64, 64))
    inv = rng.random(64) + 0.5

    def pair():
        memory = Sums(g * 3, np.ones(64), 9), Sums(g.copy(), np.ones(64), 4)
        disk = Sums(g * 3, np.ones(64), 9), Sums(g.copy(), np.ones(64), 4)
        folder = SpillFolder()
        for s in disk:
            s.spill(folder)
        return memory, disk

    (total, head), (total_d, head_d) = pair()
    assert total_d.spilled and total_d.nbytes() == 64 * 8
    np.testing.assert_array_equal(total.minus(head).gram, total_d.minus(head_d).gram)
    np.testing.assert_array_equal(total.scaled(inv).gram, total_d.scaled(inv).gram)
    np.testing.assert_array_equal(_moments(total.minus(head)).gram, _moments(total_d.minus(head_d)).gram)
    np.testing.assert_array_equal(total_d.gram, g * 3)  # reading does not change what is stored


def test_sums_on_disk_read_by_rows_and_as_float32_give_the_same_numbers():
    """Rows of a spilled (or derived) gram are read alone, and a float32 copy is built from row
    blocks, never the whole float64 matrix: the same numbers as the whole array."""
    from graphc.core.calibrate import _moments
    from graphc.core.moments import SpillFolder, Sums

    rng = np.random.default_rng(1)
    g = rng.standard_normal((300, 300))
    inv = rng.random(300) + 0.5
    folder = SpillFolder()
    total, head = Sums(g * 3, np.ones(300), 9), Sums(g.copy(), np.ones(300), 4)
    memory = _moments(Sums(g * 3, np.ones(300), 9).minus(Sums(g.copy(), np.ones(300), 4)).scaled(inv))
    for s in (total, head):
        s.spill(folder)
    derived = total.minus(head).scaled(inv)
    np.testing.assert_array_equal(derived.rows(37, 290), derived.gram[37:290])
    np.testing.assert_array_equal(total.rows(299, 400), (g * 3)[299:])
    disk = _moments(derived)
    np.testing.assert_array_equal(disk.gram, memory.gram)
    f32 = disk.gram_float32()
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, memory.gram.astype(np.float32))
    np.testing.assert_array_equal(memory.gram_float32(), f32)


def test_gptq_past_large_hessian_gives_the_same_codes_from_a_float32_hessian(monkeypatch):
    """quantize-nbits hands GPTQ a float32 Hessian past LARGE_HESSIAN inputs (read by rows, not
    beside the float64 one): GPTQ works in float32 there, so the codes are the same."""
    from graphc.passes import _blockquant as bq

    monkeypatch.setattr(bq, "LARGE_HESSIAN", 64)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 96)) * np.exp(rng.standard_normal(96))
    h = x.T @ x / 400
    w_t = rng.standard_normal((24, 96)).astype(np.float32)
    a = bq.gptq(w_t, h, 4, 32, symmetric=False, act_order=True, damp=0.1)
    b = bq.gptq(w_t, h.astype(np.float32), 4, 32, symmetric=False, act_order=True, damp=0.1)
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero, b.zero)


def test_sweep_gathers_rows_of_several_feeds_into_one_gram(monkeypatch):
    """Rows of a few feeds make one x^T x: the sums, and the snapshots after the first n feeds,
    are those of one feed at a time, and a bound of one row takes each feed alone."""
    from graphc.core import calibrate

    model = _block(seed=2)
    feeds = _feeds(model, count=7)
    names = sorted({v.name for v, _ in calibrate.weight_inputs(model)})
    grams = []
    real = calibrate._gram
    monkeypatch.setattr(calibrate, "_gram", lambda rows: grams.append(len(rows)) or real(rows))
    monkeypatch.setattr(calibrate, "GRAM_ROWS", 64)  # a feed holds 2 x 16 = 32 rows
    batched, batched_heads = calibrate._sweep(model, names, feeds, [3])
    assert max(grams) == 64 and min(grams) == 32  # two feeds, or the one before a snapshot / at the end
    grams.clear()
    monkeypatch.setattr(calibrate, "GRAM_PENDING_BYTES", 1)
    alone, alone_heads = calibrate._sweep(model, names, feeds, [3])
    assert set(grams) == {32}
    for got, want in ((batched, alone), (batched_heads[3], alone_heads[3])):
        assert got.keys() == want.keys() == set(names)
        for name in names:
            assert got[name].tokens == want[name].tokens
            np.testing.assert_allclose(got[name].gram, want[name].gram, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(got[name].abs_sum, want[name].abs_sum, rtol=1e-12)
    assert batched_heads[3][names[0]].tokens == 3 * 32


def test_sweep_of_feeds_of_unequal_length_keeps_every_row(monkeypatch):
    """Feeds of different lengths and padding gathered into one x^T x: the sums are those of
    every kept row, padded rows left out."""
    from graphc.core import calibrate

    model = _block(seed=4)
    rng = np.random.default_rng(5)
    feeds = []
    for count, seq in ((2, 16), (1, 40), (2, 8), (3, 24)):
        mask = np.ones((count, seq), np.int64)
        mask[0, seq // 2:] = 0  # a padded tail: its rows are left out
        feeds.append({"x": rng.standard_normal((count, seq, 64)).astype(np.float32), "attention_mask": mask})
    names = sorted({v.name for v, _ in calibrate.weight_inputs(model)})
    monkeypatch.setattr(calibrate, "GRAM_ROWS", 30)  # kept rows 24 + 20, then 12 + 60 in one x^T x
    batched, _ = calibrate._sweep(model, names, feeds, [])
    session, inputs = calibrate.exposing_session(model, names)
    for name in names:
        rows = []
        for feed in feeds:
            out = session.run([name], {k: v for k, v in feed.items() if k in inputs})[0]
            rows.append(calibrate.token_rows(out, feed["attention_mask"]).astype(np.float64))
        rows = np.concatenate(rows)
        assert batched[name].tokens == len(rows) == sum(int(f["attention_mask"].sum()) for f in feeds)
        np.testing.assert_allclose(batched[name].gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(batched[name].abs_sum, np.abs(rows).sum(0), rtol=1e-6)


def test_token_rows_keeps_the_rows_the_mask_keeps():
    from graphc.core import calibrate

    out = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    whole = calibrate.token_rows(out, np.ones((2, 3), np.int64))
    assert whole.shape == (6, 4) and np.shares_memory(whole, out)  # nothing padded: no copy
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(calibrate.token_rows(out, mask), out.reshape(6, 4)[[0, 1, 3]])
    assert calibrate.token_rows(out, None).shape == (6, 4)

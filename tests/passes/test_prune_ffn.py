"""prune-ffn on tiny BERT (Gelu / fused BiasGelu) and Llama (SwiGLU) exports."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphc.core import io
from graphc.core.errors import PreconditionError
from graphc.core.pass_base import PassContext
from graphc.passes.fuse_ort import FuseOrt
from graphc.passes.prune_ffn import PruneFfn, find_ffns
from graphc.checks.validate import make_session, synthesize_inputs

pytest.importorskip("torch")

DOWN = {"bert": "output.dense", "llama": "mlp.down_proj"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from graphc.models.fixtures import export_tiny

    folder = tmp_path_factory.mktemp("tiny")
    paths = {}
    for kind in ("bert", "llama"):
        paths[kind] = folder / f"{kind}.onnx"
        export_tiny(kind, paths[kind])
    return paths


def _load(exports, kind, fused):
    model = io.load_model(exports[kind])
    if fused:
        FuseOrt()(model)
    return model


def _run(model, feeds):
    session = make_session(model)
    return [session.run(None, f)[0] for f in feeds]


def _prune(model, calib, **options):
    return PruneFfn(PruneFfn.Options(**options), PassContext(calibration=calib))(model)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_half_the_neurons(exports, kind, fused):
    model = _load(exports, kind, fused)
    ffns = find_ffns(model.graph)
    assert len(ffns) == 2 and all(f.width == 64 for f in ffns)
    assert [len(f.ups) for f in ffns] == ([1, 1] if kind == "bert" else [2, 2])  # SwiGLU: gate and up
    calib = synthesize_inputs(model, count=6, seed=1)
    test = synthesize_inputs(model, count=2, seed=7)
    ref = _run(model, test)
    result = _prune(model, calib, fraction=0.5)
    assert result.modified and result.stats.counts["neurons_removed"] == 64
    for f in ffns:
        assert f.down.node.inputs[1].const_value.shape == (32, 32)
        assert all(u.node.inputs[1].const_value.shape == (32, 32) for u in f.ups)
    if kind == "bert" and fused:  # BiasGelu's per-neuron bias is sliced with the columns
        assert all(n.inputs[1].const_value.shape == (32,) for n in model.graph if n.op_type == "BiasGelu")
    assert model.metadata_props["graphc.arch.intermediate_size"] == "32"
    outs = _run(model, test)
    assert all(o.shape == r.shape and np.isfinite(o).all() for o, r in zip(outs, ref))
    onnx.checker.check_model(ir.serde.serialize_model(model))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_correction_reduces_the_error(exports, kind):
    """Each FFN's output on held-out inputs, pruned with and without the refit of the down
    projection (llama's down projection has no bias: the refit adds one)."""
    from graphc.passes._prune import activations, relative_error

    def ffn_outputs(model):
        return [f.down.output for f in find_ffns(model.graph)]

    base = _load(exports, kind, False)
    calib = synthesize_inputs(base, count=32, seed=1)
    test = synthesize_inputs(base, count=3, seed=11)
    ref = list(activations(base, ffn_outputs(base), test, pass_name="test").values())
    errors = {}
    for correct in (False, True):
        model = _load(exports, kind, False)
        result = _prune(model, calib, fraction=0.5, correct=correct)
        got = list(activations(model, ffn_outputs(model), test, pass_name="test").values())
        errors[correct] = [relative_error(g, r) for g, r in zip(got, ref)]
    # measured (share of the output's variance lost), per FFN: llama 0.331 -> 0.232 and
    # 0.278 -> 0.224 (SwiGLU on random weights: little linear redundancy); bert passes 0.8 too
    assert all(c < 0.9 * p for c, p in zip(errors[True], errors[False])), errors
    assert all("corrected (ridge" in note for note in result.stats.notes)


def test_activations_stop_at_max_rows_on_whole_feeds(exports):
    """The planner's pruning refits cap the calibration rows they hold (a decoder's text held
    13 GB of them): feeds are read in order until the rows reach the cap."""
    from graphc.passes._plan.measure import ACTIVATION_BYTES, activation_rows
    from graphc.passes._prune import activations

    base = _load(exports, "llama", False)
    feeds = synthesize_inputs(base, count=6, seed=1)
    values = [f.down.node.inputs[0] for f in find_ffns(base.graph)]
    every = activations(base, values, feeds, pass_name="test")
    per_feed = len(next(iter(every.values()))) // len(feeds)
    capped = activations(base, values, feeds, pass_name="test", max_rows=2 * per_feed + 1)
    for name, rows in capped.items():
        assert len(rows) == 3 * per_feed  # the third feed passes the cap and is kept whole
        np.testing.assert_array_equal(rows, every[name][: 3 * per_feed])
    widths = [int(v.shape[-1]) for v in values]
    assert activation_rows(values) == max(8 * max(widths), ACTIVATION_BYTES // (4 * sum(widths)))


def test_nothing_requested_or_nothing_to_remove_changes_nothing(exports):
    model = _load(exports, "llama", False)
    calib = synthesize_inputs(model, count=2, seed=1)
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not _prune(model, calib).modified
    assert not _prune(model, calib, fraction=0.01).modified  # 1% of 64 rounds to none
    result = _prune(model, calib, max_error=1e-12)
    assert not result.modified and "kept all" in result.stats.notes[0]
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_error_budget_prunes_more_when_looser(exports):
    calib = synthesize_inputs(_load(exports, "bert", True), count=8, seed=1)
    removed = []
    for budget in (0.01, 0.2, 100.0):
        model = _load(exports, "bert", True)
        removed.append(_prune(model, calib, max_error=budget).stats.counts.get("neurons_removed", 0))
    assert removed[0] <= removed[1] < removed[2] == 2 * 63  # min_keep=1 neuron per FFN


def test_bad_requests(exports):
    model = _load(exports, "bert", False)
    calib = synthesize_inputs(model, count=2, seed=1)
    with pytest.raises(PreconditionError, match="FFN .* has 64"):
        _prune(model, calib, count=64)
    with pytest.raises(PreconditionError, match="fraction must be in"):
        _prune(model, calib, fraction=-0.1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).reshape(-1).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    plain = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(PreconditionError, match="no FFN found"):
        _prune(plain, [{"x": np.ones((2, 8), np.float32)}], fraction=0.5)


def test_fast_prune_recipe_on_tiny_bert(exports, tmp_path):
    """The fast-prune recipe end to end: pruned, padding removed, then int8 (attention keeps
    the pruned head count)."""
    import graphc

    out = tmp_path / "fast.onnx"
    result = graphc.compress(exports["bert"], out, recipe="fast-prune", force=True, attribution=False)
    ran = {r.name for r in result.passes if r.modified}
    assert {"prune-heads", "prune-ffn", "remove-padding", "quantize-int8"} <= ran
    model = io.load_model(out)
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert [n.attributes.get_int("num_heads") for n in mha] == [3, 3]  # 25% of 4 heads
    assert model.metadata_props["graphc.arch.intermediate_size_per_layer"] == "32,32"
    assert result.validation is not None and result.validation.output_cosine > 0.5


def test_fast_recipe_on_tiny_bert(exports, tmp_path):
    """The fast recipe: nothing pruned, padding removed, int8; validation (padding left out) holds."""
    import graphc

    out = tmp_path / "fast.onnx"
    result = graphc.compress(exports["bert"], out, recipe="fast", force=True, attribution=False)
    ran = {r.name for r in result.passes if r.modified}
    assert {"remove-padding", "quantize-int8"} <= ran and not {"prune-heads", "prune-ffn"} & ran
    model = io.load_model(out)
    assert any(n.op_type == "NonZero" for n in model.graph)
    assert result.validation is not None and result.validation.output_cosine > 0.9

"""prune-heads on tiny BERT / Llama (GQA) exports, unfused and fused, and on hand-built
GroupQueryAttention and packed Attention graphs."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphc.core import io
from graphc.core.errors import PreconditionError
from graphc.core.pass_base import PassContext
from graphc.passes.fuse_ort import FuseOrt
from graphc.passes.prune_heads import PruneHeads
from graphc.checks.validate import make_session, synthesize_inputs

pytest.importorskip("torch")


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


def _rel(outs, refs):
    return float(np.mean([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(outs, refs)]))


def _prune(model, calib, **options):
    return PruneHeads(PruneHeads.Options(**options), PassContext(calibration=calib))(model)


def _weights(model, scope_word):
    """Shapes of the constant MatMul weights of nodes whose scope mentions ``scope_word``."""
    out = []
    for n in model.graph:
        if n.op_type == "MatMul" and n.inputs[1].const_value is not None and scope_word in n.metadata_props.get("graphc.scope", ""):
            out.append(tuple(n.inputs[1].const_value.shape))
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "mha"])
def test_bert_half_the_heads(exports, fused):
    model = _load(exports, "bert", fused)
    calib = synthesize_inputs(model, count=6, seed=1)
    test = synthesize_inputs(model, count=2, seed=7)  # other batch/seq sizes and masks
    ref = _run(model, test)
    result = _prune(model, calib, fraction=0.5)
    assert result.modified and result.stats.counts["heads_removed"] == 4
    assert _weights(model, "attention.self.query") == [] or all(s == (32, 16) for s in _weights(model, "attention.self.query"))
    assert sorted(s for s in _weights(model, "attention.output.dense")) == [(16, 32), (16, 32)]
    if fused:
        mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
        assert [n.attributes.get_int("num_heads") for n in mha] == [2, 2]
        assert all(n.inputs[3].const_value.shape == (48,) for n in mha)  # packed bias sliced too
    assert model.metadata_props["graphc.arch.num_heads"] == "2"
    assert model.metadata_props["graphc.arch.num_heads_per_layer"] == "2,2"
    outs = _run(model, test)
    assert all(o.shape == r.shape and np.isfinite(o).all() for o, r in zip(outs, ref))
    onnx.checker.check_model(ir.serde.serialize_model(model))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "mha"])
def test_llama_prunes_whole_kv_groups(exports, fused):
    model = _load(exports, "llama", fused)
    calib = synthesize_inputs(model, count=4, seed=1)
    test = synthesize_inputs(model, count=2, seed=7)
    ref = _run(model, test)
    result = _prune(model, calib, count=2)  # 4 query heads, 2 KV heads: one group goes
    assert result.stats.counts["heads_removed"] == 4
    assert sorted(set(_weights(model, "q_proj"))) == [(32, 16)]
    assert sorted(set(_weights(model, "k_proj"))) == [(32, 8)]
    assert sorted(set(_weights(model, "v_proj"))) == [(32, 8)]
    assert sorted(set(_weights(model, "o_proj"))) == [(16, 32)]
    assert model.metadata_props["graphc.arch.num_kv_heads"] == "1"
    outs = _run(model, test)
    assert all(o.shape == r.shape and np.isfinite(o).all() for o, r in zip(outs, ref))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_correction_reduces_the_error(exports, kind):
    """Each block's attention output on held-out inputs (other sizes and masks), pruned with
    and without the least-squares refit of the output projection."""
    from graphc.passes._prune import activations, relative_error

    scopes = {"bert": "layer.{}.attention.output.dense", "llama": "layers.{}.self_attn.o_proj"}[kind]

    def block_outputs(model):
        return [[n for n in model.graph if scopes.format(i) in n.metadata_props.get("graphc.scope", "")][-1].outputs[0]
                for i in (0, 1)]

    base = _load(exports, kind, False)
    calib = synthesize_inputs(base, count=32, seed=1)
    test = synthesize_inputs(base, count=3, seed=11)
    ref = list(activations(base, block_outputs(base), test, pass_name="test").values())
    errors = {}
    for correct in (False, True):
        model = _load(exports, kind, False)
        result = _prune(model, calib, fraction=0.5, correct=correct)
        got = list(activations(model, block_outputs(model), test, pass_name="test").values())
        errors[correct] = [relative_error(g, r) for g, r in zip(got, ref)]
    # measured (share of the output's variance lost), per block: bert 2.52 -> 0.33 and
    # 3.92 -> 0.38, llama 0.42 -> 0.31 and 0.67 -> 0.47
    assert all(c < 0.8 * p for c, p in zip(errors[True], errors[False])), errors
    assert all("corrected (ridge" in note for note in result.stats.notes)


def test_nothing_requested_or_nothing_to_remove_changes_nothing(exports):
    model = _load(exports, "bert", False)
    calib = synthesize_inputs(model, count=2, seed=1)
    test = synthesize_inputs(model, count=2, seed=7)
    ref = _run(model, test)
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not _prune(model, calib).modified  # default options: no request
    assert not _prune(model, calib, fraction=0.2).modified  # 20% of 4 heads rounds to none
    result = _prune(model, calib, max_error=1e-12)  # no head fits a zero error budget
    assert not result.modified and "kept all" in result.stats.notes[0]
    assert ir.serde.serialize_model(model).SerializeToString() == before
    for a, b in zip(_run(model, test), ref):
        np.testing.assert_array_equal(a, b)


def test_error_budget_prunes_more_when_looser(exports):
    calib = synthesize_inputs(_load(exports, "bert", True), count=6, seed=1)
    removed = []
    for budget in (0.01, 10.0):
        model = _load(exports, "bert", True)
        removed.append(_prune(model, calib, max_error=budget).stats.counts.get("heads_removed", 0))
    assert removed[0] < removed[1] == 6  # a loose budget leaves min_keep=1 head per layer


def test_bad_requests(exports):
    model = _load(exports, "llama", False)
    calib = synthesize_inputs(model, count=2, seed=1)
    with pytest.raises(PreconditionError, match="not divisible into whole KV groups of 2"):
        _prune(model, calib, count=1)
    with pytest.raises(PreconditionError, match="has only 4"):
        _prune(model, calib, count=4)
    with pytest.raises(PreconditionError, match="fraction must be in"):
        _prune(model, calib, fraction=1.0)
    with pytest.raises(PreconditionError, match="one of fraction, count or max_error"):
        _prune(model, calib, fraction=0.5, count=2)


def test_no_attention_is_a_clear_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).reshape(-1).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(PreconditionError, match="no attention block found"):
        _prune(model, [{"x": np.ones((2, 8), np.float32)}], fraction=0.5)


# --------------------------------------------------------------------------- hand-built fused ops

H, KV, D, HID = 4, 2, 8, 16


def _gqa_model(packed_attention: bool = False) -> ir.Model:
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).reshape(-1).tolist())

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HID])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", HID])
    ms = helper.make_opsetid("com.microsoft", 1)
    if packed_attention:
        nodes = [
            helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["ctx"], domain="com.microsoft", num_heads=H),
            helper.make_node("MatMul", ["ctx", "wo"], ["y"]),
        ]
        inits = [init("wqkv", HID, 3 * H * D), init("bqkv", 3 * H * D), init("wo", H * D, HID)]
        inputs = [x]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "wq"], ["q"]),
            helper.make_node("MatMul", ["x", "wk"], ["k"]),
            helper.make_node("MatMul", ["x", "wv"], ["v"]),
            helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total_len"], ["ctx", "pk", "pv"],
                             domain="com.microsoft", num_heads=H, kv_num_heads=KV),
            helper.make_node("MatMul", ["ctx", "wo"], ["y"]),
        ]
        inits = [init("wq", HID, H * D), init("wk", HID, KV * D), init("wv", HID, KV * D), init("wo", H * D, HID)]
        inputs = [x, helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
                  helper.make_tensor_value_info("total_len", TensorProto.INT32, [])]
    graph = helper.make_graph(nodes, "g", inputs, [y], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ms]))


def _feeds(model, n, seed):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        f = {"x": rng.standard_normal((2, 6, HID)).astype(np.float32)}
        if any(v.name == "seqlens_k" for v in model.graph.inputs):
            f["seqlens_k"] = np.full(2, 5, np.int32)
            f["total_len"] = np.array(6, np.int32)
        feeds.append(f)
    return feeds


@pytest.mark.parametrize("packed", [False, True], ids=["GroupQueryAttention", "Attention"])
def test_fused_ops(packed):
    model = _gqa_model(packed)
    calib, test = _feeds(model, 4, 1), _feeds(model, 2, 2)
    ref = _run(model, test)
    result = _prune(model, calib, count=2)
    assert result.stats.counts["heads_removed"] == 2
    node = next(n for n in model.graph if n.domain == "com.microsoft")
    assert node.attributes.get_int("num_heads") == 2
    if packed:
        assert node.inputs[1].const_value.shape == (HID, 3 * 2 * D)
        assert node.inputs[2].const_value.shape == (3 * 2 * D,)
    else:
        assert node.attributes.get_int("kv_num_heads") == 1
    outs = _run(model, test)
    assert all(o.shape == r.shape and np.isfinite(o).all() for o, r in zip(outs, ref))

"""mixed-precision's ``siblings``: MatMuls that read one input are probed together and planned at
one precision, and pack-nbits then stores each group as one MatMulNBits."""

from __future__ import annotations

import numpy as np
import pytest

from graphc.checks.validate import synthesize_inputs
from graphc.core.io import load_model
from graphc.core.pass_base import PassContext
from graphc.models.synthetic_llama import PRESETS
from graphc.passes import _blockquant as bq
from graphc.passes import _probes
from graphc.passes import _sensitivity as sens
from graphc.passes import _siblings
from graphc.passes.mixed_precision import MixedPrecision
from graphc.passes.pack_nbits import META_PACKED, PackNBits
from graphc.passes.quantize_nbits import QuantizeNBits


def _layers(model):
    layers, _ = sens.find_layers(model.graph, matmuls=True, embeddings=True, min_rows=1, min_cols=32, exclude=())
    return layers


def test_groups_are_the_projections_of_one_input(tiny_llama):
    model = load_model(tiny_llama)
    units = _siblings.group(_layers(model))
    groups = [u for u in units if isinstance(u, _siblings.Siblings)]
    names = [sorted(m.value.name.split(".")[-1] for m in g.members) for g in groups]
    assert names == [["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]] * PRESETS["tiny"].layers
    for g in groups:
        assert g.shape == (sum(m.shape[0] for m in g.members), g.members[0].shape[1])
        np.testing.assert_array_equal(g.view(), np.concatenate([m.view() for m in g.members]))
    assert len(_siblings.flatten(units)) == len(_layers(model))


def test_gptq_on_stacked_rows_is_gptq_on_each():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)).astype(np.float32) * rng.uniform(0.2, 3, 64).astype(np.float32)
    h = (x.T @ x / len(x)).astype(np.float64)
    a, b = rng.standard_normal((48, 64)).astype(np.float32), rng.standard_normal((16, 64)).astype(np.float32)
    kw = {"bits": 4, "block_size": 32, "symmetric": False, "scale_dtype": np.float16, "damp": 0.1, "act_order": True}
    both = bq.gptq(np.concatenate([a, b]), h, **kw).dequantize()
    np.testing.assert_array_equal(both[:48], bq.gptq(a, h, **kw).dequantize())
    np.testing.assert_array_equal(both[48:], bq.gptq(b, h, **kw).dequantize())


def test_a_group_probe_replaces_every_member(tiny_llama):
    model = load_model(tiny_llama)
    units = _siblings.group(_layers(model))
    g = next(u for u in units if isinstance(u, _siblings.Siblings))
    feeds = synthesize_inputs(model, count=2, seed=0)
    ev = sens.Evaluator(model, _siblings.flatten(units), feeds, metric="kl")
    _probes.register_local("siblings", ev)
    try:
        c = sens.QuantConfig(4, 32)
        item = _probes.ProbeItem(g.value.name, g.transposed, "rtn", (c,), (c,), None, g.member_keys)
        got = _probes.probe_layer(_probes.ProbeShared("siblings", {}), item)
    finally:
        _probes.forget("siblings")
    replaced = {m.value.name: sens.quantize_view(m, m.view(), c, symmetric=False, method=bq.Method.RTN,
                                                 scale_dtype="float16")[0] for m in g.members}
    assert got.measured[c] == pytest.approx(ev.error(replaced), rel=1e-6) and got.measured[c] > 0
    assert got.measured[c] != pytest.approx(ev.error({g.value.name: replaced[g.value.name]}), rel=1e-3)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_planned_groups_share_a_precision_and_are_packed(tiny_llama, method):
    model = load_model(tiny_llama)
    ctx = PassContext(calibration=synthesize_inputs(model, count=6, seed=1), calibration_source="test")
    options = MixedPrecision.Options(max_bits=5, bits=(2, 4, 8), block_sizes=(32,), metric="kl", siblings=True,
                                     method=method, feeds=2)
    stats = MixedPrecision(options, ctx).call(model).stats.to_dict()
    layers = PRESETS["tiny"].layers
    assert stats["sibling_groups"] == 2 * layers
    assert stats["measurement_runs"] == len(stats["choices"]) == len(_layers(load_model(tiny_llama))) - 3 * layers
    planned = {}
    for node in model.graph:
        if node.op_type == "MatMul" and "graphc.quant.bits" in node.metadata_props:
            planned[node.inputs[1].name] = (node.metadata_props["graphc.quant.bits"],
                                            node.metadata_props["graphc.quant.block_size"])
    for i in range(layers):
        assert len({planned[f"layers.{i}.{p}"] for p in ("q_proj", "k_proj", "v_proj")}) == 1
        assert len({planned[f"layers.{i}.{p}"] for p in ("gate_proj", "up_proj")}) == 1
    QuantizeNBits(QuantizeNBits.Options(method=method), ctx).call(model)
    pack = PackNBits().call(model).stats.counts
    assert pack["groups_packed"] == 2 * layers  # every group, whatever bits it got
    assert sum(META_PACKED in n.metadata_props for n in model.graph) == 2 * layers

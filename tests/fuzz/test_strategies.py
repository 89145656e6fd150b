"""The generated graphs themselves: valid ONNX (full check) that ONNX Runtime runs to finite
outputs, at every opset and in both float types, so a pass failure is the pass's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings

from graphc.checks.validate import make_session, synthesize_inputs
from tests.fuzz.strategies import OPSETS, bert_like, build, llama_like, specs


@settings(derandomize=True, max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_generated_graphs_are_valid(spec):
    proto = build(spec)  # runs onnx.checker with full_check=True
    assert proto.opset_import[0].version == spec.opset
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(proto.opset_import)
    model = ir.serde.deserialize_model(proto)
    session = make_session(proto, threads=1)
    for feed in synthesize_inputs(model, count=2):
        for out in session.run(None, feed):
            assert out.dtype == (np.float16 if spec.dtype == "float16" else np.float32)
            assert np.all(np.isfinite(out)), spec.short()


def test_op_availability_follows_the_opset():
    for opset in OPSETS:
        ops = {n.op_type for n in build(bert_like(opset=opset, act="gelu_op" if opset >= 20 else "gelu_erf")).graph.node}
        assert ("Gelu" in ops) == (opset >= 20)
        ops = {n.op_type for n in build(llama_like(opset=opset, norm="rmsnorm_op" if opset >= 23 else "rmsnorm_decomposed")).graph.node}
        assert ("RMSNormalization" in ops) == (opset >= 23)


def test_exporter_shapes_differ():
    dynamo = build(bert_like(style="dynamo"))
    legacy = build(bert_like(style="legacy", linear="gemm"))
    assert any(n.name.startswith("node_") for n in dynamo.graph.node)
    assert any(p.key == "pkg.torch.onnx.name_scopes" for n in dynamo.graph.node for p in n.metadata_props)
    assert any(n.name.startswith("/model/layers.0/") for n in legacy.graph.node)
    assert "Gemm" in {n.op_type for n in legacy.graph.node} and "Gemm" not in {n.op_type for n in dynamo.graph.node}


def test_the_drawn_graphs_of_every_pass_plan_are_valid():
    """The per-pass plans (tests/fuzz/plans.py) fix Spec fields, the tied LM head among them:
    those graphs are valid and run too."""
    from dataclasses import replace

    from tests.fuzz.plans import PLANS

    for name, plan in PLANS.items():
        for dtype in ("float32", "float16"):
            spec = replace(llama_like(dtype=dtype), **plan.spec)
            proto = build(spec)
            session = make_session(proto, threads=1)
            for feed in synthesize_inputs(ir.serde.deserialize_model(proto), count=1):
                assert all(np.all(np.isfinite(o)) for o in session.run(None, feed)), (name, spec.short())
            if plan.spec.get("tied"):
                heads = [n for n in proto.graph.node if n.op_type == "Transpose"
                         and n.input[0] == "model.embeddings.word_embeddings.weight"]
                assert heads, name

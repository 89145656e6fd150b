"""Supported range (docs/supported-models.md): opsets 17 to 23, input IR versions 8 up to
onnx's newest, output IR versions ONNX Runtime loads, float16 models for the passes that
claim them (GraphcPass.dtypes) and a reasoned skip in the others."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphc
from graphc.core import io
from graphc.core.registry import all_passes
from graphc.checks.validate import make_session, synthesize_inputs
from tests.fuzz import harness as H
from tests.fuzz.strategies import OPSETS, Spec, bert_like, build, llama_like

ROOT = Path(__file__).resolve().parents[1]
IR_VERSIONS = tuple(range(8, onnx.IR_VERSION + 1))  # 8: the opset-17 pairing


def _ort_loads(proto: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- IR versions


def test_max_ir_version_is_the_highest_ort_loads():
    top = io.max_ir_version()
    assert 8 <= top <= onnx.IR_VERSION
    probe = build(Spec(hidden=8, heads=1, opset=17), ir_version=top)
    assert _ort_loads(probe)
    if top < onnx.IR_VERSION:
        probe.ir_version = top + 1
        assert not _ort_loads(probe)


def test_onnx_helper_default_ir_is_newer_than_ort():
    """The gap the clamp closes (onnx 1.23 writes IR 14, ORT 1.31 loaded up to 13; 1.32 loads
    14, so this skips there): where it skips the clamp is simply a no-op, not a bug."""
    default = helper.make_model(helper.make_graph([], "g", [], [])).ir_version
    if default <= io.max_ir_version():
        pytest.skip(f"onnx writes IR {default}, ORT loads it")
    assert default == onnx.IR_VERSION


@pytest.fixture
def ir14_path(tmp_path) -> Path:
    proto = build(bert_like(hidden=16, heads=2), ir_version=onnx.IR_VERSION)
    path = tmp_path / "ir_newest.onnx"
    onnx.save(proto, path)
    return path


def test_newest_ir_input_loads_validates_and_saves_for_ort(ir14_path, tmp_path):
    model = io.load_model(ir14_path)
    assert model.ir_version == onnx.IR_VERSION
    make_session(model)  # in memory: clamped
    make_session(ir.serde.serialize_model(model))  # a ModelProto: clamped on a copy
    make_session(ir14_path)  # a path ORT refuses: through the loader
    for recipe in ("cleanup", "int8"):
        out = tmp_path / f"{recipe}.onnx"
        result = graphc.compress(ir14_path, out, recipe=recipe, force=True)
        saved = onnx.load(out)
        assert saved.ir_version == min(onnx.IR_VERSION, io.max_ir_version())
        assert result.model.ir_version == onnx.IR_VERSION  # only the file is clamped
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        onnx.checker.check_model(str(out))
    report = graphc.validate(ir14_path, tmp_path / "cleanup.onnx")
    assert report.output_cosine > 0.9999


def test_make_session_leaves_the_callers_proto_alone(ir14_path):
    proto = onnx.load(ir14_path)
    make_session(proto)
    assert proto.ir_version == onnx.IR_VERSION


@pytest.mark.parametrize("ir_version", IR_VERSIONS)
def test_ir_versions_in_and_out(ir_version, tmp_path):
    """Any IR version from 8 loads; the output keeps it, capped at what ORT loads."""
    src = tmp_path / "in.onnx"
    onnx.save(build(Spec(hidden=8, heads=2, opset=17), ir_version=ir_version), src)
    out = tmp_path / "out.onnx"
    graphc.compress(src, out, recipe="cleanup")
    assert onnx.load(out).ir_version == min(ir_version, io.max_ir_version())


# --------------------------------------------------------------------------- opsets


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("shape", ["bert", "llama"])
def test_supported_opsets(opset, shape, tmp_path):
    """Both recipes on a BERT- and a Llama-shaped graph at each opset in the range, with the
    ops that opset has (Gelu from 20, RMSNormalization at 23)."""
    if shape == "bert":
        spec = bert_like(opset=opset, act="gelu_op" if opset >= 20 else "gelu_erf")
    else:
        spec = llama_like(opset=opset, norm="rmsnorm_op" if opset >= 23 else "rmsnorm_decomposed")
    src = tmp_path / "in.onnx"
    onnx.save(build(spec), src)
    clean = graphc.compress(src, tmp_path / "clean.onnx", recipe="cleanup")
    assert clean.validation.passed
    int8 = graphc.compress(src, tmp_path / "int8.onnx", recipe="int8", force=True, attribution=False)
    assert int8.validation.output_cosine >= H.RECIPE_INT8_TOL.cos
    for out in ("clean.onnx", "int8.onnx"):
        saved = onnx.load(tmp_path / out)
        assert next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")) == opset
        io.load_model(tmp_path / out)  # graphc loads its own output (checker included)


def test_opsets_outside_the_range_are_not_refused(tmp_path):
    """Below 17 there is no LayerNormalization op; such graphs still load and go through the
    cleanup recipe (outside the tested range, not refused)."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w],
    )
    for opset in (13, 24):
        path = tmp_path / f"opset{opset}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
        graphc.compress(path, tmp_path / f"out{opset}.onnx", recipe="int8")


# --------------------------------------------------------------------------- float16


FP16_SPECS = {
    "bert": bert_like(dtype="float16"),
    "llama": llama_like(dtype="float16"),
    "legacy-gemm": bert_like(dtype="float16", style="legacy", linear="gemm", act="gelu_tanh", outliers=True),
}


@pytest.mark.parametrize("name", sorted(all_passes()))
def test_float16_models(name):
    """Passes claiming float16 work on float16 models (outcome A, within tolerance); the
    others leave them alone with a reason (or refuse): never a broken model."""
    for label, spec in FP16_SPECS.items():
        for prepared in (False, True) if name in H.PREPARE else (False,):
            model = ir.serde.deserialize_model(build(spec))
            if prepared and H.prepare(model, H.PREPARE[name]) is not None:
                continue
            try:
                outcome = H.assert_outcome(name, model, prepared)
            except AssertionError as e:
                raise AssertionError(f"{name} on float16 {label} (prepared={prepared}): {e}") from None
            if outcome.kind == "ok" and outcome.kappa is None:
                for m in outcome.metrics:
                    assert m.cosine > 0.999 or not H.claims(all_passes()[name], "float16"), (label, m)


def test_float16_claims():
    claims = {name: cls.dtypes for name, cls in all_passes().items()}
    for name in ("compact-metadata", "fold-constants", "remove-unused", "cse", "shape-inference", "fuse-ort", "trim-outputs"):
        assert "float16" in claims[name], name
    for name in ("quantize-int8", "quantize-attention", "quantize-embedding", "fp16-constants"):
        assert claims[name] == ("float32",), name


def test_int8_on_float16_model_skips_quantization_with_reasons(tmp_path):
    src = tmp_path / "fp16.onnx"
    onnx.save(build(bert_like(dtype="float16")), src)
    result = graphc.compress(src, tmp_path / "out.onnx", recipe="int8")
    records = {r.name: r for r in result.passes}
    assert not records["quantize-int8"].modified
    assert any("float32" in s["reason"] for s in records["quantize-int8"].stats.get("skipped", []))
    assert result.validation.passed
    outputs = make_session(tmp_path / "out.onnx").get_outputs()
    assert outputs[0].type == "tensor(float16)"


# --------------------------------------------------------------------------- docs


def _supported_models_page() -> str:
    return (ROOT / "docs" / "supported-models.md").read_text(encoding="utf-8")


def test_docs_document_the_supported_range():
    section = _supported_models_page()
    assert f"{OPSETS[0]} to {OPSETS[-1]}" in section
    # the output IR cap, stated for the installed ONNX Runtime ("IR 14 with onnxruntime 1.32")
    stated = re.search(r"IR (\d+) with onnxruntime (\d+\.\d+)", section)
    assert stated, "docs/supported-models.md does not state the output IR cap as 'IR N with onnxruntime X.Y'"
    assert (int(stated.group(1)), stated.group(2)) == (io.max_ir_version(), ".".join(ort.__version__.split(".")[:2]))
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9-]+)` \| ([^|]+) \|", section, flags=re.M)}
    for name, cls in all_passes().items():
        if name not in rows:
            continue  # passes added later document themselves in their own change
        documented = "float16" in rows[name]
        assert documented == ("float16" in cls.dtypes), f"docs say {rows[name]!r} for {name}, code {cls.dtypes}"
    for name in ("fuse-ort", "quantize-int8", "fold-constants"):
        assert name in rows, f"{name} missing from the docs/supported-models.md table"


def test_synthesized_inputs_cover_every_generated_input():
    for spec in (bert_like(), llama_like()):
        model = ir.serde.deserialize_model(build(spec))
        feed = synthesize_inputs(model, count=1)[0]
        assert set(feed) == {v.name for v in model.graph.inputs}

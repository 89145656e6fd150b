"""Every input that once broke graphc (tests/corpus/cases.py): loaded from a file, then every
registered pass on it, alone and where the int8 recipe runs it (the fuzz property of
tests/fuzz/harness.py), plus each case's own check."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import graphc
from graphc.core import io
from graphc.core.errors import GraphcError, ModelLoadError
from graphc.core.registry import all_passes, get_pass
from tests.corpus.cases import CASES, CHECKS
from tests.fuzz import harness as H

# Cases whose original ONNX Runtime itself would have to evaluate at full size: their own
# check runs the passes without ORT.
NO_ORT = {"expand_to_gigabytes"}


@pytest.fixture(params=sorted(CASES))
def corpus_file(request, tmp_path) -> tuple[str, Path]:
    path = tmp_path / f"{request.param}.onnx"
    path.write_bytes(CASES[request.param]())
    return request.param, path


def test_corpus_case_through_load_and_every_pass(corpus_file):
    name, path = corpus_file
    try:
        io.load_model(path)
    except ModelLoadError as e:
        assert name in CHECKS, f"{name} is refused on load ({e}) but has no check saying it should be"
        return
    if name in NO_ORT:
        return
    for pass_name in sorted(all_passes()):
        for prepared in (False, True) if pass_name in H.PREPARE else (False,):
            model = io.load_model(path)
            if prepared and H.prepare(model, H.PREPARE[pass_name]) is not None:
                continue
            try:
                H.assert_outcome(pass_name, model, prepared)
            except AssertionError as e:
                raise AssertionError(f"{name}: {pass_name} (prepared={prepared}): {e}") from None


def test_corpus_case_own_check(corpus_file, tmp_path):
    name, path = corpus_file
    if name not in CHECKS:
        pytest.skip("the generic property covers it")
    globals()[CHECKS[name]](path, tmp_path)


def check_fold_memory(path: Path, tmp_path: Path) -> None:
    for pass_name in ("fold-constants", "fuse-ort", "shape-inference", "cse", "quantize-int8", "fp16-constants"):
        model = io.load_model(path)
        tracemalloc.start()
        try:
            get_pass(pass_name)()(model)
        except GraphcError as e:
            assert not H.is_crash(e), e
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 50 * 2**20, f"{pass_name} allocated {peak / 2**20:.0f} MiB on a 300-byte model"
        assert "Expand" in {n.op_type for n in model.graph}, pass_name


def check_reload_after_fuse(path: Path, tmp_path: Path) -> None:
    model = io.load_model(path)
    get_pass("fuse-ort")()(model)
    assert ("", "SimplifiedLayerNormalization") in {(n.domain, n.op_type) for n in model.graph}
    out = tmp_path / "fused.onnx"
    io.save_model(model, out)
    io.load_model(out)
    report = graphc.validate(path, out)
    assert report.output_cosine > 0.9999


def check_sparse_refused(path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="sparse initializer 'w'"):
        io.load_model(path)


def check_saved_ir_version(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    graphc.compress(path, out, recipe="int8")
    assert onnx.load(out).ir_version == min(onnx.IR_VERSION, io.max_ir_version())
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def check_leftover_sdpa_refused(path: Path, tmp_path: Path) -> None:
    """Were no rule to take the SDPA op any more (here: SDPA-via-MHA switched off), fuse-ort
    refuses instead of writing a model ORT cannot load. (With fuse-ort's symbolic shapes the
    MHA rule itself takes this graph: they are switched off too, to keep the case.)"""
    from onnxscript.rewriter.ort_fusions import _core

    from graphc.passes import fuse_ort

    shapes = fuse_ort.symbolic_shapes
    fuse_ort.symbolic_shapes = lambda model: 0
    try:
        model = io.load_model(path)
        result = get_pass("fuse-ort")()(model)
        assert result.stats.counts.get("sdpa_via_mha", 0) >= 1  # the case still needs it
        model = io.load_model(path)
        original = _core.replace_sdpa_by_mha
        _core.replace_sdpa_by_mha = lambda model, **kw: 0
        try:
            with pytest.raises(GraphcError, match="intermediate op"):
                get_pass("fuse-ort")()(model)
        finally:
            _core.replace_sdpa_by_mha = original
    finally:
        fuse_ort.symbolic_shapes = shapes


def check_bad_utf8_metadata_refused(path: Path, tmp_path: Path) -> None:
    from graphc.core.errors import InvalidModelError

    with pytest.raises(InvalidModelError, match=r"metadata_props\[0\]\.key is not valid UTF-8"):
        io.load_model(path)

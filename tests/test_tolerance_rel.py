"""The ``max_rel`` tolerance: the largest difference over each output's largest |value|, a gate
that does not move with the output's scale (``max_abs`` does)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphc
from graphc.core.errors import ToleranceError
from graphc.core.recipes import recipe_from_dict


def _mlp(path, scale: float):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32) * 0.1, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((128, 32)).astype(np.float32) * 0.1, "w2")
    k = numpy_helper.from_array(np.array(scale, np.float32), "k")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Mul", ["m", "k"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])], [w1, w2, k])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_max_rel_gates_the_same_at_any_output_scale(tmp_path):
    loose = recipe_from_dict({"name": "rel", "extends": "int8", "tolerance": {"min_cosine": 0.9, "max_rel": 0.2}})
    small = graphc.compress(_mlp(tmp_path / "a.onnx", 1.0), tmp_path / "qa.onnx", recipe=loose, attribution=False)
    large = graphc.compress(_mlp(tmp_path / "b.onnx", 1e4), tmp_path / "qb.onnx", recipe=loose, attribution=False)
    a, b = small.validation, large.validation
    assert a.passed and b.passed and 0 < a.max_rel < 0.2
    assert b.max_abs == pytest.approx(1e4 * a.max_abs, rel=1e-2)  # the absolute difference scales...
    assert b.max_rel == pytest.approx(a.max_rel, rel=1e-2)  # ...the relative one does not
    out = a.outputs[0]
    assert a.max_rel == out.rel_max
    assert a.to_dict()["max_rel"] == pytest.approx(a.max_rel, rel=1e-3) and a.to_dict()["tolerance"]["max_rel"] == 0.2
    strict = recipe_from_dict({"name": "strict", "extends": "int8", "tolerance": {"min_cosine": 0.9, "max_rel": 1e-6}})
    with pytest.raises(ToleranceError, match=r"max relative difference [0-9.e-]+ vs allowed 1e-06"):
        graphc.compress(tmp_path / "b.onnx", tmp_path / "strict.onnx", recipe=strict, attribution=False)
    assert not (tmp_path / "strict.onnx").exists()


def test_the_fuse_recipe_gates_relative_to_the_outputs_scale():
    from graphc.core.recipes import get_recipe

    tol = get_recipe("fuse").tolerance
    assert tol.max_rel == 1e-5 and tol.max_abs is None


def test_a_recipe_file_takes_max_rel_and_refuses_a_word(tmp_path):
    from graphc.core.errors import RecipeError

    assert recipe_from_dict({"name": "r", "extends": "fuse", "tolerance": {"max_rel": 2e-5}}).tolerance.max_rel == 2e-5
    with pytest.raises(RecipeError, match="max_rel"):
        recipe_from_dict({"name": "r", "extends": "fuse", "tolerance": {"max_rel": "tiny"}})

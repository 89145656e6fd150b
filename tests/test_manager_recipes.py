import textwrap

import numpy as np
import pytest

from graphc.checks.instruments import NumericCheck
from graphc.core.errors import PassError, RecipeError
from graphc.core.manager import PassManager
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.passes.quantize_int8 import QuantizeInt8
from graphc.passes.cleanup import RemoveUnused
from graphc.core.recipes import get_recipe, recipe_from_dict
from graphc.checks.validate import run_feeds, make_session
from tests.passes.graphs import mlp


def test_manager_records_time_stats_size_and_disabled():
    model = mlp()
    records = PassManager([QuantizeInt8(), RemoveUnused()], disabled=["remove-unused"]).run(model)
    q, r = records
    assert q.modified and q.wall_s > 0 and q.stats["matmuls_quantized"] == 3
    assert q.bytes_after < q.bytes_before / 3  # int8 weights + scales vs float32
    assert r.skipped and not r.modified


def test_numeric_check_instrument_records_cosine():
    model = mlp()
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 4, 32)).astype(np.float32)}]
    ref = run_feeds(make_session(model), feeds, "original")
    records = PassManager([QuantizeInt8()], instruments=[NumericCheck(feeds, ref)]).run(model)
    assert 0.99 < records[0].check["min_cosine"] <= 1.0


class _Boom(GraphcPass):
    name = "boom"

    def run(self, model, stats: PassStats) -> bool:
        raise ZeroDivisionError("x")


def test_pass_errors_name_the_pass():
    with pytest.raises(PassError, match="pass boom: ZeroDivisionError"):
        PassManager([_Boom()]).run(mlp())


def test_builtin_and_toml_recipes(tmp_path):
    assert "quantize-int8" in get_recipe("int8").pass_names()
    f = tmp_path / "r.toml"
    f.write_text(textwrap.dedent("""
        name = "mine"
        extends = "int8"
        disable = ["quantize-embedding"]
        [tolerance]
        min_cosine = 0.95
    """))
    r = get_recipe(str(f))
    assert r.name == "mine" and "quantize-embedding" not in r.pass_names()
    assert r.tolerance.min_cosine == 0.95 and r.tolerance.min_row_cosine == get_recipe("int8").tolerance.min_row_cosine


@pytest.mark.parametrize(
    "data, message",
    [
        ({"passes": [{"name": "nope"}]}, "unknown pass 'nope'"),
        ({"passes": [{"name": "quantize-int8", "options": {"bits": 3}}]}, "unknown option"),
        ({"extends": "int99"}, "extends unknown recipe"),
        ({"name": "x"}, "needs 'passes' or 'extends'"),
        ({"extends": "int8", "tolerance": {"cos": 1}}, "unknown tolerance key"),
        ({"extends": "int8", "color": "red"}, "unknown recipe key"),
    ],
)
def test_bad_recipes(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="not valid TOML"):
        bad = tmp_path / "bad.toml"
        bad.write_text("name = [")
        get_recipe(str(bad))
    with pytest.raises(RecipeError, match="unknown recipe 'int99'"):
        get_recipe("int99")


class _ReplaceEveryNode(GraphcPass):
    """Deletes each node and creates a same-kind node in its place: CPython hands the freed
    memory (and so the id()) of a deleted node to the next new one."""

    name = "replace-every-node"

    def run(self, model, stats: PassStats) -> bool:
        import gc

        import onnx_ir as ir

        graph = model.graph
        for _ in range(len(graph)):
            node = next(iter(graph))  # the oldest remaining node; new ones go to the end
            new = ir.node(node.op_type, list(node.inputs), attributes=dict(node.attributes), domain=node.domain,
                          num_outputs=len(node.outputs))
            graph.append(new)
            for old, out in zip(node.outputs, new.outputs):
                out.name, out.type, out.shape = old.name + "_new", old.type, old.shape
                old.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            del node, new, old, out
            gc.collect()  # free the deleted node now (node and outputs reference each other)
        graph.sort()
        return True


def test_every_node_a_pass_creates_is_labelled_even_when_ids_are_reused():
    """Regression: GraphcPass once recognised pre-existing nodes by id(); a new node that got
    a deleted node's id went unlabelled (provenance then depended on memory layout)."""
    from graphc.core import ops

    for _ in range(2):  # each gc.collect() walks the whole heap: slow late in a full run
        model = mlp()
        _ReplaceEveryNode()(model)
        labels = [n.metadata_props.get(ops.META_PASS) for n in model.graph]
        assert labels and all(label == "replace-every-node" for label in labels), labels


def test_builtin_recipe_files_are_exactly_the_listed_built_ins():
    """recipes/builtin/*.toml and BUILTIN_NAMES agree, and each file loads and names itself."""
    from graphc.core.recipes import BUILTIN, BUILTIN_NAMES, _builtin_folder

    files = sorted(p.stem for p in _builtin_folder().glob("*.toml"))
    assert files == sorted(BUILTIN_NAMES)
    for name in BUILTIN_NAMES:
        recipe = BUILTIN[name]
        assert recipe.name == name and recipe.source == "built-in" and recipe.steps

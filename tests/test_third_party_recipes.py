"""Every built-in recipe on every third-party-style graph (tests/third_party_graphs.py: Paddle
names and `-1` dims, tf2onnx one-hot, custom-domain ops, weights in `If` bodies, GRU, LSTM):
each run writes a model whose outputs are finite and that passed its gate, or refuses with a
typed one-line error; nothing crashes and nothing is half-written."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.checks.validate import make_session, synthesize_inputs
from graphc.core import io
from graphc.core.errors import GraphcError
from tests import third_party_graphs as tp
from tests.fuzz.harness import is_crash

GRAPHS = {
    "paddle_conv": tp.paddle_conv,
    "tf2onnx_onehot": tp.tf2onnx_onehot,
    "custom_domain": tp.custom_domain,
    "if_with_weights": tp.if_with_weights,
    "gru": tp.gru,
    "lstm": tp.lstm,
    "if_with_lstms": tp.if_with_lstms,
}
RECIPES = ("fuse", "int8", "int8-static", "int4", "fast", "plan")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_recipe_on_third_party_style_graph(graph, recipe, tmp_path):
    src = tp.save(GRAPHS[graph](), tmp_path / f"{graph}.onnx")
    out = tmp_path / "out.onnx"
    before = (tmp_path / f"{graph}.onnx").read_bytes()
    try:
        result = graphc.compress(src, out, recipe=recipe)
    except GraphcError as e:
        assert not is_crash(e), f"{recipe} on {graph} crashed: {e!r}"
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        assert not out.exists(), "a refused run left an output behind"
    else:
        assert result.validation is None or result.validation.passed
        session = make_session(out)
        names = {i.name for i in session.get_inputs()}
        for feed in synthesize_inputs(io.load_model(out), count=2):
            for value in session.run(None, {k: v for k, v in feed.items() if k in names}):
                if np.issubdtype(np.asarray(value).dtype, np.floating):
                    assert np.isfinite(value).all(), f"{recipe} on {graph}: non-finite outputs"
    assert (tmp_path / f"{graph}.onnx").read_bytes() == before  # the input is never modified

"""DeBERTa's disentangled attention → MultiHeadAttention with the relative-position scores and
the padding mask as its attention bias (passes/_fusion_rules/disentangled_attention.py), on
tiny random DeBERTa exports: with relative attention (DeBERTa-v3's form) and without."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from graphc.checks.validate import make_session  # noqa: E402
from graphc.core.pass_base import PassContext  # noqa: E402
from graphc.front import api  # noqa: E402
from graphc.core.io import load_model  # noqa: E402
from graphc.models import tiny_families as tf  # noqa: E402
from graphc.passes.fuse_ort import FuseOrt  # noqa: E402


def _export(tmp_path, relative: bool):
    import torch
    import transformers as t

    tf.hf_offline()
    extra = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                 max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                 position_biased_input=False) if relative else {}
    config = t.DebertaV2Config(**tf._SMALL, **tf._TEXT, **extra)
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    t.AutoModel.from_config(config, dtype=torch.float32).eval().save_pretrained(folder)
    out = tmp_path / "m.onnx"
    api.export(str(folder), out)
    return out


def _feeds():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, tf.TINY_VOCAB, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # padded rows: their outputs must not change either
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "plain"])
def test_deberta_attention_becomes_multi_head_attention_with_the_same_outputs(tmp_path, relative):
    path = _export(tmp_path, relative)
    model = load_model(path)
    feed = _feeds()
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    want = session.run(names, {k: v for k, v in feed.items() if k in inputs})
    result = FuseOrt(FuseOrt.Options(), PassContext())(model)
    ops = [n.op_type for n in model.graph.all_nodes()]
    assert ops.count("MultiHeadAttention") == 2 and "Softmax" not in ops
    assert result.stats.counts.get("disentangled_attention") == 2
    mha = [n for n in model.graph.all_nodes() if n.op_type == "MultiHeadAttention"]
    assert all(n.attributes["num_heads"].as_int() == 4 and n.inputs[5] is not None for n in mha)
    got = make_session(model).run(names, {k: v for k, v in feed.items() if k in inputs})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)  # padded positions included

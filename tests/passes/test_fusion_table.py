"""The fusion table fuse-ort walks: every row resolves, keys are unique, options are known."""

from graphc.passes._fusion_rules.table import FUSIONS, function_for
from graphc.passes.fuse_ort import FuseOptions


def test_every_row_resolves_to_a_fusion_function():
    keys = [f.key for f in FUSIONS]
    assert len(keys) == len(set(keys))
    options = {"gelu", "normalization", "embed_layer_norm", "rotary", "attention"}
    assert {f.option for f in FUSIONS} <= options
    assert {"gelu", "normalization", "embed_layer_norm", "rotary", "attention"} <= set(FuseOptions.__dataclass_fields__)
    for fusion in FUSIONS:
        assert callable(function_for(fusion)), fusion.key


def test_order_keeps_the_dependencies():
    keys = [f.key for f in FUSIONS]
    assert keys.index("rms_normalization") < keys.index("skip_rms_normalization")
    assert keys.index("sdpa") < keys.index("mha1") < keys.index("mha_bias") < keys.index("attention")
    assert keys.index("attention") < keys.index("bias_gelu") < keys.index("sdpa_via_mha")

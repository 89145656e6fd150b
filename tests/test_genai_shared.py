"""genai folders in the shared-buffer form (exporters/genai_gqa.py): GroupQueryAttention with
rotary inside over one past/present buffer, and the clean fallback where a graph cannot take it.

Tiny random decoders with a head size of 16 (ONNX Runtime's rotary inside the op needs a
multiple of 16). Tokens are greedy through og.Generator, compared with PyTorch's generate and
with graphc.front.generate on the same compressed graph before the rewrite.
"""

import json

import numpy as np
import onnx_ir as ir
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra")

PROMPT = [5, 17, 33, 8, 61, 90, 2, 44]
NEW = 16
SHARED_NOTICE = "keeps separate past/present buffers"


def _save(folder, config):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def llama16(tmp_path_factory):
    from transformers import LlamaConfig

    from graphc.models.base import hf_offline

    hf_offline()
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=100, max_position_embeddings=128)
    return _save(tmp_path_factory.mktemp("hf") / "llama16", config)


@pytest.fixture(scope="module")
def exported(llama16, tmp_path_factory):
    from graphc.front.api import export

    out = tmp_path_factory.mktemp("exp") / "genai"
    result = export(llama16[0], out, kv_cache=True, genai=True)
    return out, result


def _fused_genai(tmp_path, name, config):
    """The tiny model of ``config`` saved, exported with its cache as a genai folder, then
    compressed with ``fuse`` into ``tmp_path / "genai"``: (the PyTorch model, the compress result)."""
    from graphc.front.api import compress, export
    from graphc.models.base import hf_offline

    hf_offline()
    folder, model = _save(tmp_path / name, config)
    export(folder, tmp_path / "exp", kv_cache=True, genai=True)
    return model, compress(tmp_path / "exp" / "model.onnx", tmp_path / "genai", recipe="fuse", genai=True)


def _torch_greedy(model, prompt, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _attention(folder):
    model = ir.load(folder / "model.onnx")
    return model, [n for n in model.graph if n.op_type == "GroupQueryAttention"]


def _assert_shared_form(folder, rotary_rows, packed=False, value_ops=("MatMul", "MatMulNBits")):
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    model, attention = _attention(folder)
    assert len(attention) == 2
    assert not [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert "position_ids" not in [v.name for v in model.graph.inputs]
    for node in attention:
        assert node.attributes.get_int("do_rotary") == 1 and node.attributes.get_int("rotary_interleaved") == 0
        assert node.attributes.get_int("causal", 1) == 1 and len(node.inputs) == 9
        cos, sin = node.inputs[7], node.inputs[8]
        assert cos.const_value is not None and list(cos.shape) == [rotary_rows, 8] and sin.const_value is not None
        seqlens, total = node.inputs[5].producer(), node.inputs[6].producer()
        assert seqlens.op_type == "Cast" and total.op_type == "Cast"  # from attention_mask, as the builder
        assert "attention_mask" in {v.name for v in _ancestors(node.inputs[5])}
        # value in and output out as [B, S, n·D], with no Reshape pair there and back; a packed
        # Q/K/V projection (pack-nbits) goes in whole, as the op's packed query
        if packed:
            assert node.inputs[1] is None and node.inputs[2] is None
            assert node.inputs[0].producer().op_type == "MatMulNBits"
            assert node.inputs[0].producer().attributes.get_int("N") == 64 + 2 * 32  # hidden + 2 KV heads x 16
        else:
            assert node.inputs[2].producer().op_type in value_ops
        assert {user.op_type for user, _ in node.outputs[0].uses()} <= {"MatMul", "MatMulNBits"}


def _ancestors(value):
    seen, stack = [], [value]
    while stack:
        v = stack.pop()
        seen.append(v)
        if v.producer() is not None:
            stack.extend(i for i in v.producer().inputs if i is not None)
    return seen


def test_exported_folder_keeps_separate_buffers_with_a_notice(llama16, exported):
    from graphc.exporters.genai import generate

    out, result = exported
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert any(SHARED_NOTICE in n and "not GroupQueryAttention" in n for n in result.notices)
    assert generate(out, PROMPT, NEW) == _torch_greedy(llama16[1], PROMPT, NEW)


@pytest.mark.parametrize("recipe", ["fuse", "int4-rtn", "int4-rtn-packed"])
def test_compressed_folder_takes_the_shared_buffer_form(llama16, exported, tmp_path, recipe):
    """Rotary inside the op over a shared buffer: genai's tokens equal graphc.front.generate's on the
    same recipe's graph written without the rewrite (and, unquantized, PyTorch's)."""
    from graphc.front.api import compress
    from graphc.exporters.genai import generate
    from graphc.front.generate import Decoder

    src = exported[0] / "model.onnx"
    packed = recipe.endswith("packed")
    if recipe.startswith("int4-rtn"):
        path = tmp_path / "int4-rtn.toml"
        path.write_text('name = "int4-rtn"\n[tolerance]\nmin_cosine = 0.9\n'
                        '[[passes]]\nname = "fuse-ort"\n'
                        '[[passes]]\nname = "quantize-nbits"\noptions = { bits = 4, block_size = 16, method = "rtn" }\n'
                        + ('[[passes]]\nname = "pack-nbits"\n' if packed else ''))
        recipe = str(path)
    result = compress(src, tmp_path / "genai", recipe=recipe, genai=True)
    assert not [n for n in result.notices if SHARED_NOTICE in n]
    _assert_shared_form(tmp_path / "genai", rotary_rows=128, packed=packed)
    compress(src, tmp_path / "plain.onnx", recipe=recipe)
    ours = Decoder(tmp_path / "plain.onnx").greedy(np.array([PROMPT]), NEW).tokens[0].tolist()
    tokens = generate(tmp_path / "genai", PROMPT, NEW)
    assert tokens == ours
    # graphc.front.generate drives the folder's model as genai does: one buffer per cache, bound
    # as past and present, written in place (two rows of one prompt: batch 2 as well)
    shared = Decoder(tmp_path / "genai" / "model.onnx")
    assert shared.shared and not Decoder(tmp_path / "plain.onnx").shared
    assert shared.greedy(np.array([PROMPT]), NEW).tokens[0].tolist() == tokens
    assert shared.greedy(np.array([PROMPT, PROMPT]), NEW).tokens.tolist() == [tokens, tokens]
    if "int4" in recipe:
        assert any(n.op_type == "MatMulNBits" for n in result.model.graph)
    else:
        assert tokens == _torch_greedy(llama16[1], PROMPT, NEW)


ROTARY_OUTSIDE = "rotary stays outside GroupQueryAttention"


def test_rotary_left_unfused_stays_outside_the_op_over_shared_buffers(llama16, exported, tmp_path):
    """GroupQueryAttention whose rotary stayed primitive ops (fuse-ort's rotary off): the folder
    shares its buffers and keeps the model's own rotary on the positions genai feeds, and says
    so; tokens stay PyTorch's."""
    from graphc.front.api import compress
    from graphc.exporters.genai import generate

    path = tmp_path / "fuse-norotary.toml"
    path.write_text('name = "fuse-norotary"\n[[passes]]\nname = "fuse-ort"\noptions = { rotary = false }\n')
    result = compress(exported[0] / "model.onnx", tmp_path / "genai", recipe=str(path), genai=True)
    written, attention = _attention(tmp_path / "genai")
    assert attention and all(n.attributes.get_int("do_rotary", 0) == 0 for n in attention)
    assert "position_ids" in [v.name for v in written.graph.inputs]  # the model's rotary reads them
    from graphc.exporters.genai_gqa import already_shared

    assert already_shared(written)  # a second write keeps it as it is
    from graphc.front.generate import Decoder

    shared = Decoder(tmp_path / "genai" / "model.onnx")  # position_ids fed beside the shared buffers
    assert shared.shared and shared.position_ids
    assert shared.greedy(np.array([PROMPT]), NEW).tokens[0].tolist() == _torch_greedy(llama16[1], PROMPT, NEW)
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert not any(SHARED_NOTICE in n for n in result.notices)
    assert any(ROTARY_OUTSIDE in n and "2 of 2 layers" in n and "RotaryEmbedding" in n for n in result.notices)
    assert generate(tmp_path / "genai", PROMPT, NEW) == _torch_greedy(llama16[1], PROMPT, NEW)


def test_partial_rotary_takes_the_shared_form(tmp_path):
    """Phi-3 rotating the first 16 of 32 dims of each head (Phi-4-mini rotates 96 of 128): fused as
    one RotaryEmbedding with rotary_embedding_dim, then the op's own rotary over caches 8 wide;
    genai's tokens are PyTorch's."""
    from transformers import Phi3Config

    from graphc.front.api import compress
    from graphc.exporters.genai import generate

    model, result = _fused_genai(tmp_path, "phi3", Phi3Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=100, max_position_embeddings=128, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=99,
        pad_token_id=0))
    fuse = next(p for p in result.passes if p.name == "fuse-ort")
    assert fuse.stats.get("partial_rotary_embedding") == 4  # q and k of both layers
    # cos caches 8 wide: 16 dims. Phi-3's packed qkv_proj is cut by Slices under `fuse`; its output
    # goes straight into o_proj (the Reshape to its own shape between two Transposes is dropped)
    _assert_shared_form(tmp_path / "genai", rotary_rows=128, value_ops=("Slice",))
    assert not any(SHARED_NOTICE in n for n in result.notices)
    expected = _torch_greedy(model, PROMPT, NEW)
    assert generate(tmp_path / "genai", PROMPT, NEW) == expected
    # the plain fused graph (rotary before GroupQueryAttention, on [B, S, n·D]) decodes the same
    from graphc.front.generate import Decoder

    plain = compress(tmp_path / "exp" / "model.onnx", tmp_path / "plain.onnx", recipe="fuse")
    rotary = [n for n in plain.model.graph if n.op_type == "RotaryEmbedding"]
    assert rotary and all(n.attributes.get_int("rotary_embedding_dim") == 16 for n in rotary)
    assert Decoder(tmp_path / "plain.onnx").greedy(np.array([PROMPT]), NEW).tokens[0].tolist() == expected


def test_layers_without_rotary_take_the_shared_form(tmp_path):
    """SmolLM3 leaves rotary out of some layers (``no_rope_layers`` in its config; here every
    second): those go into GroupQueryAttention with do_rotary 0 and no caches, the others as
    usual; genai's tokens are PyTorch's."""
    from transformers import SmolLM3Config

    from graphc.exporters.genai import generate
    from graphc.exporters.genai_gqa import already_shared

    config = SmolLM3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=100, max_position_embeddings=128, no_rope_layer_interval=2,
                           bos_token_id=1, eos_token_id=99, pad_token_id=0)
    assert config.no_rope_layers == [1, 0]  # layer 1 without rotary
    model, result = _fused_genai(tmp_path, "smollm3", config)
    assert not any(SHARED_NOTICE in n for n in result.notices)
    config_json = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config_json["search"]["past_present_share_buffer"] is True
    written, attention = _attention(tmp_path / "genai")
    by_layer = {n.inputs[3].name: n for n in attention}
    rotary, plain = by_layer["past_key_values.0.key"], by_layer["past_key_values.1.key"]
    assert rotary.attributes.get_int("do_rotary") == 1 and rotary.inputs[7] is not None
    assert plain.attributes.get_int("do_rotary") == 0 and len(plain.inputs) == 7
    assert not [n for n in written.graph if n.op_type == "RotaryEmbedding"]
    assert already_shared(written)  # a second write keeps it as it is
    from graphc.front.generate import Decoder

    shared = Decoder(tmp_path / "genai" / "model.onnx")  # a layer with do_rotary = 0: positions from the mask
    assert shared.shared and not shared.position_ids
    want = _torch_greedy(model, PROMPT, NEW)
    assert shared.greedy(np.array([PROMPT]), NEW).tokens[0].tolist() == want
    assert generate(tmp_path / "genai", PROMPT, NEW) == want


def _family_config(family):
    import transformers as t

    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "vocab_size": 100, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 99, "pad_token_id": 0}
    return {
        "granite": lambda: t.GraniteConfig(**size, num_key_value_heads=2),
        "olmo2": lambda: t.Olmo2Config(**size, num_key_value_heads=2),
        "stablelm": lambda: t.StableLmConfig(**size, num_key_value_heads=2, partial_rotary_factor=1.0),
        "starcoder2": lambda: t.Starcoder2Config(**size, num_key_value_heads=2),
        "falcon": lambda: t.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                                         new_decoder_architecture=True, num_kv_heads=2, bos_token_id=1,
                                         eos_token_id=99),
        "phi": lambda: t.PhiConfig(**size, partial_rotary_factor=1.0),
        # soft-capped attention, a 4-token window on its sliding layer
        "gemma2": lambda: t.Gemma2Config(**size, num_key_value_heads=2, head_dim=16, sliding_window=4),
        # rotary on interleaved pairs of dims (inside the op: rotary_interleaved), scaled logits
        "cohere": lambda: t.CohereConfig(**size, num_key_value_heads=2),
        # Pythia's architecture, every dim of its 16-wide heads rotated (the op takes multiples of 16)
        "gpt_neox": lambda: t.GPTNeoXConfig(**size, rotary_pct=1.0),
    }[family]()


def test_soft_capped_attention_fuses_with_its_cap(tmp_path):
    """Gemma-2 caps its attention scores (cap · tanh(s / cap)) before the mask: the KV-cache graph
    fuses into GroupQueryAttention with ``softcap``, and graphc.front.generate's tokens on it are
    PyTorch's (the genai form: the family test above)."""
    from graphc.front.api import compress, export
    from graphc.front.generate import Decoder
    from graphc.models.base import hf_offline

    hf_offline()
    folder, model = _save(tmp_path / "gemma2", _family_config("gemma2"))
    export(folder, tmp_path / "kv.onnx", kv_cache=True)
    result = compress(tmp_path / "kv.onnx", tmp_path / "fused.onnx", recipe="fuse")
    attention = [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    assert all(n.attributes.get_float("softcap") == model.config.attn_logit_softcapping for n in attention)
    tanh = [n for n in result.model.graph if n.op_type == "Tanh"]
    assert len(tanh) == 1 and tanh[0].outputs[0].shape[-1] == 100  # only the final logits' own cap left
    tokens = Decoder(tmp_path / "fused.onnx").greedy(np.array([PROMPT]), NEW).tokens[0].tolist()
    assert tokens == _torch_greedy(model, PROMPT, NEW)


@pytest.mark.families
@pytest.mark.skipif(__import__("os").environ.get("GRAPHC_FAMILIES") != "1",
                    reason="set GRAPHC_FAMILIES=1 to run every family (~10 s each)")
@pytest.mark.parametrize("family, shared", [("granite", True), ("olmo2", True), ("stablelm", True),
                                            ("starcoder2", True), ("falcon", True), ("gemma2", True),
                                            ("cohere", True), ("gpt_neox", True), ("phi", True)])
def test_more_decoder_families_generate_pytorchs_tokens(family, shared, tmp_path):
    """The other decoder families at head size 16, fused: the shared-buffer form (Gemma-2's
    attention with its soft cap; Phi-2's with as many KV heads as query heads), and genai's
    greedy tokens equal PyTorch's."""
    from graphc.exporters.genai import generate

    model, result = _fused_genai(tmp_path, family, _family_config(family))
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is shared
    if family == "gemma2":  # the soft cap inside the op; the sliding layer's window too
        _, attention = _attention(tmp_path / "genai")
        assert [n.attributes.get_float("softcap") for n in attention] == [model.config.attn_logit_softcapping] * 2
        assert sorted(n.attributes.get_int("local_window_size", -1) for n in attention) == [-1, 4]
    if family == "cohere":  # its interleaved rotary inside the op
        _, attention = _attention(tmp_path / "genai")
        assert [n.attributes.get_int("rotary_interleaved", 0) for n in attention] == [1, 1]
        assert all(n.attributes.get_int("do_rotary", 0) == 1 for n in attention)
    assert any(SHARED_NOTICE in n for n in result.notices) is not shared
    assert generate(tmp_path / "genai", PROMPT, NEW) == _torch_greedy(model, PROMPT, NEW)


def test_partial_rotary_the_op_refuses_stays_outside_it(tmp_path):
    """Phi-3 rotating 8 dims of each head: ONNX Runtime's rotary inside the op takes a multiple of
    16, so the folder keeps the model's rotary outside the op over shared buffers, and says so;
    tokens stay PyTorch's."""
    from transformers import Phi3Config

    from graphc.exporters.genai import generate

    model, result = _fused_genai(tmp_path, "phi3", Phi3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=100, max_position_embeddings=128, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0))
    assert [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]  # attention itself fused
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert any(ROTARY_OUTSIDE in n and "multiple of 16" in n for n in result.notices)
    assert generate(tmp_path / "genai", PROMPT, NEW) == _torch_greedy(model, PROMPT, NEW)


def test_qwen3_per_head_norms_take_the_shared_buffer_form(tmp_path):
    """Qwen3 normalizes each head of Q and K before rotary, so its fused graph rotates
    [B, heads, S, D] between Transposes: the normalized heads go into the op reshaped to
    [B, S, heads·D], the rotary and Transposes go, and genai generates PyTorch's tokens; int4
    generates graphc.front.generate's tokens on the same recipe's plain graph."""
    from transformers import Qwen3Config

    from graphc.exporters.genai import generate
    from graphc.front.api import compress, export
    from graphc.front.generate import Decoder
    from graphc.models.base import hf_offline

    hf_offline()
    config = Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=100, max_position_embeddings=128)
    folder, model = _save(tmp_path / "qwen3", config)
    export(folder, tmp_path / "exported", kv_cache=True, genai=True)
    src = tmp_path / "exported" / "model.onnx"
    result = compress(src, tmp_path / "fused", recipe="fuse", genai=True)
    assert not [n for n in result.notices if SHARED_NOTICE in n]
    _assert_shared_form(tmp_path / "fused", rotary_rows=128)
    fused = ir.load(tmp_path / "fused" / "model.onnx")
    assert not [n for n in fused.graph if n.op_type == "Transpose"]
    for node in _attention(tmp_path / "fused")[1]:
        for i in (0, 1):  # the per-head norm's output, reshaped to [B, S, heads·D] for the op
            reshape = node.inputs[i].producer()
            assert reshape.op_type == "Reshape"
            assert reshape.inputs[0].producer().op_type == "SimplifiedLayerNormalization"
    assert generate(tmp_path / "fused", PROMPT, NEW) == _torch_greedy(model, PROMPT, NEW)
    path = tmp_path / "int4-rtn.toml"
    path.write_text('name = "int4-rtn"\n[tolerance]\nmin_cosine = 0.9\n[[passes]]\nname = "fuse-ort"\n'
                    '[[passes]]\nname = "quantize-nbits"\noptions = { bits = 4, block_size = 16, method = "rtn" }\n')
    compress(src, tmp_path / "int4", recipe=str(path), genai=True)
    _assert_shared_form(tmp_path / "int4", rotary_rows=128)
    compress(src, tmp_path / "plain.onnx", recipe=str(path))
    ours = Decoder(tmp_path / "plain.onnx").greedy(np.array([PROMPT]), NEW).tokens[0].tolist()
    assert generate(tmp_path / "int4", PROMPT, NEW) == ours


def test_gpt2_folder_runs_as_a_generic_decoder(tmp_path):
    """genai's "gpt2" model type wants the legacy combined past; graphc's GPT-2 folder names its
    type "decoder" (genai's generic decoder-only model) and generates PyTorch's tokens; fused,
    its attention (as many KV heads as query heads, absolute positions) is GroupQueryAttention
    without rotary in the shared-buffer form, and the tokens are the same."""
    from transformers import GPT2Config

    from graphc.exporters.genai import generate
    from graphc.front.api import compress, export
    from graphc.models.base import hf_offline

    hf_offline()
    config = GPT2Config(vocab_size=100, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2, initializer_range=0.5)  # GPT-2's 0.02 repeats one token
    folder, model = _save(tmp_path / "gpt2", config)
    export(folder, tmp_path / "exported", kv_cache=True, genai=True)
    assert json.loads((tmp_path / "exported" / "genai_config.json").read_text())["model"]["type"] == "decoder"
    tokens = generate(tmp_path / "exported", PROMPT, NEW)
    assert tokens == _torch_greedy(model, PROMPT, NEW) and len(set(tokens)) > 1
    result = compress(tmp_path / "exported" / "model.onnx", tmp_path / "genai", recipe="fuse", genai=True)
    assert not any(SHARED_NOTICE in n for n in result.notices)
    assert json.loads((tmp_path / "genai" / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    _, attention = _attention(tmp_path / "genai")
    assert [(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads"),
             n.attributes.get_int("do_rotary", 0)) for n in attention] == [(4, 4, 0)] * 2
    assert generate(tmp_path / "genai", PROMPT, NEW) == tokens


@pytest.mark.parametrize("family,window", [("mistral", 3), ("mistral", 4096), ("gemma3_text", 4)])
def test_sliding_windows_go_into_the_op(tmp_path, family, window):
    """A sliding window shorter than the 128-token context becomes the op's local_window_size on
    the layers that slide (every Mistral layer; Gemma-3's sliding layers, not its full ones), with
    the mask gone; genai generates PyTorch's tokens 16 tokens past the window. A 4096-token window
    never drops a token in a 128-token context: no local window. Gemma-3 normalizes each head
    after the Transpose, and its local and global layers rotate with different frequencies."""
    import transformers

    from graphc.exporters.genai import generate
    from graphc.front.api import compress, export
    from graphc.models.base import hf_offline

    hf_offline()
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=100, max_position_embeddings=128, sliding_window=window)
    if family == "mistral":
        config = transformers.MistralConfig(**shape)
    else:
        config = transformers.Gemma3TextConfig(**shape, head_dim=16, layer_types=["sliding_attention", "full_attention"])
    folder, model = _save(tmp_path / family, config)
    export(folder, tmp_path / "exported", kv_cache=True, genai=True)
    result = compress(tmp_path / "exported" / "model.onnx", tmp_path / "fused", recipe="fuse", genai=True)
    assert not [n for n in result.notices if SHARED_NOTICE in n]
    _assert_shared_form(tmp_path / "fused", rotary_rows=128)
    windows = [n.attributes.get_int("local_window_size", -1) for n in _attention(tmp_path / "fused")[1]]
    expected = {"mistral": [window, window], "gemma3_text": [window, -1]}[family] if window < 128 else [-1, -1]
    assert windows == expected
    assert generate(tmp_path / "fused", PROMPT, NEW) == _torch_greedy(model, PROMPT, NEW)


def test_a_graph_that_cannot_say_its_attention_window_keeps_its_form(llama16, exported, tmp_path):
    """No graphc metadata and no config.json: a sliding window in another exporter's mask would
    be invisible, so the rewrite refuses and leaves the graph as it was."""
    from graphc.exporters.genai_gqa import shared_buffer_form
    from graphc.front.api import compress

    fused = compress(exported[0] / "model.onnx", tmp_path / "fused.onnx", recipe="fuse").model
    for key in [k for k in fused.metadata_props if k.startswith("graphc.arch.")]:
        del fused.metadata_props[key]
    before = ir.serde.serialize_model(fused).SerializeToString()
    assert "attention window is not known" in shared_buffer_form(fused, 128, {})
    assert ir.serde.serialize_model(fused).SerializeToString() == before
    assert shared_buffer_form(fused, 128, {"sliding_window": None, "model_type": "llama"}) is None  # config.json says


@pytest.mark.smollm2
@pytest.mark.skipif(__import__("os").environ.get("GRAPHC_SMOLLM2") != "1",
                    reason="set GRAPHC_SMOLLM2=1 (load ~20 s, export ~2 min)")
def test_smollm2_genai_folders_generate_pytorchs_tokens(tmp_path):
    """The real SmolLM2-135M: og.Generator on `export --kv-cache --genai` (separate buffers) and on
    `compress --recipe fuse --genai` (shared buffer, rotary inside the op) gives PyTorch's 24
    greedy tokens after a 64-token prompt of real text (GRAPHC_SMOLLM2=1)."""
    from graphc.exporters.genai import generate
    from graphc.front.api import compress, export
    from graphc.models import get_model_spec

    spec = get_model_spec("smollm2")
    model = spec.load_hf()
    prompt = spec.tokenizer()(spec.eval_texts(1)[0], return_tensors="np")["input_ids"][0, :64].tolist()
    want = _torch_greedy(model, prompt, 24)
    export("smollm2", tmp_path / "exported", kv_cache=True, genai=True)
    assert generate(tmp_path / "exported", prompt, 24) == want
    compress(tmp_path / "exported" / "model.onnx", tmp_path / "fused", recipe="fuse", genai=True)
    config = json.loads((tmp_path / "fused" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert generate(tmp_path / "fused", prompt, 24) == want

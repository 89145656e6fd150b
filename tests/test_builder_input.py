"""Another tool's decoder as the input: a folder written by onnxruntime-genai's model builder
(GroupQueryAttention with rotary inside over a shared past/present buffer, head dims left
symbolic, no graphc metadata, no config.json) goes through compress, as a .onnx and as a genai
folder."""

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra")

PROMPT = [5, 17, 33, 8, 61]
POSITIONS = 96  # the rotary caches' rows: calibration windows must not be longer


def _tiny_hf_folder(folder, family="llama"):
    """A tiny Llama (or Qwen2: Q/K/V biases, given random values) of head size 16, as ONNX
    Runtime's rotary inside the op wants, with tied embeddings (which the builder stores once,
    read by the lookup through a Transpose) and a word-level tokenizer, as a Hugging Face folder."""
    from graphc.core.arch import hf_offline

    hf_offline()
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = kind(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=100, max_position_embeddings=POSITIONS, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", bos_token="w1",
                            eos_token="w2").save_pretrained(folder)


def _build(root, family="llama", precision="fp32"):
    hf = root / "hf"
    _tiny_hf_folder(hf, family)
    out = root / precision
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(root / "cache")], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (hf / "config.json").unlink()  # nothing beside the graph but the builder's own files
    return out


@pytest.fixture(scope="module")
def builder_folder(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("builder"))


def test_builder_graph_shapes_and_positions(builder_folder):
    """The past's symbolic head dim is read from its attention (not set to 0, which ONNX Runtime
    refuses), and default text windows stop at the rotary caches' rows."""
    from graphc.checks import default_text, synth

    model = ir.load(builder_folder / "model.onnx")
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    assert not isinstance(past.shape[3], int)  # the builder leaves it symbolic
    assert synth.past_head_size(past) == 16
    prefill, decode = synth.synthesize_inputs(model, count=2)
    assert prefill[past.name].shape == (2, 2, 0, 16) and decode[past.name].shape == (2, 2, 5, 16)
    completed = synth.complete_decoder_feeds(model, [{"input_ids": np.zeros((1, 4), np.int64),
                                                      "attention_mask": np.ones((1, 4), np.int64)}])
    assert completed[0][past.name].shape == (1, 2, 0, 16)
    assert default_text._max_positions(model) == POSITIONS


def test_compress_builder_model(builder_folder, tmp_path):
    from graphc.front.api import compress

    out = tmp_path / "int8.onnx"
    result = compress(builder_folder / "model.onnx", out, recipe="int8")
    assert result.validation.passed and out.is_file()
    assert result.calibration is None  # int8's causal-LM form calibrates nothing
    assert f"up to {POSITIONS} tokens" in result.validation.input_source  # windows cut at the rotary caches' rows
    ops = {n.op_type for n in ir.load(out).graph}
    assert "GroupQueryAttention" in ops and "MatMulNBits" in ops  # int8's causal-LM form: 8-bit blocks


def test_builder_folder_to_genai_folder(builder_folder, tmp_path):
    """--genai on the builder's folder: its genai_config gives the facts, the graph keeps its
    shared-buffer form, and genai generates the builder folder's own tokens (fuse) or runs (int4)."""
    from graphc.exporters.genai import generate
    from graphc.front.api import compress

    want = generate(builder_folder, PROMPT, 12)
    from graphc.front.generate import Decoder

    # graphc.front.generate drives the builder's model too (head dims from its genai_config.json)
    assert Decoder(builder_folder / "model.onnx").greedy(np.array([PROMPT]), 12).tokens[0].tolist() == want
    fused = tmp_path / "fuse"
    result = compress(builder_folder / "model.onnx", fused, recipe="fuse", genai=True)
    assert result.validation.passed
    config = json.loads((fused / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["head_size"] == 16 and config["model"]["context_length"] == POSITIONS
    assert generate(fused, PROMPT, 12) == want
    q = tmp_path / "int4"
    result = compress(builder_folder / "model.onnx", q, recipe="int4", genai=True)
    assert result.validation.passed
    tie = next(r for r in result.passes if r.name == "tie-head")
    # the builder's lookup reads the head's weight through a Transpose, which constant folding
    # turns into a second copy at this size: tied again
    assert tie.stats.get("heads_tied", 0) + tie.stats.get("tables_turned", 0) == 1
    split = next(r for r in result.passes if r.name == "split-packed")
    assert split.stats["attentions_split"] == 2  # Q, K and V planned apart
    graph = ir.load(q / "model.onnx").graph
    assert any(n.op_type == "MatMulNBits" for n in graph)
    assert all(n.attributes.get_int("do_rotary", 0) for n in graph if n.op_type == "GroupQueryAttention")
    assert len(generate(q, PROMPT, 12)) == 12


def test_split_qkv_is_exact(builder_folder):
    """The builder's packed Q/K/V MatMul as three, fed to the op as query, key and value: the
    same logits."""
    from graphc.checks.synth import synthesize_inputs
    from graphc.checks.validate import make_session
    from graphc.passes.split_packed import SplitPacked

    model = ir.load(builder_folder / "model.onnx")
    feeds = synthesize_inputs(model, count=2)
    before = [make_session(model).run(None, f) for f in feeds]
    result = SplitPacked()(model)
    assert result.modified and result.stats.counts["attentions_split"] == 2
    attn = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is not None and n.inputs[2] is not None for n in attn)
    after = [make_session(model).run(None, f) for f in feeds]
    for a, b in zip(before, after):  # logits (a present's rows past a padded row's length are not written)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)


def test_builder_tied_form_turned_into_one_table(builder_folder):
    """The builder stores a tied table once as the head's [hidden, vocab] weight and looks rows
    up through a Transpose of it: tie-head stores the table as graphc's passes expect it (the
    Gather reads it, the head its transpose), exactly."""
    from graphc.checks.synth import synthesize_inputs
    from graphc.checks.validate import make_session
    from graphc.passes.tie_head import TieHead

    model = ir.load(builder_folder / "model.onnx")
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[1].name == "input_ids")
    assert gather.inputs[0].producer().op_type == "Transpose"
    feed = synthesize_inputs(model, count=1)[0]
    before = make_session(model).run(None, feed)[0]
    result = TieHead()(model)
    assert result.modified and result.stats.counts["tables_turned"] == 1
    table = gather.inputs[0]
    assert table.const_value is not None and tuple(table.shape) == (100, 64)
    head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "logits")
    assert head.inputs[1].producer().op_type == "Transpose" and head.inputs[1].producer().inputs[0] is table
    assert sum(1 for v in model.graph.initializers.values() if v.shape is not None and 100 in list(v.shape)) == 1
    np.testing.assert_array_equal(make_session(model).run(None, feed)[0], before)


def test_split_packed_with_biases_is_exact(tmp_path):
    """Qwen2's Q/K/V biases, packed by the builder into one Add before the op: split with the
    projections, the same logits; its int4 genai folder validates and generates."""
    from graphc.checks.synth import synthesize_inputs
    from graphc.checks.validate import make_session
    from graphc.exporters.genai import generate
    from graphc.front.api import compress
    from graphc.passes.split_packed import SplitPacked

    folder = _build(tmp_path, "qwen2")
    model = ir.load(folder / "model.onnx")
    attn = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert attn.inputs[0].producer().op_type == "Add"  # the packed bias
    feeds = synthesize_inputs(model, count=2)
    before = [make_session(model).run(None, f)[0] for f in feeds]
    assert SplitPacked()(model).stats.counts["attentions_split"] == 2
    assert all(n.inputs[i].producer().op_type == "Add" for n in model.graph if n.op_type == "GroupQueryAttention"
               for i in range(3))
    for f, ref in zip(feeds, before):
        np.testing.assert_allclose(make_session(model).run(None, f)[0], ref, rtol=1e-5, atol=1e-5)
    q = tmp_path / "int4"
    assert compress(folder / "model.onnx", q, recipe="int4", genai=True).validation.passed
    assert len(generate(q, PROMPT, 8)) == 8


def test_builder_int4_folder_keeps_its_quantized_weights_and_says_so(tmp_path):
    from graphc.front.api import compress

    folder = _build(tmp_path, precision="int4")
    result = compress(folder / "model.onnx", tmp_path / "again.onnx", recipe="int4")
    assert result.validation.passed
    said = [n for n in result.notices if "already holds quantized weights" in n]
    assert said and "MatMulNBits x" in said[0]


def test_generate_drives_the_builders_folder_from_text_and_ids(builder_folder, capsys):
    """graphc.generate / `graphc generate` on the builder's folder: the text prompt goes through the
    folder's tokenizer.json, the tokens are genai's own, and bad input is one line."""
    import graphc
    from graphc.exporters.genai import generate
    from graphc.front.cli import main

    want = generate(builder_folder, PROMPT, 12)
    text = " ".join(f"w{i}" for i in PROMPT)
    result = graphc.generate(builder_folder, text, 12, stop_at_eos=False)
    assert result.tokens == want and result.shared_buffers
    assert result.text.split() == [f"w{i}" for i in want if i not in (0, 1, 2)]  # special tokens left out
    assert graphc.generate(builder_folder / "model.onnx", PROMPT, 12, stop_at_eos=False).tokens == want
    capsys.readouterr()
    assert main(["generate", str(builder_folder), "--ids", ",".join(map(str, PROMPT)), "-n", "12", "--no-stop",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want
    assert main(["generate", str(builder_folder), "--prompt", text, "-n", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_new_tokens=0" in err
    assert main(["generate", str(builder_folder / "genai_config.json"), "--ids", "1,2"]) != 0
    assert capsys.readouterr().err.count("\n") == 1
    # past the rotary caches' rows: refused before a buffer is allocated
    assert main(["generate", str(builder_folder), "--ids", "1,2", "-n", str(POSITIONS + 10)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"context of {POSITIONS} positions" in err


def test_size_like_genai_int4_is_the_builders_own_int4_bytes(builder_folder, tmp_path):
    """mixed-precision's ``size_like = "genai-int4"`` against the builder's own ``-p int4`` folder
    of the same model: its MatMulNBits codes and scales (the tied table once, shared by the
    lookup) to the byte."""
    import onnx
    from onnx import numpy_helper

    from graphc.passes import _sensitivity as sens
    from graphc.passes.mixed_precision import GRAPH_MARGIN, MixedPrecision
    from graphc.passes.split_packed import SplitPacked
    from graphc.passes.tie_head import TieHead

    model = ir.load(builder_folder / "model.onnx")
    TieHead()(model)
    SplitPacked()(model)
    layers, _ = sens.find_layers(model.graph, min_cols=32)
    assert sum(layer.tied for layer in layers) == 1 and len(layers) == 2 * 7 + 1
    budget = MixedPrecision(MixedPrecision.Options(max_bits=0, size_like="genai-int4"))._size_like(layers, 0)

    q = onnx.load(_build(tmp_path, precision="int4") / "model.onnx")
    inits = {t.name: t for t in q.graph.initializer}
    quantized = {name for n in q.graph.node if n.op_type == "MatMulNBits" for name in n.input[1:3]}
    builder = sum(numpy_helper.to_array(inits[name]).nbytes for name in quantized)
    assert any(n.op_type == "GatherBlockQuantized" for n in q.graph.node)  # the table stored once
    assert budget == int(builder * (1 - GRAPH_MARGIN))

"""KV-cache decoder export and greedy generation through ONNX Runtime."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

import graphc  # noqa: E402
from graphc.core.errors import InvalidModelError  # noqa: E402
from graphc.front.generate import Decoder  # noqa: E402

PROMPT = np.array([[5, 17, 42, 8, 99, 3]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from graphc.exporters.decoder import export_decoder
    from graphc.models.fixtures import tiny_llama

    model = tiny_llama()
    path = tmp_path_factory.mktemp("decoder") / "tiny-kv.onnx"
    export_decoder(model, path)
    return model, path


def _torch_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, prompt.shape[1]:].numpy()


def test_kv_decoder_signature_and_metadata(tiny):
    model, path = tiny
    proto = onnx.load(path)
    layers = model.config.num_hidden_layers
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["graphc.arch.num_kv_heads"] == "2" and "graphc.decoder.kv_cache" in meta
    past = proto.graph.input[3].type.tensor_type.shape.dim
    assert past[1].dim_value == 2 and past[2].dim_param and past[3].dim_value == 8


def test_greedy_generation_matches_pytorch(tiny):
    model, path = tiny
    got = Decoder(path).greedy(PROMPT, 20)
    np.testing.assert_array_equal(got.tokens, _torch_greedy(model, PROMPT, 20))
    assert len(got.step_s) == 19 and got.decode_tokens_per_s > 0
    batch = np.concatenate([PROMPT, PROMPT[:, ::-1]])  # two rows at once, same as one by one
    rows = Decoder(path).greedy(batch, 8).tokens
    np.testing.assert_array_equal(rows[1], Decoder(path).greedy(batch[1:], 8).tokens[0])


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_compressed_decoders_generate_through_the_same_path(tiny, tmp_path, recipe):
    """The recipes fuse a KV decoder's attention into GroupQueryAttention with the cache,
    validate it (synthesized prefill and decode calls) and the result decodes. Random tiny
    weights: only int8 is expected to keep the tokens."""
    from graphc.core.recipes import get_recipe, recipe_from_dict

    model, path = tiny
    out = tmp_path / f"{recipe}.onnx"
    if recipe == "int4":  # the recipe's 4-bit passes without its sensitivity search and GPTQ (minutes here)
        steps = [{"name": s.pass_name, "options": {**s.options, **({"method": "rtn"} if "method" in s.options else {})}}
                 for s in get_recipe("int4").steps if s.pass_name != "mixed-precision"]
        recipe = recipe_from_dict({"name": "int4-rtn", "passes": steps})
    result = graphc.compress(path, out, recipe=recipe, force=True, attribution=False)
    (fuse,) = [r for r in result.passes if r.name == "fuse-ort"]
    assert fuse.stats["gqa_kv_cache"] == model.config.num_hidden_layers, fuse.stats
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers and "Softmax" not in ops
    quantized = sum(r.stats.get("matmuls_quantized", 0) for r in result.passes)
    assert quantized >= 4 * model.config.num_hidden_layers, [(r.name, r.stats) for r in result.passes]
    assert result.validation.output_cosine > 0.98, result.validation.to_dict()
    tokens = Decoder(out).greedy(PROMPT, 12).tokens
    assert tokens.shape == (1, 12) and ((0 <= tokens) & (tokens < model.config.vocab_size)).all()
    if recipe == "int8":
        np.testing.assert_array_equal(tokens[:, :6], _torch_greedy(model, PROMPT, 6))


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_a_sliding_window_shorter_than_the_text_generates_what_pytorch_does(family, tmp_path):
    """A window of 4 tokens under a 6-token prompt and 12 new tokens: the cache is exported whole
    (past + new, the contract graphc's generate and genai drive) and the window is applied in the
    mask, as PyTorch's sliding cache drops the same tokens. (Exported with transformers' sliding
    cache the graph failed at run time once the text passed the window.) The window is in the
    metadata."""
    import torch
    from transformers import AutoModelForCausalLM

    from graphc.exporters.decoder import export_decoder
    from graphc.models.tiny_families import tiny_config

    config = tiny_config(family)
    config.sliding_window = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path / "kv.onnx"
    export_decoder(model, path)
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert meta["graphc.arch.sliding_window"] == "4"
    got = Decoder(path).greedy(PROMPT, 12).tokens
    np.testing.assert_array_equal(got, _torch_greedy(model, PROMPT, 12))


def test_kv_export_refuses_an_encoder_up_front(tmp_path):
    from graphc.core.errors import ExportError
    from graphc.exporters.decoder import export_decoder
    from graphc.models.fixtures import tiny_bert

    with pytest.raises(ExportError, match="BertModel is not a decoder-only causal LM"):
        export_decoder(tiny_bert(), tmp_path / "bert-kv.onnx")
    assert not list(tmp_path.iterdir())


def test_decoder_refuses_a_model_without_cache(tmp_path):
    from tests.conftest import tiny_model_proto

    path = tmp_path / "plain.onnx"
    onnx.save(tiny_model_proto(), path)
    with pytest.raises(InvalidModelError, match="not a KV-cache decoder"):
        Decoder(path)


@pytest.mark.smollm2
@pytest.mark.skipif(os.environ.get("GRAPHC_SMOLLM2") != "1", reason="set GRAPHC_SMOLLM2=1 (load ~20 s, export ~2 min)")
def test_smollm2_greedy_32_tokens_match_pytorch(tmp_path):
    """fp32 SmolLM2 through ONNX Runtime gives PyTorch's 32 greedy tokens, unfused and with
    fuse-ort's GroupQueryAttention over the cache (GRAPHC_SMOLLM2=1)."""
    from graphc.core import io
    from graphc.exporters.decoder import export_decoder
    from graphc.models import get_model_spec
    from graphc.passes.fuse_ort import FuseOrt

    recipe = get_model_spec("smollm2")
    model = recipe.load_hf()
    path = export_decoder(model, tmp_path / "smollm2-kv.onnx").path
    text = recipe.eval_texts(1)[0]
    prompt = recipe.tokenizer()(text, return_tensors="np")["input_ids"][:, :64]
    want = _torch_greedy(model, prompt, 32)
    np.testing.assert_array_equal(Decoder(path).greedy(prompt, 32).tokens, want)
    fused = io.load_model(path)
    stats = FuseOrt()(fused).stats
    assert stats.counts["gqa_kv_cache"] == model.config.num_hidden_layers, stats.counts
    io.save_model(fused, tmp_path / "smollm2-kv-fused.onnx")
    np.testing.assert_array_equal(Decoder(tmp_path / "smollm2-kv-fused.onnx").greedy(prompt, 32).tokens, want)


def test_generate_samples_repeatably_and_greedy_is_its_limit(tiny, capsys):
    """graphc.generate / `graphc generate` sample when asked: the same seed gives the same tokens,
    the result reports the seed it drew, and a top-k of 1 or a near-zero temperature give
    PyTorch's greedy tokens; bad settings are one line."""
    import json

    from graphc.front.cli import main

    model, path = tiny
    ids, want = PROMPT[0].tolist(), _torch_greedy(model, PROMPT, 10)[0].tolist()
    assert graphc.generate(path, ids, 10, stop_at_eos=False).sampling is None
    assert graphc.generate(path, ids, 10, stop_at_eos=False, top_k=1, seed=3).tokens == want
    assert graphc.generate(path, ids, 10, stop_at_eos=False, temperature=1e-4).tokens == want
    a = graphc.generate(path, ids, 10, stop_at_eos=False, temperature=1.5, top_p=0.95)
    assert a.sampling.seed is not None and a.sampling.temperature == 1.5
    again = graphc.generate(path, ids, 10, stop_at_eos=False, temperature=1.5, top_p=0.95, seed=a.sampling.seed)
    assert again.tokens == a.tokens and all(0 <= t < model.config.vocab_size for t in a.tokens)
    draws = {tuple(graphc.generate(path, ids, 10, stop_at_eos=False, temperature=2.0, seed=s).tokens) for s in range(4)}
    assert len(draws) > 1  # random weights: a flat distribution, different seeds differ
    capsys.readouterr()
    args = ["generate", str(path), "--ids", ",".join(map(str, ids)), "-n", "10", "--no-stop"]
    assert main([*args, "--temperature", "1.5", "--top-p", "0.95", "--seed", str(a.sampling.seed), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == a.tokens and out["sampling"]["seed"] == a.sampling.seed
    # a repetition penalty: the first new token is the arg max of the prefill's logits with the
    # prompt's tokens penalized (checked against the model's own logits), and the CLI takes it
    dec = Decoder(path)
    empty = np.zeros((1, dec.kv_heads, 0, dec.head_dim), dec.cache_dtype)
    last, _ = dec.step(PROMPT, [empty] * len(dec.past_names), PROMPT.shape[1])
    from graphc.front.sampling import penalize_repeats

    first = int(penalize_repeats(last, PROMPT, 3.0).argmax())
    penalized = graphc.generate(path, ids, 10, stop_at_eos=False, repetition_penalty=3.0).tokens
    assert penalized[0] == first and graphc.generate(path, ids, 10, stop_at_eos=False, repetition_penalty=1.0).tokens == want
    # over 30 tokens this model's greedy text loops back on itself; penalized, it does not
    loop = graphc.generate(path, ids, 30, stop_at_eos=False).tokens
    assert len(set(loop)) < 30 and len(set(graphc.generate(path, ids, 30, stop_at_eos=False,
                                                           repetition_penalty=3.0).tokens)) == 30
    assert main([*args, "--repetition-penalty", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == penalized
    assert main([*args, "--top-p", "1.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p=1.5" in err
    # min-p 1: only the likeliest token each step, sampled: the greedy tokens, with a seed reported
    assert main([*args, "--min-p", "1", "--seed", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == want and out["sampling"]["min_p"] == 1 and out["sampling"]["seed"] == 4

"""onnxruntime-genai folders from graphc export --kv-cache --genai and compress --genai."""

import json

import numpy as np
import pytest

from graphc.core.errors import GraphcError

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from graphc.models.fixtures import tiny_llama

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model = tiny_llama()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return folder, model


def _torch_greedy(model, prompt, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPT = [5, 17, 33, 8, 61]


@pytest.fixture(scope="module")
def genai_export(llama_folder, tmp_path_factory):
    from graphc.front.api import export

    out = tmp_path_factory.mktemp("exp") / "genai"
    export(llama_folder[0], out, kv_cache=True, genai=True)
    return out


def test_export_genai_folder_generates_what_pytorch_does(llama_folder, genai_export):
    from graphc.exporters.genai import generate

    _, model = llama_folder
    out = genai_export
    config = json.loads((out / "genai_config.json").read_text())
    dec = config["model"]["decoder"]
    assert dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2 and dec["head_size"] == 8
    assert config["search"]["past_present_share_buffer"] is False
    # ONNX Runtime's default thread count (a thread per physical core), not genai's half of the logical cores
    assert dec["session_options"]["intra_op_num_threads"] == 0
    assert (out / "model.onnx").is_file()
    assert generate(out, PROMPT, 12) == _torch_greedy(model, PROMPT, 12)


def test_compress_genai_folder_matches_graphc_generate(llama_folder, genai_export, tmp_path):
    """A fused decoder as a genai folder (the source's genai folder gives the config and tokenizer
    files): genai's tokens equal graphc.front.generate's on the same graph, and PyTorch's."""
    from graphc.front.api import compress
    from graphc.exporters.genai import generate
    from graphc.front.generate import Decoder

    _, model = llama_folder
    src = genai_export / "model.onnx"
    out = tmp_path / "genai-fuse"
    result = compress(src, out, recipe="fuse", genai=True)
    assert result.validation.passed and (out / "genai_config.json").is_file()
    ops = {n.op_type for n in result.model.graph}
    assert "GroupQueryAttention" in ops  # fused attention over the cache, still genai's I/O contract
    ours = Decoder(out / "model.onnx").greedy(np.array([PROMPT]), 12).tokens[0].tolist()
    assert generate(out, PROMPT, 12) == ours == _torch_greedy(model, PROMPT, 12)


def test_auto_writes_its_winner_as_a_genai_folder(genai_export, tmp_path):
    """--recipe auto --genai: the candidates are compiled, validated and timed as for a .onnx,
    and the fastest is written as a folder genai loads (its tokens are graphc.front.generate's on
    the folder's own graph); a busy folder is refused, and left as it was."""
    from graphc.exporters.genai import generate
    from graphc.front.api import compress
    from graphc.front.generate import Decoder

    out = tmp_path / "auto"
    result = compress(genai_export / "model.onnx", out, recipe="auto", genai=True)
    assert result.auto["winner"] in {c["candidate"] for c in result.auto["candidates"] if c["status"] == "passed"}
    assert (out / "genai_config.json").is_file() and any("genai's form" in n for n in result.notices)
    assert result.bytes_after == sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data"))
    ours = Decoder(out / "model.onnx").greedy(np.array([PROMPT]), 12).tokens[0].tolist()
    assert generate(out, PROMPT, 12) == ours
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(GraphcError, match="not empty"):
        compress(genai_export / "model.onnx", busy, recipe="auto", genai=True)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_genai_refuses_what_it_cannot_serve(llama_folder, tmp_path):
    from graphc.front.api import compress, export
    from graphc.models.fixtures import export_tiny

    folder, _ = llama_folder
    with pytest.raises(GraphcError, match="add --kv-cache"):
        export(folder, tmp_path / "x", genai=True)
    bert = tmp_path / "bert.onnx"
    export_tiny("bert", bert)
    with pytest.raises(GraphcError, match="KV cache"):
        compress(bert, tmp_path / "g", recipe="fuse", genai=True)
    assert not (tmp_path / "g").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(GraphcError, match="not empty"):
        export(folder, busy, kv_cache=True, genai=True)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(GraphcError, match="folder, not a .onnx file"):
        export(folder, tmp_path / "m.onnx", kv_cache=True, genai=True)

"""Tiny models, a tiny word-level tokenizer and image folders for the --calibration-data tests,
built offline in well under a second each; and a pass that records the calibration it gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.front import api
from graphc.core.pass_base import GraphcPass
from graphc.core.recipes import Recipe, Step, Tolerance

WORDS = "the a cat dog bird sat ran flew on under over mat tree roof red blue green fast slow big small".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB, HIDDEN = len(SPECIAL) + len(WORDS), 16


def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer ([CLS] text [SEP]) saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(str(folder))
    return folder


def lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" {WORDS[i % len(WORDS)]}" for i in range(n)]


def _save(graph, path: Path, meta: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def encoder(path: Path) -> Path:
    """input_ids, attention_mask, token_type_ids → last_hidden_state (embeddings, a linear layer, masked)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("emb", (VOCAB, HIDDEN)), ("types", (2, HIDDEN)), ("w", (HIDDEN, HIDDEN)))]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
             helper.make_node("Add", ["e", "t"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["y", "m3"], ["last_hidden_state"])]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    return _save(helper.make_graph(nodes, "enc", ids, out, inits), path, {"graphc.arch.kind": "encoder"})


def decoder(path: Path) -> Path:
    """input_ids, attention_mask → logits over the vocabulary (a causal LM's signature)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["x"]),
             helper.make_node("MatMul", ["x", "head"], ["logits"])]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    return _save(helper.make_graph(nodes, "dec", ids, out, inits), path,
                 {"graphc.arch.kind": "decoder", "graphc.arch.vocab_size": str(VOCAB)})


def vision(path: Path, size: int = 8) -> Path:
    """pixel_values [N, 3, size, size] → Conv → mean → pooler_output (a vision model's signature)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "k")]
    nodes = [helper.make_node("Conv", ["pixel_values", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["pooler_output"], axes=[2, 3], keepdims=0)]
    ins = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])]
    out = [helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", 8])]
    return _save(helper.make_graph(nodes, "vis", ins, out, inits), path, {"graphc.arch.modality": "vision"})


def image_folder(folder: Path, n: int = 12) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        w, h = int(rng.integers(10, 40)), int(rng.integers(10, 40))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


class Recorder(GraphcPass):
    """Changes nothing; keeps the calibration feeds and source it was given."""

    name = "record-calibration"
    needs_calibration = True
    seen: list = []

    def run(self, model, stats) -> bool:
        Recorder.seen.append((list(self.context.calibration or []), self.context.calibration_source))
        return False


RECORD = Recipe("record", "records its calibration feeds", (Step("record-calibration"),), Tolerance(min_cosine=0.99))


@pytest.fixture
def recorder(monkeypatch):
    real = api.get_pass
    monkeypatch.setattr(api, "get_pass", lambda name: Recorder if name == Recorder.name else real(name))
    Recorder.seen = []
    return Recorder


@pytest.fixture
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def _ids(tok_dir: Path, texts, special=True):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))(list(texts), add_special_tokens=special)["input_ids"]


def onnx_ir_model(path: Path):
    from graphc.core.io import load_model

    return load_model(path)

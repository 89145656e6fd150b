"""Token ids from tokenizer.json without transformers (graphc/checks/tokenizer_file.py): the same
ids, masks and pad token as transformers' AutoTokenizer on every tokenizer the project has, in
every call form graphc makes; folders it does not handle fall back; no PyTorch imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphc.checks import tokenizer_file

pytest.importorskip("transformers")

TEXTS = ["Hello world, this is a test.", "Ünïcödé ✓ Crème BRÛLÉE naïve café  and   spaces\n\nnew para",
         "x" * 3000, "The quick brown fox jumps over the lazy dog. " * 60, "中文字符测试 and 日本語",
         "  leading and trailing  ", "", "<|im_start|>user\nhi<|im_end|>", "[CLS] [SEP] [MASK] tokens"]


def _folders(tmp_path: Path) -> list[Path]:
    from tests.calibration_builders import make_tokenizer

    from graphc.models import minilm, smollm2, tiny_families

    out = [minilm.model_folder(), make_tokenizer(tmp_path / "word"), tiny_families.save_tiny_tokenizer(tmp_path / "bpe")]
    converted = Path(smollm2.converted_folder()) if hasattr(smollm2, "converted_folder") else None
    if converted is not None and (converted / "tokenizer.json").is_file():  # present once SmolLM2 was converted
        out.append(converted)
    return out


def test_the_same_ids_as_transformers(tmp_path):
    from transformers import AutoTokenizer

    from graphc.models import data

    texts = TEXTS + list(data.wiki_text("eval")[:20])
    for folder in _folders(tmp_path):
        want, got = AutoTokenizer.from_pretrained(str(folder)), tokenizer_file.load(folder)
        assert got is not None, folder
        for kw in ({}, {"add_special_tokens": False}, {"truncation": True, "max_length": 64}):
            assert got(texts, **kw)["input_ids"] == [list(x) for x in want(texts, **kw)["input_ids"]], (folder, kw)
        joined = "\n\n".join(texts)
        assert got(joined, add_special_tokens=False)["input_ids"] == want(joined, add_special_tokens=False)["input_ids"]
        assert got.pad_token_id == want.pad_token_id, folder
        if want.pad_token_id is None:
            continue  # transformers refuses to pad without a pad token
        a = want(texts[:6], padding="longest", truncation=True, max_length=128, return_tensors="np")
        b = got(texts[:6], padding="longest", truncation=True, max_length=128, return_tensors="np")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in a:
                np.testing.assert_array_equal(b[key], a[key])


def test_folders_it_does_not_handle_fall_back(tmp_path):
    from tests.calibration_builders import make_tokenizer

    folder = make_tokenizer(tmp_path / "t")
    assert tokenizer_file.load(folder) is not None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert tokenizer_file.load(folder) is None  # transformers rebuilds its post-processor from that
    (folder / "tokenizer_config.json").write_text("{not json")
    assert tokenizer_file.load(folder) is None
    assert tokenizer_file.load(tmp_path) is None  # no tokenizer.json


def test_the_model_specs_tokenize_without_importing_torch():
    code = ("import sys; from graphc.models import get_model_spec; spec = get_model_spec('minilm'); "
            "f = spec.feeds(['a first sentence', 'and a second one'], batch=2); "
            "print(f[0]['input_ids'].shape, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["False", "False"], out

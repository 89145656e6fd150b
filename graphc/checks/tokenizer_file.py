"""Texts to token ids from a folder's ``tokenizer.json`` with the ``tokenizers`` library alone.

transformers' ``AutoTokenizer`` reads the same file into the same Rust tokenizer, but importing
it imports PyTorch (transformers 5: ``configuration_utils`` → ``modeling_rope_utils`` → torch):
~3 s and ~0.3 GiB resident for the rest of a compress that only wanted token ids. What
transformers changes at load, done here too: the padding and truncation a ``tokenizer.json`` may
carry are switched off (MiniLM's pads every text to 128), and the pad token comes from
``tokenizer_config.json``. What is not redone here: transformers rewrites the post-processor of
some tokenizers from ``add_bos_token`` / ``add_eos_token`` in their config, so such folders (and
folders without ``tokenizer.json``) get ``None`` from :func:`load` and the caller falls back to
transformers. Tests compare the ids with transformers' on every tokenizer the project has.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# tokenizer_config.json keys with which transformers rebuilds the post-processor: not handled here
_REBUILT_BY_TRANSFORMERS = ("add_bos_token", "add_eos_token", "add_prefix_space")


class FileTokenizer:
    """The subset of a transformers tokenizer's call that graphc uses: ``tok(texts,
    add_special_tokens=, truncation=, max_length=, padding="longest", return_tensors="np")``
    → ``{"input_ids", "attention_mask", "token_type_ids"}``, and ``pad_token_id``."""

    def __init__(self, tokenizer: Any, pad_token_id: int | None, folder: Path) -> None:
        self._tok = tokenizer
        self.pad_token_id = pad_token_id
        self.name_or_path = str(folder)

    def __call__(self, texts: str | Sequence[str], *, add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, padding: bool | str = False,
                 return_tensors: str | None = None) -> dict[str, Any]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if truncation and max_length:
            self._tok.enable_truncation(int(max_length))
        else:
            self._tok.no_truncation()
        encodings = self._tok.encode_batch(batch, add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
               "attention_mask": [e.attention_mask for e in encodings]}
        if padding in (True, "longest"):
            width = max((len(ids) for ids in out["input_ids"]), default=0)
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            for key, fill in (("input_ids", pad), ("token_type_ids", 0), ("attention_mask", 0)):
                out[key] = [row + [fill] * (width - len(row)) for row in out[key]]
        elif padding:
            raise ValueError(f"padding={padding!r}: only 'longest' is supported")
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'np' is supported")
        return {k: v[0] for k, v in out.items()} if single else out


    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (the tokenizer's own decoder)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load(folder: str | Path) -> FileTokenizer | None:
    """The folder's tokenizer read without transformers, or None where this module does not
    give transformers' ids (see the module doc) or the ``tokenizers`` library is missing."""
    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or any(k in config for k in _REBUILT_BY_TRANSFORMERS):
            return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception:  # noqa: BLE001 - a file this library cannot read: let transformers say why
        return None
    tok.no_padding()
    tok.no_truncation()
    pad = config.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    pad_id = tok.token_to_id(pad) if isinstance(pad, str) else None
    return FileTokenizer(tok, pad_id, folder)

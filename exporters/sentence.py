"""sentence-transformers folders: the pooling (and normalization) their ``modules.json`` declares,
exported as a ``sentence_embedding`` output beside ``last_hidden_state``.

Pooling follows sentence-transformers' ``Pooling`` module: the modes switched on in
``1_Pooling/config.json`` (CLS token, max, mean, mean divided by sqrt(length), last token),
concatenated in its order; ``Normalize`` divides by the L2 norm. Modules this exporter cannot
reproduce (Dense, weighted mean, a transformer in a subfolder) are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphc.core.errors import ExportError

_ST = "sentence_transformers.models."
# sentence-transformers' concatenation order of the pooling modes
MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")
_UNSUPPORTED_MODES = ("weightedmean_tokens",)


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...]
    normalize: bool

    def describe(self) -> str:
        return f"{' + '.join(self.modes)} pooling{', L2-normalized' if self.normalize else ''} -> sentence_embedding"


def read_folder(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares; None for a plain HF folder."""
    from graphc.exporters.families import read_json

    path = folder / "modules.json"
    if not path.is_file():
        return None
    modules = read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ExportError("expected a list of modules", path=path)
    modes: tuple[str, ...] = ()
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        short = kind.removeprefix(_ST)
        sub = str(module.get("path", "") or "")
        if short == "Transformer":
            if sub not in ("", "."):
                raise ExportError(f"the transformer lives in {sub!r}: export that folder (its pooling is not exported)",
                                  path=path)
        elif short == "Pooling":
            modes = _modes(read_json(folder / sub / "config.json"), folder / sub / "config.json")
        elif short == "Normalize":
            normalize = True
        else:
            raise ExportError(f"module {kind!r} ({sub or 'root'}) is not supported; graphc exports Transformer, "
                              "Pooling and Normalize modules", path=path)
    if not modes:
        return None  # no pooling declared: the token embeddings are the output
    return Pooling(modes, normalize)


def _modes(config: Any, path: Path) -> tuple[str, ...]:
    if not isinstance(config, dict):
        raise ExportError("expected a JSON object", path=path)
    for mode in _UNSUPPORTED_MODES:
        if config.get(f"pooling_mode_{mode}"):
            raise ExportError(f"pooling mode {mode!r} is not supported; supported: {', '.join(MODES)}", path=path)
    modes = tuple(m for m in MODES if config.get(f"pooling_mode_{m}"))
    if not modes:
        raise ExportError(f"no pooling mode is switched on; supported: {', '.join(MODES)}", path=path)
    return modes


def wrap(model: Any, pooling: Pooling, token_type_ids: bool) -> Any:
    """``input_ids, attention_mask[, token_type_ids]`` -> ``(last_hidden_state, sentence_embedding)``."""
    return _wrapper()(model, pooling, token_type_ids).eval()


_CLASSES: list[type] = []


def _wrapper() -> type:
    if _CLASSES:
        return _CLASSES[0]
    import torch

    class SentenceEncoder(torch.nn.Module):
        scope_prefix = "model."

        def __init__(self, model: torch.nn.Module, pooling: Pooling, types: bool) -> None:
            super().__init__()
            self.model = model
            self.pooling = pooling
            self.types = types

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # noqa: ANN001, ANN201
            kwargs = {"token_type_ids": token_type_ids} if self.types else {}
            tokens = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            parts = [pool(mode, tokens, attention_mask) for mode in self.pooling.modes]
            embedding = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            if self.pooling.normalize:
                embedding = torch.nn.functional.normalize(embedding, p=2, dim=1)
            return tokens, embedding

    def pool(mode: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(tokens.dtype)
        if mode == "cls_token":
            return tokens[:, 0]
        if mode == "max_tokens":
            return torch.where(m > 0, tokens, torch.full_like(tokens, -1e9)).max(dim=1).values
        summed = (tokens * m).sum(dim=1)
        count = m.sum(dim=1)
        if mode == "mean_tokens":
            return summed / count.clamp(min=1e-9)
        if mode == "mean_sqrt_len_tokens":
            return summed / torch.sqrt(count.clamp(min=1e-9))
        # lasttoken: the last position the mask keeps (right or left padding)
        seq = mask.shape[1]
        values, flipped = mask.flip(1).max(dim=1)
        last = torch.where(values == 0, seq - 1, seq - 1 - flipped)
        return tokens[torch.arange(tokens.shape[0]), last]

    _CLASSES.append(SentenceEncoder)
    return SentenceEncoder

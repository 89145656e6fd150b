"""The model spec interface: how to load a supported model offline, feed it, and judge it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphc.core.arch import ArchFacts, hf_offline

__all__ = ["ArchFacts", "ModelSpec", "hf_offline"]


class ModelSpec:
    """One supported model. Subclasses live one per module in models/.

    Everything heavy (torch, transformers, model packages) is imported inside methods.
    """

    name: str = ""
    description: str = ""
    default_recipe: str = "int8"
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    # How much real data validation and calibration feed through ORT: texts, batch, feeds.
    # Large-vocabulary decoders keep these small (logits are batch x seq x vocab floats).
    validation_texts: int = 64
    validation_batch: int = 16
    validation_max_feeds: int = 4
    # Calibration may use more (GPTQ's Hessians want a few thousand tokens), up to these caps.
    calibration_max_texts: int = 256
    calibration_max_feeds: int = 16
    # the shape of a calibration feed: windows (0: validation_batch) of calibration_length tokens
    calibration_batch: int = 0
    calibration_length: int = 128

    def load_torch(self) -> Any:
        """The torch.nn.Module to export (wrapped so that it takes keyword inputs and
        returns a plain tensor or tuple), in eval mode."""
        raise NotImplementedError

    def arch_facts(self) -> ArchFacts:
        raise NotImplementedError

    def example_inputs(self, batch: int = 2, seq: int = 16) -> dict[str, Any]:
        """torch tensors for export tracing, keyed by input name."""
        raise NotImplementedError

    def eval_texts(self, count: int, *, split: str = "eval") -> list[str]:
        """Real text from an offline data package (split 'eval' or 'calibration' are disjoint)."""
        raise NotImplementedError

    def feeds(self, texts: Sequence[str], *, batch: int = 16, max_length: int = 128) -> list[dict[str, np.ndarray]]:
        """Tokenized ORT feeds (numpy int64) for the given texts, ``batch`` texts a feed."""
        raise NotImplementedError

    def task_metric(
        self,
        feeds: Sequence[Mapping[str, np.ndarray]],
        reference: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[Mapping[str, np.ndarray]],
    ) -> dict[str, Any] | None:
        """The model's real-task figure on validation: ``reference`` and ``outputs`` hold, per
        feed, the original and the rewritten model's outputs by name. A flat dict (it lands
        in the validation JSON under ``task``), or None when the recipe has no task metric."""
        return None

    # Extensions ------------------------------------------------------------------------
    def torch_outputs(self, feeds: Sequence[dict[str, np.ndarray]], module: Any = None) -> list[np.ndarray]:
        """The torch model's output on each feed (numpy), the fp32 reference for ORT.

        ``module`` defaults to a fresh ``load_torch()``; pass one to reuse it.
        """
        import torch

        module = self.load_torch() if module is None else module
        outs = []
        with torch.no_grad():
            for feed in feeds:
                kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items() if k in self.input_names}
                out = module(**kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                outs.append(out.detach().cpu().numpy())
        return outs

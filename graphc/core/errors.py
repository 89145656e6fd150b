"""Typed errors. Every error renders as one line that says where it happened.

The CLI prints ``str(error)`` and exits non-zero; library code raises, never prints.
"""

from __future__ import annotations

import os


class GraphcError(Exception):
    """Base of every error graphc raises on purpose.

    ``path`` names the file involved, ``pass_name`` the pipeline step and ``node`` the
    node, when known; ``str()`` puts them in front of the message, on one line.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        pass_name: str | None = None,
        node: str | None = None,
    ) -> None:
        self.message = " ".join(str(message).split())  # always one line
        self.path = os.fspath(path) if path is not None else None
        self.pass_name = pass_name
        self.node = node
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.pass_name:
            where.append(f"pass {self.pass_name}")
        if self.node:
            where.append(f"node {self.node}")
        return f"{': '.join(where)}: {self.message}" if where else self.message


class ModelLoadError(GraphcError):
    """The file is missing, unreadable, or not an ONNX model."""


class ExternalDataError(ModelLoadError):
    """External data is missing, truncated, or points outside the model's folder."""


class InvalidModelError(ModelLoadError):
    """The file is an ONNX model, but not a valid one (cycle, dangling input, unknown op...)."""


class SaveError(GraphcError):
    """The output could not be written (nothing is left half-written)."""


class RecipeError(GraphcError):
    """A recipe name or file is unknown or malformed."""


class PassError(GraphcError):
    """A pass failed; names the pass and, when known, the node."""


class PreconditionError(PassError):
    """A pass's requirements are not met by the model it was given."""


class UnsupportedError(GraphcError):
    """An option value graphc does not support (the message lists what is supported)."""


class InputsError(GraphcError):
    """A feed file (--inputs) or an --input-shape is unreadable or does not fit the model's inputs."""


class CalibrationDataError(InputsError):
    """User calibration data (--calibration-data, --tokenizer, --preprocess) is unreadable, too
    small, or does not fit the model (texts for an image model, no tokenizer, ...)."""


class ValidationError(GraphcError):
    """ONNX Runtime could not run the original or the rewritten model."""


class ToleranceError(GraphcError):
    """The rewritten model misses the recipe's tolerance; it was not written."""

    exit_code = 3


class ExportError(GraphcError):
    """A model could not be exported to ONNX."""


class MissingDependencyError(GraphcError):
    """An optional dependency (torch, transformers, a model package) is not installed."""


class DistributedError(GraphcError):
    """Work sent to other processes or machines (``--workers``, ``--ray``) failed: the cluster
    cannot be reached, or a work item failed on a worker after its retries (names the item)."""


class DiskSpaceError(GraphcError):
    """A temporary folder (spilled calibration sums, weights, activations) or the output needs
    more disk space than its file system has free. ``path`` names the folder."""

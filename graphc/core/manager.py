"""The pass manager: runs named steps, times them, records stats and size, calls instruments."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx_ir as ir

from graphc.core import freed
from graphc.core.pass_base import GraphcPass, PassResult


@dataclass
class SizeFacts:
    params: int
    bytes: int

    @classmethod
    def of(cls, model: ir.Model) -> SizeFacts:
        params = 0
        nbytes = 0
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            params += tensor.size
            nbytes += tensor.nbytes
        return cls(params, nbytes)


@dataclass
class PassRecord:
    """One step of a pipeline run, as it appears in reports and JSON."""

    name: str
    modified: bool = False
    skipped: bool = False
    wall_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "modified": self.modified,
            "wall_s": round(self.wall_s, 4),
            "stats": self.stats,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }
        if self.skipped:
            out["disabled"] = True
        if self.check is not None:
            out["check"] = self.check
        return out


class Instrument(Protocol):
    """Hooks around each pass (MLIR/TVM style). Both are optional no-ops by default."""

    def before_pass(self, pass_: GraphcPass, model: ir.Model) -> None: ...

    def after_pass(self, pass_: GraphcPass, model: ir.Model, record: PassRecord) -> None: ...


class PassManager:
    """Runs passes in order. Disabled names are recorded as skipped, not silently dropped."""

    def __init__(
        self,
        passes: Sequence[GraphcPass],
        *,
        instruments: Sequence[Instrument] = (),
        disabled: Sequence[str] = (),
    ) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.disabled = set(disabled)

    def run(self, model: ir.Model) -> list[PassRecord]:
        records: list[PassRecord] = []
        size = SizeFacts.of(model)
        for pass_ in self.passes:  # held-out feeds announced before the first sweep
            if pass_.context.moments is not None and pass_.name not in self.disabled:
                pass_.context.moments.prepare(pass_.context.calibration, [pass_.held_out_feeds])
        for pass_ in self.passes:
            moments = pass_.context.moments
            record = PassRecord(
                pass_.name,
                params_before=size.params,
                bytes_before=size.bytes,
                params_after=size.params,
                bytes_after=size.bytes,
            )
            if pass_.name in self.disabled:
                record.skipped = True
                records.append(record)
                continue
            for inst in self.instruments:
                hook = getattr(inst, "before_pass", None)
                if hook:
                    hook(pass_, model)
            start = time.perf_counter()
            result = pass_(model)
            freed.release(size.bytes)  # what the pass let go, back to the system before the next one
            record.wall_s = time.perf_counter() - start
            record.modified = result.modified
            if result.modified and not pass_.keeps_activations and moments is not None:
                moments.clear()
            if isinstance(result, PassResult):
                record.stats = result.stats.to_dict()
            size = SizeFacts.of(model)
            record.params_after, record.bytes_after = size.params, size.bytes
            for inst in self.instruments:
                hook = getattr(inst, "after_pass", None)
                if hook:
                    hook(pass_, model, record)
            records.append(record)
        return records

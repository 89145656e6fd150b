"""Base class of every graphc pass, on top of ``onnx_ir.passes``.

A pass is a class with a stable ``name``, a frozen ``Options`` dataclass, and a ``run``
method that edits the model in place and fills a :class:`PassStats`. ``call`` (what
``onnx_ir`` invokes) wraps ``run``: it times nothing (the manager does), marks every node
the pass created with the pass's name (node metadata ``graphc.pass``), and turns
unexpected exceptions into a :class:`~graphc.core.errors.PassError` naming the pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import GraphcError, PassError, PreconditionError


@dataclass(frozen=True)
class NoOptions:
    """For passes that take no options."""


@dataclass
class PassStats:
    """What a pass did, in numbers and reasons."""

    counts: dict[str, int | float] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # structured results beyond counts (e.g. a planner's per-layer choices): JSON-able values
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, amount: int | float = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"node": what, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        if self.skipped:
            out["skipped"] = list(self.skipped)
        if self.notes:
            out["notes"] = list(self.notes)
        out.update(self.details)
        return out


@dataclass
class PassResult(ir.passes.PassResult):
    stats: PassStats = field(default_factory=PassStats)


@dataclass
class PassContext:
    """What a pass may need beyond the model: calibration feeds, a seed, progress.

    ``calibration`` is a list of ORT feed dicts from the model spec's real data (or
    synthesized inputs for a bare .onnx); ``calibration_source`` says which. ``target`` is the
    CPU the model is compiled for (:mod:`graphc.target`; None: the machine graphc runs on):
    passes whose best or even correct formulation depends on it (int8 GEMMs) read it here.
    ``executor`` (:mod:`graphc.core.executor`) runs a pass's independent measurements, here or on
    Ray workers; results come back in input order, so the output does not depend on it.
    """

    calibration: Sequence[dict[str, Any]] | None = None
    calibration_source: str = "none"
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None
    target: Any = None  # graphc.target.TargetInfo, or None for the running machine
    # graphc.core.executor.Executor for a pass's independent work items (None: this process, in turn)
    executor: Any = None
    # graphc.core.moments.MomentsCache: MatMul input moments shared by the passes of one run
    # (None: each pass that needs them sweeps the calibration feeds itself)
    moments: Any = None

    def target_info(self):
        from graphc.core.target import resolve

        return resolve(self.target)

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)


class GraphcPass(ir.passes.InPlacePass):
    """A named, optioned, in-place rewrite."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Float types of the models the pass does its work on. On a model of another type the
    # pass leaves the nodes it cannot handle alone with a reason in its stats, or refuses with
    # a GraphcError; it never writes a broken model (tests/fuzz checks both, per pass).
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    # The calibration contract: a pass that reads ``context.calibration`` says so (a class
    # attribute, or a property when it depends on the options), and how many real texts it
    # wants (compress gathers the largest number any enabled pass asks for, at least 32).
    needs_calibration: bool = False
    calibration_texts: int = 0
    # Moments caching (graphc.core.moments): a pass that modifies the model but leaves every
    # activation equal (or updates the cache for the ones it changes) says so; the manager
    # empties the cache after any other pass that modified the model.
    keeps_activations: ClassVar[bool] = False
    # calibration feeds at the head of the list the pass will ask moments without (held out)
    held_out_feeds: int = 0
    # The pass sends independent work to ``context.executor`` (--workers/--ray have an effect)
    uses_executor: ClassVar[bool] = False

    def __init__(self, options: Any = None, context: PassContext | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self.context = context if context is not None else PassContext()

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None, context: PassContext | None = None) -> GraphcPass:
        """Build from recipe options, with a clear error for unknown or mistyped keys."""
        options = dict(options or {})
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise GraphcError(
                f"unknown option(s) {', '.join(unknown)}; {cls.name} accepts: "
                f"{', '.join(known) or 'no options'}",
                pass_name=cls.name,
            )
        from graphc.core.option_types import type_errors

        wrong = type_errors(cls.Options, options)
        if wrong:
            raise GraphcError("; ".join(wrong), pass_name=cls.name)
        try:
            opts = cls.Options(**options)
        except (TypeError, ValueError) as e:
            raise GraphcError(str(e), pass_name=cls.name) from None
        return cls(opts, context)

    def _validate(self) -> Any:
        """A pass with option values to check (not only their types) checks them here, raising
        a GraphcError, and calls it first thing in ``run``; what it returns is the pass's own."""
        return None

    def check_options(self) -> None:
        """Refuse bad option values now, before any work (``compress`` calls it for every step):
        without it a typo in a late pass's option would surface after the earlier passes'
        minutes. Option checks only: no model is read."""
        self._validate()

    # onnx_ir entry point -------------------------------------------------------------
    def call(self, model: ir.Model) -> PassResult:
        # Hold the nodes themselves, not their id()s: a node deleted by the pass frees its id
        # for a new node, which would then look old (and provenance would depend on memory).
        before = set(model.graph.all_nodes())
        stats = PassStats()
        try:
            modified = bool(self.run(model, stats))
        except GraphcError as e:
            if e.pass_name is None:
                e.pass_name = self.name
            raise
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen graph: name the pass
            raise PassError(f"{type(e).__name__}: {e}", pass_name=self.name) from e
        for node in model.graph.all_nodes():
            if node not in before:
                node.metadata_props.setdefault(ops.META_PASS, self.name)
        return PassResult(model, modified, stats)

    def requires(self, model: ir.Model) -> None:
        if not isinstance(model, ir.Model):
            raise PreconditionError("expects an onnx_ir.Model", pass_name=self.name)

    def run(self, model: ir.Model, stats: PassStats) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def choice(enum_cls: type, value: str, option: str, pass_name: str):
    """``enum_cls(value)``, or an UnsupportedError that lists the supported values."""
    from graphc.core.errors import UnsupportedError

    try:
        return enum_cls(value)
    except ValueError:
        supported = ", ".join(m.value for m in enum_cls)
        raise UnsupportedError(f"{option}={value!r}; supported: {supported}", pass_name=pass_name) from None


def copy_scope(src: ir.Node, dst: ir.Node) -> None:
    """Carry the source node's module scope (layer attribution) to a node that replaces it."""
    for key in ("graphc.scope", "namespace"):
        if key in src.metadata_props:
            dst.metadata_props[key] = src.metadata_props[key]

"""Export a model spec, a Hugging Face folder or a torch module to ONNX.

The dynamo exporter is tried first (dynamic batch and sequence axes); if it fails the legacy
TorchScript exporter is used and the result says so in ``notices``. The exported graph goes
through onnx_ir: node metadata is compacted to one ``graphc.scope`` key, graphc's metadata
(architecture facts, recipe, exporter) is written, and the file is saved atomically.
torch and transformers are imported only inside functions.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphc.core import ops
from graphc.core.errors import ExportError, GraphcError, MissingDependencyError
from graphc.exporters import metadata as meta
from graphc.core.arch import ArchFacts, hf_offline
from graphc.exporters.spec import ExportSpec, is_spec

if TYPE_CHECKING:
    import onnx_ir as ir
    import torch

    from graphc.exporters.parity import Parity

Progress = Callable[[str], None]

SCOPE_PREFIX = "model."  # the wrappers below hold the HF model as ``self.model``
LEGACY_DEFAULT_OPSET = 17
_QUIET_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "transformers")


@dataclass
class ExportResult:
    """What an export wrote and how."""

    path: Path
    exporter: str  # "dynamo" | "legacy"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    arch_facts: ArchFacts | None = None
    recipe: str | None = None
    notices: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    parity: Parity | None = None  # the exported graph vs PyTorch, when checked

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": os.fspath(self.path), "exporter": self.exporter, "inputs": list(self.input_names),
            "outputs": list(self.output_names), "seconds": round(self.seconds, 2),
            "bytes": sum(f.stat().st_size for f in self.files if f.is_file()),
            "arch": dict(self.arch_facts.__dict__) if self.arch_facts else None,
            "parity": self.parity.to_dict() if self.parity else None, "notices": list(self.notices),
        }


# --------------------------------------------------------------------------- dependencies


def require_torch() -> None:
    """Raise MissingDependencyError unless torch and transformers can be imported."""
    hf_offline()
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except ImportError:
            raise MissingDependencyError(
                f"{name} is not installed; exporting needs it: install graphc[export]"
            ) from None


# --------------------------------------------------------------------------- wrappers


def wrap_encoder(model: Any, *, token_type_ids: bool = True) -> torch.nn.Module:
    """Wrap an HF encoder: keyword inputs ``input_ids, attention_mask[, token_type_ids]``
    (int64) -> ``last_hidden_state``."""
    cls = _wrapper_classes()["encoder" if token_type_ids else "encoder2"]
    return cls(model).eval()


def wrap_causal_lm(model: Any) -> torch.nn.Module:
    """Wrap an HF causal LM: ``input_ids, attention_mask`` -> ``logits`` (no KV cache)."""
    return _wrapper_classes()["causal_lm"](model).eval()


_WRAPPERS: dict[str, type] = {}


def _wrapper_classes() -> dict[str, type]:
    if _WRAPPERS:
        return _WRAPPERS
    import torch

    class _Wrapper(torch.nn.Module):
        scope_prefix = SCOPE_PREFIX

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

    class EncoderWrapper(_Wrapper):
        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    class EncoderNoTypesWrapper(_Wrapper):
        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class CausalLMWrapper(_Wrapper):
        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    _WRAPPERS.update(encoder=EncoderWrapper, encoder2=EncoderNoTypesWrapper, causal_lm=CausalLMWrapper)
    return _WRAPPERS


def text_example_inputs(
    input_names: tuple[str, ...] | list[str], *, vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Random token ids, an all-ones mask and zero token types, as int64 torch tensors."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name in input_names:
        if name == "input_ids":
            out[name] = torch.randint(0, max(vocab_size, 2), (batch, seq), generator=gen, dtype=torch.int64)
        elif "mask" in name:
            out[name] = torch.ones(batch, seq, dtype=torch.int64)
        else:
            out[name] = torch.zeros(batch, seq, dtype=torch.int64)
    return out


# --------------------------------------------------------------------------- entry points


def export(
    source: str | os.PathLike | ExportSpec,
    out_path: str | os.PathLike,
    *,
    opset: int | None = None,
    batch: int = 2,
    seq: int = 16,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a model spec (``graphc.models.get_model_spec(name)``) or an HF model folder to
    ``out_path``. ``graphc.export`` also takes a spec's name."""
    require_torch()
    if is_spec(source):
        return _export_recipe(source, out_path, opset=opset, batch=batch, seq=seq, progress=progress)
    folder = Path(os.fspath(source))
    if folder.is_dir() and (folder / "config.json").is_file():
        return export_hf_folder(folder, out_path, opset=opset, batch=batch, seq=seq, progress=progress)
    raise ExportError("not a Hugging Face folder with config.json", path=os.fspath(source))


def _export_recipe(
    recipe: ExportSpec, out_path: str | os.PathLike, *, opset: int | None, batch: int, seq: int,
    progress: Progress | None,
) -> ExportResult:
    _say(progress, f"loading {recipe.name}")
    try:
        with quiet():
            module = recipe.load_torch()
            example = recipe.example_inputs(batch=batch, seq=seq)
            facts = recipe.arch_facts()
    except GraphcError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises assorted errors
        raise ExportError(f"cannot load the {recipe.name!r} model: {type(e).__name__}: {_first_line(e)}") from None
    from graphc.exporters import families
    from graphc.exporters.parity import check_parity

    p_batch, p_seq = batch + 1, max(seq // 2 + 1, 3)
    feeds = [{k: v.numpy() for k, v in recipe.example_inputs(batch=p_batch, seq=p_seq).items()}]

    def check(model: ir.Model) -> Parity:
        _say(progress, "checking parity with PyTorch")
        return check_parity(model, lambda feed: families.torch_outputs(module, feed), feeds,
                            what=f"a random feed of batch {p_batch} x sequence {p_seq}")

    return export_module(
        module, example, out_path, facts, output_names=recipe.output_names or None,
        recipe=recipe.name, opset=opset, progress=progress, check=check,
    )


def load_hf_folder(folder: str | os.PathLike) -> tuple[torch.nn.Module, tuple[str, ...], tuple[str, ...], ArchFacts]:
    """Load an HF folder as an export wrapper: (module, input names, output names, facts).

    The folder's ``model_type`` picks the family (graphc.exporters.families): causal LMs
    export logits, text encoders last_hidden_state (plus sentence_embedding for a
    sentence-transformers folder), vision models take pixel_values.
    """
    from graphc.exporters.families import plan_folder

    plan = plan_folder(folder)
    return plan.module, plan.input_names, plan.output_names, plan.facts


def export_hf_folder(
    folder: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    opset: int | None = None,
    batch: int = 2,
    seq: int = 16,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a Hugging Face model folder (config.json + weights), with its family's inputs and
    dynamic axes; parity with PyTorch is checked on other shapes before anything is written."""
    from graphc.exporters import families
    from graphc.exporters.parity import check_parity

    _say(progress, f"loading {folder}")
    plan = families.plan_folder(folder)
    example = families.example_inputs(plan, batch=batch, seq=seq)
    p_batch, p_seq = batch + 1, max(seq // 2 + 1, 3)
    feeds = [families.example_inputs(plan, batch=p_batch, seq=p_seq, seed=1 + i, padded=True, torch_tensors=False)
             for i in range(2)]
    shape = (f"batch {p_batch}" if plan.family.kind == families.VISION
             else f"batch {p_batch} x sequence {p_seq}, one padded row")

    def check(model: ir.Model) -> Parity:
        _say(progress, "checking parity with PyTorch")
        return check_parity(model, lambda feed: families.torch_outputs(plan.module, feed), feeds,
                            what=f"2 random feeds of {shape}")

    # the folder, so that compress --calibration-data finds the model's tokenizer (graphc.checks.text_data)
    metadata = {**plan.metadata, ops.META_SOURCE_FOLDER: os.fspath(Path(folder).resolve())}
    result = export_module(plan.module, example, out_path, plan.facts, output_names=plan.output_names,
                           opset=opset, dynamic_axes=plan.axes, progress=progress, check=check,
                           metadata=metadata)
    result.notices[:0] = list(plan.notices)
    return result


def export_module(
    module: torch.nn.Module,
    example_inputs: Mapping[str, Any],
    out_path: str | os.PathLike,
    arch_facts: ArchFacts | None = None,
    *,
    output_names: tuple[str, ...] | list[str] | None = None,
    recipe: str | None = None,
    opset: int | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    dynamo: bool = True,
    progress: Progress | None = None,
    check: Callable[[ir.Model], Parity] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ExportResult:
    """Export a torch module called with keyword ``example_inputs`` (torch tensors).

    ``dynamic_axes`` defaults to axis 0 = "batch" and axis 1 = "sequence" for every input.
    Node scopes lose the module's ``scope_prefix`` attribute (the wrappers' ``"model."``).
    ``dynamo=False`` goes straight to the legacy exporter. ``metadata``: more model metadata.
    ``check`` (parity with PyTorch) runs
    on the graph before anything is written; a miss raises ExportError and writes nothing.
    """
    require_torch()
    start = time.perf_counter()
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ExportError("output folder does not exist", path=out_path)
    module = module.eval()
    inputs = _signature_order(module, example_inputs)
    axes = dict(dynamic_axes) if dynamic_axes is not None else _default_axes(inputs)
    outputs = tuple(output_names) if output_names else None
    notices: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".graphc-export-", dir=out_path.parent) as tmp:
        model, exporter = None, "dynamo"
        if dynamo:
            _say(progress, "exporting with torch.onnx (dynamo)")
            try:
                model = _export_dynamo(module, inputs, axes, outputs, opset)
            except GraphcError:
                raise
            except Exception as e:  # noqa: BLE001 - torch.export raises many error types
                notices.append(
                    f"the dynamo exporter failed ({type(e).__name__}: {_first_line(e)}); "
                    "used the legacy TorchScript exporter"
                )
        if model is None:
            exporter = "legacy"
            _say(progress, "exporting with torch.onnx (legacy TorchScript)")
            try:
                model = _export_legacy(module, inputs, axes, outputs, opset, Path(tmp) / "legacy.onnx")
            except Exception as e:  # noqa: BLE001
                raise ExportError(
                    f"export failed: {'; '.join(notices)}; legacy: {type(e).__name__}: {_first_line(e)}"
                    if notices else f"legacy export failed: {type(e).__name__}: {_first_line(e)}",
                    path=out_path,
                ) from None
        parity = check(model) if check is not None else None
        if parity is not None and not parity.ok:
            raise ExportError(f"the exported graph does not match PyTorch: {parity.describe()}; nothing written",
                              path=out_path)
        _say(progress, f"writing {out_path}")
        meta.compact_node_metadata(model, strip_prefix=getattr(module, "scope_prefix", ""), all_nodes=True)
        meta.write_model_metadata(model, exporter=exporter, arch_facts=arch_facts, recipe=recipe)
        model.metadata_props.update(metadata or {})
        from graphc.core.io import save_model

        files = save_model(model, out_path)
    return ExportResult(
        path=out_path,
        exporter=exporter,
        input_names=tuple(v.name for v in model.graph.inputs),
        output_names=tuple(v.name for v in model.graph.outputs),
        arch_facts=arch_facts,
        recipe=recipe,
        notices=notices,
        files=files,
        seconds=time.perf_counter() - start,
        parity=parity,
    )


# --------------------------------------------------------------------------- internals


def _export_dynamo(
    module: torch.nn.Module, inputs: dict[str, Any], axes: dict[str, Mapping[int, str]],
    outputs: tuple[str, ...] | None, opset: int | None,
) -> ir.Model:
    import torch

    shapes = {name: dict(axes.get(name, {})) or None for name in inputs}
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            module, (), kwargs=inputs, dynamo=True, dynamic_shapes=shapes, output_names=outputs,
            opset_version=opset, verbose=False, optimize=True,
        )
    if program is None:  # pragma: no cover - dynamo always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model


def _export_legacy(
    module: torch.nn.Module, inputs: dict[str, Any], axes: dict[str, Mapping[int, str]],
    outputs: tuple[str, ...] | None, opset: int | None, tmp_file: Path,
) -> ir.Model:
    import onnx_ir as ir
    import torch

    with quiet(), torch.no_grad():
        dynamic = {k: dict(v) for k, v in axes.items()}
        if outputs:
            dynamic.update(_output_axes(module, inputs, axes, outputs))
        torch.onnx.export(
            module, (), str(tmp_file), kwargs=inputs, dynamo=False, input_names=list(inputs),
            output_names=list(outputs) if outputs else None, dynamic_axes=dynamic,
            opset_version=opset or LEGACY_DEFAULT_OPSET, verbose=False, do_constant_folding=True,
        )
    model = ir.load(tmp_file)
    # Pull external tensors (if any) into memory: the temporary folder goes away.
    for value in model.graph.initializers.values():
        if value.const_value is not None and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    return model


def _output_axes(
    module: torch.nn.Module, inputs: dict[str, Any], axes: dict[str, Mapping[int, str]], outputs: tuple[str, ...]
) -> dict[str, dict[int, str]]:
    """Name output axes after the input axes whose size they share (legacy exporter only)."""
    by_axis: dict[int, tuple[int, str]] = {}
    for name, value in inputs.items():
        for axis, label in axes.get(name, {}).items():
            by_axis.setdefault(axis, (int(value.shape[axis]), label))
    result = module(**inputs)
    values = result if isinstance(result, (tuple, list)) else (result,)
    named: dict[str, dict[int, str]] = {}
    for name, value in zip(outputs, values):
        shape = tuple(getattr(value, "shape", ()))
        named[name] = {i: by_axis[i][1] for i, d in enumerate(shape) if i in by_axis and by_axis[i][0] == d}
    return named


def _signature_order(module: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs in the order of ``module.forward``'s parameters (names unknown to it last)."""
    try:
        order = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        order = []
    known = [n for n in order if n in inputs]
    return {n: inputs[n] for n in known + [n for n in inputs if n not in known]}


def _default_axes(inputs: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name, value in inputs.items():
        rank = len(getattr(value, "shape", ()))
        axes[name] = {i: n for i, n in enumerate(("batch", "sequence")) if i < rank}
    return axes


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch/transformers: warnings, library loggers, and stray stdout/stderr prints."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = lines[0] if lines else type(error).__name__
    return text[:300]

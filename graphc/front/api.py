"""Python API, mirroring the CLI: compress, validate, inspect, export, passes and recipes."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphc.core import freed, io
from graphc.core.errors import GraphcError, MissingDependencyError, ModelLoadError, ToleranceError
from graphc.checks.instruments import DumpIR, NumericCheck
from graphc.core.interrupt import default_time_limit, time_limit
from graphc.core.outputs import plan_compress, plan_outputs
from graphc.core.signature import SignatureGuard, overridable_initializers
from graphc.checks.provenance import provenance
from graphc.core.manager import PassManager, PassRecord, SizeFacts
from graphc.core.moments import MomentsCache
from graphc.core.pass_base import PassContext
from graphc.core.recipes import Recipe, get_recipe
from graphc.checks.feeds import (  # noqa: F401 - VALIDATION_SAMPLES: part of the API
    VALIDATION_SAMPLES, calibration_context, task_metric_for, user_inputs, validation_feeds,
)
from graphc.core.registry import get_pass
from graphc.checks.calibration_data import check_options, load as load_calibration_data
from graphc.checks.validate import (ValidationReport, compare, first_nonfinite_text, model_outputs, nonfinite_text,
                                    tolerance_text)
from graphc.front.reports import report, write_compress_report  # noqa: F401 - report: part of the API

ModelLike = Any  # path, ir.Model, onnx.ModelProto or onnx_graphsurgeon.Graph



@dataclass
class CompressResult:
    model: ir.Model
    recipe: Recipe
    passes: list[PassRecord]
    validation: ValidationReport | None
    bytes_before: int
    bytes_after: int
    params_before: int
    params_after: int
    written: list[Path] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    attribution: Any = None  # graphc.checks.attribution.Attribution, when validation ran
    report_path: Path | None = None
    auto: dict[str, Any] | None = None  # --recipe auto: the candidates and why the winner won
    left_float: list[dict[str, Any]] = field(default_factory=list)  # graphc.core.leftover: float weights by op, why
    calibration: str | None = None  # where the passes' calibration data came from; None: no pass calibrates
    scratch: Any = None  # graphc.core.scratch.ScratchStore holding the model's large new weights (large models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "size_ratio": round(self.bytes_after / self.bytes_before, 4) if self.bytes_before else None,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "passes": [r.to_dict() for r in self.passes],
            "validation": self.validation.to_dict() if self.validation else None,
            "worst_layer": self.attribution.worst_layer if self.attribution else None,
            "attribution": self.attribution.to_dict() if self.attribution else None,
            "written": [str(p) for p in self.written],
            "report": str(self.report_path) if self.report_path else None,
            "notices": self.notices,
            "left_float": self.left_float,
            "calibration": self.calibration,
            **({"auto": self.auto} if self.auto is not None else {}),
        }

    def to_graphsurgeon(self):
        """The result as an onnx_graphsurgeon Graph (for TensorRT-style pipelines)."""
        gs = _import_graphsurgeon()
        return gs.import_onnx(ir.serde.serialize_model(self.model))


def _import_graphsurgeon():
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise MissingDependencyError("onnx-graphsurgeon is not installed (pip install graphc[interop])") from None
    return gs


def to_ir(model: ModelLike) -> tuple[ir.Model, Path | None]:
    """Any accepted model form → (IR model, its path when it came from a file)."""
    if isinstance(model, ir.Model):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        return io.load_model(model), Path(model)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), None
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        gs = _import_graphsurgeon()
        return ir.serde.deserialize_model(gs.export_onnx(model)), None
    raise ModelLoadError(f"cannot compress a {type(model).__name__}; pass a path, onnx_ir.Model, ModelProto or gs.Graph")


def _with_executor(run: Callable[..., CompressResult]) -> Callable[..., CompressResult]:
    """``compress``'s ``workers``/``ray``: an executor made for the call (and closed after it),
    or the caller's own ``executor``, left open."""

    @functools.wraps(run)
    def call(model: ModelLike, output: str | os.PathLike | None = None, *, workers: int | None = None,
             ray: str | None = None, executor: Any = None, **options: Any) -> CompressResult:
        from graphc.core.executor import make_executor

        if options.get("recipe") == "auto" and (workers is not None or ray or executor is not None):
            raise GraphcError("recipe auto does not send work to Ray workers yet: pick a recipe (e.g. int4) with "
                              "--workers/--ray")
        owned = make_executor(workers, ray) if executor is None else None
        try:
            return run(model, output, executor=executor or owned, **options)
        finally:
            if owned is not None:
                owned.close()

    return call


def _with_streaming(run: Callable[..., CompressResult]) -> Callable[..., CompressResult]:
    """``compress``'s ``stream``: whether its ONNX Runtime runs go segment by segment
    (graphc.core.streaming), for the whole call."""

    @functools.wraps(run)
    def call(*args: Any, stream: str | None = None, **options: Any) -> CompressResult:
        from graphc.core.streaming import streaming

        # None: the policy in force (``auto`` unless a caller set one)
        with contextlib.nullcontext() if stream is None else streaming(stream):
            return run(*args, **options)

    return call


@_with_streaming
@_with_executor
def compress(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    recipe: str | os.PathLike | Recipe = "int8",
    force: bool = False,
    disable: Sequence[str] = (),
    check_each_pass: bool = False,
    validate: bool = True,
    feeds: Sequence[dict] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    instruments: Sequence[Any] = (),
    dump_dir: str | os.PathLike | None = None,
    attribution: bool = True,
    report: str | os.PathLike | None = None,
    target: str | None = None,
    shape_hint: str | Sequence[int] | None = None,
    genai: bool = False,
    inputs: str | os.PathLike | None = None,
    input_shapes: Any = None,
    validate_timeout: float | None = None,
    calibration_data: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    preprocess: str | None = None,
    workers: int | None = None,  # these two are taken by _with_executor, which passes ``executor``
    ray: str | None = None,
    executor: Any = None,
    stream: str | None = None,  # taken by _with_streaming
) -> CompressResult:
    """Run a recipe on a model, validate it against the original, and write it.

    The result is written only if validation meets the recipe's tolerance (or ``force``);
    otherwise :class:`ToleranceError` is raised and no model is written (the ``report``, if
    asked for, still is: it is how one finds the layer that lost the accuracy).
    ``attribution``: also compare the two graphs tensor by tensor and name the worst layer.
    ``target``: the CPU the result is compiled for (``graphc.target``: ``auto``/None is this
    machine); it picks int8 formulations that are exact there and is written in the provenance.
    ``recipe="auto"``: the fastest of several recipes that meets its tolerance on the target,
    timed at ``shape_hint`` (batch × sequence, default 8x128; see graphc.auto).
    ``feeds`` or ``inputs`` (an .npz/.npy file or a folder, graphc.core.inputs): the user's inputs,
    for validation and calibration; ``input_shapes`` fixes dims of synthesized inputs.
    ``calibration_data``: a .txt or .jsonl file, a folder of them or of images (graphc.checks.calibration_data):
    every 4th item validates (with the task metric that fits the model), the rest calibrates;
    ``tokenizer`` (a folder) and ``preprocess`` (e.g. ``"size=224,mean=0.485,0.456,0.406"``) say
    how to read it. ``validate_timeout``: seconds each model's validation runs may take (default sized to
    the model, graphc.core.interrupt.default_time_limit); past it ONNX Runtime is stopped and
    :class:`graphc.core.interrupt.TimeLimitError` raised.
    ``workers``: a local Ray instance with that many CPUs runs the passes' independent work
    (mixed-precision's sensitivity probes, quantize-nbits' GPTQ, the planner's measurements); ``ray``: ``auto`` or the address of a
    running Ray cluster instead (graphc.core.ray_executor; the extra ``graphc[distributed]``);
    ``executor``: a ``graphc.core.executor`` object of one's own, left open. The written model is
    byte-identical with or without them. The cluster is reached before any work.
    ``stream``: ``auto`` (the default: models with over 1 GiB of weights), ``always`` or ``never``: calibration
    sweeps, the reference run and validation run the model segment by segment (cut between
    transformer blocks, ~256 MB of weights each), so that memory follows one segment, not the model.
    """
    from graphc.core.target import resolve

    target_info = resolve(target)
    check_options(calibration_data, inputs=inputs, feeds=feeds, tokenizer=tokenizer, preprocess=preprocess)
    if isinstance(recipe, str) and recipe == "auto":
        from graphc.front.auto import run_auto

        if not validate:
            raise GraphcError("recipe auto chooses among validated candidates: it cannot run with validation off")
        if inputs is not None:
            feeds = user_inputs(to_ir(model)[0], inputs)[0]
        return run_auto(model, output, target=target_info, shape_hint=shape_hint, feeds=feeds, force=force,
                        progress=progress, report=report, calibration_data=calibration_data, tokenizer=tokenizer,
                        preprocess=preprocess, genai=genai)
    recipe_obj = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    ir_model, src = to_ir(model)
    adapted = None
    if recipe_obj.decoder is not None:  # the recipe's form for the model's kind
        from graphc.checks.text_data import is_causal_lm

        if is_causal_lm(ir_model):
            recipe_obj, adapted = recipe_obj.for_model(causal_lm=True), "causal LM"
            if getattr(progress, "total", None) is not None:  # counted by the caller on the recipe as written
                progress.total = len(recipe_obj.steps)
    unknown = [d for d in disable if d not in recipe_obj.pass_names()]
    for d in unknown:
        get_pass(d)  # unknown names raise; known-but-absent are ignored with a notice
    # Every file this run writes, checked against the input's files and each other before any work
    # (a genai folder is checked as a folder: graphc.exporters.genai.output_folder)
    plan = plan_compress(src, None if genai else output, report=report, dump_dir=dump_dir,
                         input_bytes=io.tensor_bytes(ir_model),
                         pass_names=[s.pass_name for s in recipe_obj.steps if s.pass_name not in disable])
    report, forbid = plan.report, plan.forbid
    if genai:
        check_genai_output(ir_model, src, output)  # fail fast, before any work
    else:
        output = plan.output
    # A working copy; the caller's model (and its lazily read external data) stays untouched.
    work = ir.serde.deserialize_model(ir.serde.serialize_model(ir_model))
    if src is not None:
        io.set_base_dir(work, src.parent)
    before = SizeFacts.of(ir_model)
    notices = [f"--disable {d}: not in recipe {recipe_obj.name}" for d in disable if d in unknown]
    if adapted:
        notices.append(f"recipe {recipe_obj.name!r}: its {adapted} form ({recipe_obj.description})")
    from graphc.core.leftover import already_quantized

    held = already_quantized(ir_model)
    if held:
        notices.append(f"the model already holds quantized weights ({held}): kept as they are (a recipe plans "
                       "and quantizes float weights only)")
    from graphc.core import tempdirs

    swept = tempdirs.sweep_run(output)  # folders of runs on this host that were killed (SIGKILL, OOM)
    if swept.folders:
        notices.append(str(swept))

    feeds, input_source, shapes = user_inputs(ir_model, inputs, feeds, input_shapes)
    # one moments cache a run: the passes that read MatMul input moments share one sweep
    context = PassContext(progress=progress, target=target_info, executor=executor, moments=MomentsCache())
    passes = [get_pass(s.pass_name).from_dict(s.options, context) for s in recipe_obj.steps]
    for p in passes:  # every option value, before any pass runs
        if p.name not in disable:
            p.check_options()
    calibrated = [p for p in passes if p.needs_calibration and p.name not in disable]
    wanted = max([32, *(p.calibration_texts for p in calibrated)])
    data = None
    if calibration_data is not None:  # read and checked before any work; validation uses its held-out part
        data = load_calibration_data(ir_model, calibration_data, model_path=src, tokenizer=tokenizer,
                                     preprocess=preprocess, calibration_count=wanted if calibrated else 0)
        feeds, input_source = data.validation, data.validation_source
        if not calibrated:
            notices.append(f"--calibration-data: no pass of recipe {recipe_obj.name!r} calibrates; only its held-out "
                           "part was used (validation)")
    user_feeds = feeds
    reference = None
    limit = validate_timeout if validate_timeout is not None else default_time_limit(io.tensor_bytes(ir_model))
    if validate or check_each_pass:
        if feeds is None:
            try:
                feeds, input_source = validation_feeds(ir_model, shapes=shapes, model_path=src)
            except GraphcError as e:  # e.g. an input too large to synthesize: name the model
                if e.path is None and src is not None:
                    e.path = os.fspath(src)
                raise
        with time_limit(limit, "validation of the original model"):
            reference = model_outputs(ir_model, feeds, "original model")[1]
    from graphc.checks.target_checks import target_notices, validation_model

    notices += target_notices(target_info, validate)
    if executor is not None and not any(p.uses_executor for p in passes if p.name not in disable):
        notices.append(f"--workers/--ray: no pass of recipe {recipe_obj.name!r} sends work to workers")
    if calibrated:
        if data is not None:
            context.calibration, context.calibration_source = data.calibration, data.calibration_source
        elif user_feeds is not None:
            context.calibration, context.calibration_source = user_feeds, input_source
        else:
            calib = calibration_context(ir_model, wanted, shapes, model_path=src)
            context.calibration, context.calibration_source = calib.calibration, calib.calibration_source
    all_instruments = [*instruments, *([NumericCheck(feeds, reference)] if check_each_pass else [])]
    if dump_dir is not None:
        all_instruments.append(DumpIR(dump_dir, forbid=forbid))
    # the guard first: it restores the input/output names a pass changed before anything looks at the model
    from graphc.core import scratch, streaming

    # a model that streams keeps the large float weights the passes make in a temporary file
    store = scratch.ScratchStore() if streaming.applies(ir_model) else None
    if store is not None:
        why = ("--stream always" if streaming.policy().mode == "always"
               else f"{io.tensor_bytes(ir_model) / 2**30:.2f} GiB of weights (--stream never: one session)")
        notices.append(f"{why}: calibration, probes, the reference and validation run the model segment by segment "
                       f"(~{streaming.policy().segment_bytes >> 20} MB of weights each)")
    with overridable_initializers(work, notices), scratch.scratch_weights(store):
        guard = SignatureGuard(work)
        records = PassManager(passes, instruments=[guard, *all_instruments], disabled=disable).run(work)
    context.moments = None  # its sums can take a few hundred MB
    after = SizeFacts.of(work)
    freed.release(max(before.bytes, after.bytes))

    checked = None
    if validate:
        tol = recipe_obj.tolerance
        with time_limit(limit, "validation of the compressed model"):
            checked = compare(None, validation_model(work, notices), feeds, input_source=input_source,
                              reference_outputs=reference,
                              task=data.task if data is not None else task_metric_for(ir_model, input_source))
        checked.min_cosine_required = tol.min_row_cosine
        checked.max_abs_allowed = tol.max_abs
        checked.max_rel_allowed = tol.max_rel
        checked.min_output_cosine_required = tol.min_cosine
        if checked.nonfinite_outputs:
            checked.first_nonfinite = first_nonfinite_text(work, feeds, ir_model)
        checked.max_ppl_rise_allowed = tol.max_ppl_rise
        checked.min_task_cosine_required = tol.min_task_cosine
        checked.min_top1_required = tol.min_top1
        if tol.max_ppl_rise is not None and checked.ppl_rise is None:
            notices.append(f"max_ppl_rise {tol.max_ppl_rise:g} not checked: no perplexity was measured (validation "
                           f"inputs: {input_source}; perplexity needs a causal LM exported by graphc)")
    for record in records:  # what a pass wants said on the terminal, not only in --json
        notices += [f"{record.name}: {n}" for n in (record.stats or {}).get("notices", [])]
    result = CompressResult(work, recipe_obj, records, checked, before.bytes, after.bytes, before.params, after.params, notices=notices)
    result.scratch = store  # the model's weights that live in its temporary file: kept while the result lives
    result.calibration = context.calibration_source if calibrated else None
    from graphc.core.leftover import left_in_float

    result.left_float = [e.to_dict() for e in left_in_float(work, records)]
    if checked is not None and attribution:
        from graphc.checks.attribution import attribute

        # two feeds and a bounded tensor count keep this cheap next to validation itself
        result.attribution = attribute(ir_model, work, feeds[:2], max_tensors=200)
    work.metadata_props.update(provenance(recipe_obj, records, checked, ir_model, src, target_info))
    if result.calibration is not None:  # where the result's calibration statistics came from
        work.metadata_props["graphc.calibration"] = result.calibration
    if report is not None:
        result.report_path = write_compress_report(result, ir_model, src, output, feeds, report)
    if checked is not None and checked.nonfinite_outputs and not force:
        raise ToleranceError(nonfinite_text(checked) + "; nothing written (use --force to write anyway)", path=output)
    if checked is not None and not checked.passed and not force:
        raise ToleranceError(
            f"result misses recipe {recipe_obj.name!r} tolerance ({tolerance_text(checked, recipe_obj.tolerance)}); "
            "nothing written (use --force to write anyway)",
            path=output,
        )
    if output is not None and genai:
        write_genai_output(result, work, ir_model, src, output)
        if src is not None:
            result.bytes_before = io.file_bytes(src)
    elif output is not None:
        result.written = io.save_model(work, output, forbid=forbid)
        result.bytes_after = sum(p.stat().st_size for p in result.written)
        if src is not None:
            result.bytes_before = io.file_bytes(src)
    if result.bytes_after >= result.bytes_before:
        result.notices.append(f"the result is not smaller than the original ({result.bytes_before:,} → "
                              f"{result.bytes_after:,} bytes): recipe {recipe_obj.name!r} shrank nothing here"
                              + (" (see: left in float)" if result.left_float else ""))
    return result


def check_genai_output(ir_model: ir.Model, src: Path | None, output: Any) -> None:
    """Before any work: the model is a KV-cache decoder genai can serve, and ``output`` (when
    given) a folder that may be written."""
    from graphc.exporters.genai import check_decoder, output_folder

    check_decoder(ir_model, src or "model")
    if output is not None:
        output_folder(output)


def write_genai_output(result: CompressResult, model: ir.Model, ir_model: ir.Model, src: Path | None,
                       output: Any) -> None:
    """``model`` (the compressed graph) written as the genai folder ``output``, with the tokenizer
    files of the original ``ir_model``; ``result.written`` and ``bytes_after`` (its ONNX files) set."""
    from graphc.exporters.genai import tokenizer_source, write_folder
    from graphc.models import hf_folder_of

    result.written = write_folder(model, Path(output), source=tokenizer_source(ir_model, src, hf_folder_of(ir_model)),
                                  notices=result.notices)
    result.bytes_after = sum(p.stat().st_size for p in result.written if p.suffix in (".onnx", ".data"))


def validate(original: ModelLike, rewritten: ModelLike, *, feeds: Sequence[dict] | None = None,
             inputs: str | os.PathLike | None = None, input_shapes: Any = None,
             timeout: float | None = None, calibration_data: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, preprocess: str | None = None) -> ValidationReport:
    """Compare two models with ONNX Runtime on the user's inputs (``feeds``, or the ``inputs``
    file), or the held-out part of ``calibration_data`` (the same items compress validated on),
    else on real texts of a model spec or inputs synthesized (``input_shapes``).
    ``timeout``: seconds the ORT runs may take (default sized to the larger model)."""
    check_options(calibration_data, inputs=inputs, feeds=feeds, tokenizer=tokenizer, preprocess=preprocess)
    orig, orig_path = to_ir(original)
    rew, _ = to_ir(rewritten)
    feeds, source, shapes = user_inputs(orig, inputs, feeds, input_shapes)
    task = None
    if calibration_data is not None:
        data = load_calibration_data(orig, calibration_data, model_path=orig_path, tokenizer=tokenizer,
                                     preprocess=preprocess, calibration_count=0)
        feeds, source, task = data.validation, data.validation_source, data.task
    elif feeds is None:
        feeds, source = validation_feeds(orig, shapes=shapes, model_path=orig_path)
    if timeout is None:
        timeout = 2 * default_time_limit(max(io.tensor_bytes(orig), io.tensor_bytes(rew)))
    with time_limit(timeout, "validation"):
        report = compare(orig, rew, feeds, input_source=source, task=task or task_metric_for(orig, source))
    from graphc.checks.target_checks import target_check_notices

    report.notices.extend(target_check_notices(rew))
    return report


def export(source: Any, output: str | os.PathLike, **kwargs: Any):
    """Export a models/ spec name, an HF folder, or (via graphc.exporters) a torch module.
    ``kv_cache=True``: a causal LM with past/present key-value inputs and outputs
    (graphc.exporters.decoder), for generation with graphc.front.generate."""
    genai = kwargs.pop("genai", False)
    kv_cache = kwargs.pop("kv_cache", False)
    if genai and not kv_cache:
        raise GraphcError("--genai writes an onnxruntime-genai folder for a causal LM with its KV cache: add --kv-cache")
    try:
        if kv_cache:
            from graphc.exporters.decoder import export_decoder as _export
        else:
            from graphc.exporters import export as _export
    except ImportError as e:
        raise MissingDependencyError(f"export needs the export extra (pip install graphc[export]): {e}") from None
    from graphc.models import resolve_source

    source = resolve_source(source)
    if genai:
        from graphc.exporters.genai import export_folder

        return export_folder(source, output, _export, **kwargs)
    return _export(source, output, **kwargs)

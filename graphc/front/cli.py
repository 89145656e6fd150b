"""The ``graphc`` command. Thin: parses arguments, calls the API, prints.

Every command takes ``--json`` (before or after the command: one JSON object on stdout, on
failure too). Errors print one line on stderr and exit non-zero (exit codes: ``cli_help``).
Set GRAPHC_DEBUG=1 to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from graphc.front.cli_text import (
    auto_text, field, fmt_bytes, gate_text, plan_text, printable, short, task_text,
)
from graphc.front.cli_options import positive_int
from graphc.core.errors import GraphcError


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")  # JSON escapes control characters itself
    else:
        sys.stdout.write(printable(text.rstrip()) + "\n")


# ------------------------------------------------------------------------- commands


def cmd_passes(args: argparse.Namespace) -> int:
    from graphc.core.recipes import list_recipes
    from graphc.core.registry import all_passes

    passes = all_passes()
    recipes = list_recipes()
    lines = ["passes:"] + [f"  {name:20s} {cls.summary}" for name, cls in passes.items()]
    lines += ["recipes:"]
    for r in recipes:
        lines.append(f"  {r.name:20s} {r.description} [{' → '.join(r.pass_names())}]")
        if r.decoder is not None:
            lines.append(f"  {'':20s} on a causal LM: {r.decoder.description} [{' → '.join(r.decoder.pass_names())}]")
    data = {
        "passes": [{"name": n, "summary": c.summary} for n, c in passes.items()],
        "recipes": [r.to_dict() for r in recipes],
    }
    _emit(args, data, "\n".join(lines))
    return 0


def _status(args: argparse.Namespace, message: str):
    """A rich spinner on stderr for interactive use; a no-op context otherwise."""
    import contextlib

    if args.json or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from rich.console import Console

    return Console(stderr=True).status(message)


def cmd_compress(args: argparse.Namespace) -> int:
    from graphc.front.api import compress
    from graphc.front.cli_options import compress_recipe
    from graphc.core.progress import make_progress

    recipe, notices = compress_recipe(args)
    steps = None if isinstance(recipe, str) else len(recipe.steps)
    progress = make_progress(args.progress, as_json=args.json, total_passes=steps)
    try:
        result = compress(
            args.model,
            args.output,
            recipe=recipe,
            force=args.force,
            disable=args.disable or (),
            check_each_pass=args.check_each_pass,
            progress=progress,
            instruments=[progress] if progress is not None else [],
            dump_dir=args.dump_dir,
            report=args.report,
            validate=not args.no_validate,
            target=args.target,
            shape_hint=args.shape_hint,
            genai=args.genai,
            inputs=args.inputs,
            input_shapes=args.input_shape,
            validate_timeout=args.validate_timeout,
            calibration_data=args.calibration_data, tokenizer=args.tokenizer, preprocess=args.preprocess,
            workers=args.workers,
            ray=args.ray,
            stream=args.stream,
        )
    finally:
        if progress is not None:
            progress.close()
    result.notices[:0] = notices
    data = result.to_dict()
    target = json.loads(result.model.metadata_props.get("graphc.target", "{}"))
    forms = f", int8 {'/'.join(target['int8_forms'])}" if target.get("int8_forms") else ""
    written = result.written[0] if result.written else args.output
    lines = [f"recipe {result.recipe.name}: {args.model} → {written} (target {target.get('target', '?')}{forms})"]
    lines.append(f"  {'pass':20s} {'time':>8s}  {'bytes after':>12s}  stats")
    for r in result.passes:
        if r.skipped:
            lines.append(f"  {r.name:20s} {'disabled':>8s}")
            continue
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items()
                          if k not in ("skipped", "notes") and not isinstance(v, (dict, list)))
        if r.stats.get("skipped"):
            stats += f"{', ' if stats else ''}skipped={len(r.stats['skipped'])}"
        check = f"  [cos {r.check['min_cosine']:.5f}]" if r.check else ""
        lines.append(f"  {r.name:20s} {r.wall_s:7.2f}s  {fmt_bytes(r.bytes_after):>12s}  {stats or '-'}{check}")
    for r in result.passes:
        if isinstance(r.stats.get("plan"), dict):
            lines.append(plan_text(r.stats["plan"]))
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 0
    lines.append(f"size: {fmt_bytes(result.bytes_before)} → {fmt_bytes(result.bytes_after)} ({ratio:.1%})")
    if result.left_float:
        from graphc.core.leftover import Leftover, summary_lines

        lines.append("left in float:")
        lines += summary_lines([Leftover(**e) for e in result.left_float], fmt_bytes)
    lines.append(f"calibration: {result.calibration or 'none (no pass of this recipe calibrates)'}")
    v = result.validation
    if v is not None:
        lines.append(
            f"validation ({v.samples} feeds, {v.input_source}): output cosine {v.output_cosine:.5f}, "
            f"worst row cosine {v.min_cosine:.5f}, max abs {v.max_abs:.4g} → {'PASS' if v.passed else 'FAIL (forced)'}"
            + gate_text(v)
        )
        if v.task:
            lines.append("task: " + task_text(v.task))
    else:
        lines.append("validation: skipped (--no-validate): the result was not compared with the original")
    if result.attribution is not None:
        lines.append(result.attribution.summary())
    if result.report_path is not None:
        lines.append(f"report: {result.report_path}")
    if result.auto is not None:
        lines.append(auto_text(result.auto))
    for n in result.notices:
        lines.append(f"notice: {n}")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from graphc.front.api import report

    with _status(args, "graphc: comparing models"):
        path = report(args.original, args.rewritten, args.output, latency=not args.no_latency)
    _emit(args, {"report": str(path)}, f"report: {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from graphc.front.api import validate

    report = validate(args.original, args.rewritten, inputs=args.inputs, input_shapes=args.input_shape,
                      timeout=args.validate_timeout, calibration_data=args.calibration_data,
                      tokenizer=args.tokenizer, preprocess=args.preprocess)
    if args.min_cosine is not None:
        report.min_output_cosine_required = args.min_cosine
    lines = [f"validation ({report.samples} feeds, {report.input_source}):"]
    for o in report.outputs:
        lines.append(
            f"  {o.name}: cosine {o.cosine:.6f}, worst row {o.min_row_cosine:.6f}, "
            f"max abs {o.max_abs:.4g}, mean abs {o.mean_abs:.4g}, rel {o.rel_max:.4g}"
            + (f", NaN/inf where the other has a number at {o.nonfinite} places" if o.nonfinite else "")
        )
    if report.task:
        lines.append("  task: " + task_text(report.task))
    lines += [f"notice: {n}" for n in report.notices]
    _emit(args, report.to_dict(), "\n".join(lines))
    return 0 if report.passed else 3


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphc.core import io
    from graphc.checks.inspection import diff, inspect_model

    info = inspect_model(io.load_model(args.model))
    if args.diff:
        other = inspect_model(io.load_model(args.diff))
        d = diff(info, other)
        lines = [
            f"{args.model} → {args.diff}",
            f"nodes {d['nodes_before']} → {d['nodes_after']}, params {d['params_before']:,} → {d['params_after']:,}, "
            f"bytes {fmt_bytes(d['bytes_before'])} → {fmt_bytes(d['bytes_after'])}",
            "ops changed:",
        ]
        lines += [f"  {k:40s} {v['before']:5d} → {v['after']:5d}" for k, v in d["ops_changed"].items()]
        lines.append("layers:")
        lines += [
            f"  {x['layer']:12s} params {x['params_before']:>12,} → {x['params_after']:>12,}  "
            f"bytes {fmt_bytes(x['bytes_before']):>10s} → {fmt_bytes(x['bytes_after']):>10s}"
            for x in d["layers"]
        ]
        if d["new_nodes_by_pass"]:
            lines.append("nodes made by pass: " + ", ".join(f"{k} {v}" for k, v in d["new_nodes_by_pass"].items()))
        _emit(args, {"model": args.model, "other": args.diff, **d}, "\n".join(lines))
        return 0
    lines = [
        f"{args.model}: {info.nodes} nodes, {info.params:,} params, {fmt_bytes(info.bytes)} of weights",
        "inputs:  " + ", ".join(f"{field(i['name'])} {i['dtype']} {i['shape']}" for i in info.inputs),
        "outputs: " + ", ".join(f"{field(i['name'])} {i['dtype']} {i['shape']}" for i in info.outputs),
        "ops:",
    ]
    lines += [f"  {k:40s} {v:5d}" for k, v in info.op_counts.items()]
    lines.append("weights by op:")
    lines += [f"  {k:40s} {v['params']:>12,} params {fmt_bytes(v['bytes']):>10s}" for k, v in info.by_op.items()]
    lines.append("by layer:")
    lines += [
        f"  {k:12s} {v['nodes']:5d} nodes {v['params']:>12,} params {fmt_bytes(v['bytes']):>10s}"
        for k, v in info.by_layer.items()
    ]
    if info.provenance:
        lines.append("provenance:")
        for k, v in info.provenance.items():
            text = json.dumps(v) if not isinstance(v, str) else v
            lines.append(f"  {field(k)} = {field(text[:160])}")
    other = {k: v for k, v in info.metadata.items() if k not in info.provenance}
    if other:
        lines.append("metadata:")
        lines += [f"  {field(k)} = {short(v)}" for k, v in other.items()]
    _emit(args, {"model": args.model, **info.to_dict()}, "\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from graphc.front.api import export

    with _status(args, f"graphc: exporting {args.source}"):
        result = export(args.source, args.output, kv_cache=args.kv_cache, genai=args.genai)
    data = result.to_dict() if hasattr(result, "to_dict") else {"output": args.output}
    lines = [f"exported {args.source} → {args.output}"]
    for key in ("exporter", "seconds", "bytes"):
        if key in data:
            lines.append(f"  {key}: {data[key]}")
    if data.get("parity"):
        p = data["parity"]
        lines.append(f"  parity with PyTorch: max abs {p['max_abs']:.3g}, cosine {p['cosine']:.7f} ({p['feeds']})")
    for n in data.get("notices", []):
        lines.append(f"notice: {n}")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from graphc.front.generate import generate

    if (args.prompt is None) == (args.ids is None):
        raise GraphcError("give the prompt as --prompt TEXT or as --ids 1,2,3 (one of them)")
    prompt: str | list[int] = args.prompt
    if args.ids is not None:
        try:
            prompt = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise GraphcError(f"--ids {args.ids!r}: token ids separated by commas") from None
    result = generate(args.model, prompt, args.max_new_tokens, threads=args.threads, stop_at_eos=not args.no_stop,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      repetition_penalty=args.repetition_penalty, min_p=args.min_p)
    text = result.text if result.text is not None else " ".join(map(str, result.tokens))
    s = result.sampling
    sampled = (f"; sampled: temperature {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}, min-p {s.min_p:g}, "
               f"seed {s.seed}" if s else "")
    summary = (f"({len(result.tokens)} tokens, prefill {result.prefill_ms:.0f} ms, decode "
               f"{result.decode_tokens_per_s:.1f} tokens/s, {'shared' if result.shared_buffers else 'separate'} "
               f"cache buffers{sampled})")
    if not args.json:
        sys.stderr.write(summary + "\n")
    _emit(args, result.to_dict(), text)
    return 0


# ------------------------------------------------------------------------- parser


class _UsageError(Exception):
    """argparse's complaint, turned into one line and exit 2 by :func:`main`."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (main prints it, as JSON too)
        raise _UsageError(message)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _add_timeout(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--validate-timeout", type=_seconds, default=None, metavar="SECONDS",
                    help="stop ONNX Runtime and fail when a model's validation runs take longer (default: "
                         "5 min + 1 min per 100 MB of weights)")


def build_parser() -> argparse.ArgumentParser:
    from graphc.front import cli_help

    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="graphc", description="ONNX compression compiler for transformer models",
                epilog=cli_help.epilog(), formatter_class=raw)
    cli_help.add_version_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (errors too)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def add(name: str, help_: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=epilog or cli_help.exit_codes(),
                            formatter_class=raw)
        # SUPPRESS: not given after the command, the value given before it (or False) stays
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object on stdout (errors too)")
        return sp

    sp = add("export", "export a models/ spec (minilm, smollm2) or an HF model folder to ONNX")
    sp.add_argument("source", help="a models/ spec name (minilm, smollm2) or a Hugging Face model folder")
    sp.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    sp.add_argument("--kv-cache", action="store_true",
                    help="causal LMs: past_key_values.* inputs and present.* outputs, for prefill and decode")
    sp.add_argument("--genai", action="store_true",
                    help="with --kv-cache: -o is a folder onnxruntime-genai loads (model.onnx, genai_config.json, "
                         "tokenizer files); checked with og.Model when onnxruntime-genai is installed")
    sp.set_defaults(func=cmd_export)

    sp = add("compress", "run a recipe, validate against the original, write the result", cli_help.epilog())
    sp.add_argument("model", help="the .onnx model to compress (external data beside it is read too)")
    sp.add_argument("-o", "--output", required=True,
                    help="the .onnx file to write (only if validation passes); DIR/ (or an existing folder) writes "
                         "DIR/<model's file name>; missing folders are created; never one of the input's files")
    sp.add_argument("--recipe", default=None,
                    help="a recipe name (listed below), auto (the fastest recipe that meets its tolerance on the "
                         "target, timed here), or a .toml file (default int8; plan when a budget flag is given)")
    sp.add_argument("--set", action="append", metavar="PASS.OPTION=VALUE",
                    help="change one option of the recipe's PASS steps, VALUE read as TOML (repeatable), "
                         "e.g. quantize-int8.per_channel=false")
    sp.add_argument("--min-cosine", type=float, metavar="C",
                    help="validation: every output's cosine to the original at least C (replaces the recipe's)")
    sp.add_argument("--max-error", type=float, metavar="E",
                    help="plan: mean output 1 - cosine on calibration data at most E (e.g. 0.01)")
    sp.add_argument("--max-bytes", type=int, metavar="N", help="plan: weights of at most N bytes")
    sp.add_argument("--max-flops", type=float, metavar="F",
                    help="plan: MACs per token at most F of the original's (latency proxy, e.g. 0.7)")
    sp.add_argument("--max-params", type=int, metavar="N", help="plan: at most N parameters")
    sp.add_argument("--max-ppl-rise", type=float, metavar="R",
                    help="causal LMs: perplexity on the validation texts may rise at most R (e.g. 0.05; exit 3 "
                         "otherwise); where a plan step runs (no --recipe, or a recipe with one) also its budget: "
                         "mean next-token KL at most ln(1 + R) on calibration text")
    sp.add_argument("--int4", action="store_true",
                    help="plan: linear layers and tables may also be 4-bit (MatMulNBits / GatherBlockQuantized)")
    sp.add_argument("--target", default="auto", metavar="CPU",
                    help="CPU the result will run on: auto (this machine), x86-avx2, x86-avx512, x86-avx512-vnni, "
                         "x86-avx-vnni, arm64; picks int8 formulations that are exact there (AVX2's u8×s8 kernel saturates)")
    sp.add_argument("--genai", action="store_true",
                    help="KV-cache decoders: -o is an onnxruntime-genai folder (model.onnx, genai_config.json, tokenizer)")
    sp.add_argument("--shape-hint", default=None, metavar="BxS",
                    help="recipe auto: batch x sequence to time the candidates at (default 8x128; a KV-cache "
                         "decoder: one decode step after a past of that length)")
    _add_input_args(sp)
    sp.add_argument("--force", action="store_true", help="write even if validation misses the tolerance")
    sp.add_argument("--disable", action="append", metavar="PASS", help="skip a pass by name (repeatable)")
    sp.add_argument("--check-each-pass", action="store_true", help="compare with the original after every pass")
    sp.add_argument("--dump-dir", metavar="DIR", help="write the model after each pass that changed it (NN-pass.onnx); "
                    "new files only: a name that exists is refused before any work")
    sp.add_argument("--report", metavar="HTML", help="write a self-contained HTML report (written even if validation fails)")
    sp.add_argument("--progress", action="store_true", default=None,
                    help="progress on stderr: a bar on a terminal (the default there), plain lines every few "
                         "seconds elsewhere (logs), JSON lines with --json")
    sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    sp.add_argument("--no-validate", action="store_true",
                    help="skip validation (it runs the original and the result in ONNX Runtime; large models "
                         "segment by segment, see --stream). Nothing is checked.")
    sp.add_argument("--stream", choices=("auto", "always", "never"), default="auto",
                    help="run calibration, the reference and validation segment by segment (cut between "
                         "transformer blocks, ~256 MB of weights each) so that memory follows one segment: "
                         "auto (the default) for models with over 1 GiB of weights")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, metavar="N", help="run the calibrating work (sensitivity "
                       "probes, GPTQ, plan actions) on a local Ray instance with N CPUs (pip install "
                       "graphc[distributed]); same output bytes")
    where.add_argument("--ray", metavar="ADDRESS", help="... on a running Ray cluster: auto, HOST:PORT or ray://HOST:PORT")
    _add_timeout(sp)
    sp.set_defaults(func=cmd_compress)

    sp = add("validate", "compare a rewritten model with the original in ONNX Runtime")
    sp.add_argument("original", help="the reference .onnx model")
    sp.add_argument("rewritten", help="the .onnx model to compare with it")
    sp.add_argument("--min-cosine", type=float, default=None, help="exit 3 if an output's cosine is below this")
    _add_input_args(sp)
    _add_timeout(sp)
    sp.set_defaults(func=cmd_validate)

    sp = add("inspect", "ops, parameters and bytes by op type and layer; --diff for what changed")
    sp.add_argument("model", help="the .onnx model to describe")
    sp.add_argument("--diff", metavar="OTHER", help="a second model: what changed from MODEL to OTHER")
    sp.set_defaults(func=cmd_inspect)

    sp = add("report", "HTML report comparing an original and a rewritten model (sizes, per-layer error, latency)")
    sp.add_argument("original", help="the reference .onnx model")
    sp.add_argument("rewritten", help="the compressed .onnx model")
    sp.add_argument("-o", "--output", required=True, metavar="HTML", help="the HTML file to write")
    sp.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    sp.set_defaults(func=cmd_report)

    sp = add("generate", "greedy or sampled tokens from a KV-cache decoder (.onnx, or a --genai / model builder folder)")
    sp.add_argument("model", help="a KV-cache decoder .onnx, or a folder with model.onnx (genai folders too)")
    sp.add_argument("--prompt", help="text, tokenized with the tokenizer.json beside the model")
    sp.add_argument("--ids", metavar="1,2,3", help="the prompt as token ids, separated by commas")
    sp.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    sp.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    sp.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    sp.add_argument("--temperature", type=float, default=None,
                    help="sample with this temperature (default: greedy; 1 when only --top-k/--top-p/--min-p are given)")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens (0: all)")
    sp.add_argument("--top-p", type=float, default=1.0, help="sample among the most probable tokens adding up to p")
    sp.add_argument("--min-p", type=float, default=0.0, metavar="P",
                    help="sample among the tokens at least P times as probable as the most probable one (0: all)")
    sp.add_argument("--seed", type=int, default=None, help="seed of the draws (default: drawn, and reported)")
    sp.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                    help="tokens already in the text made less likely by P (greedy or sampled; 1: none)")
    sp.set_defaults(func=cmd_generate)

    sp = add("passes", "list passes and recipes")
    sp.set_defaults(func=cmd_passes)
    return p


def _add_input_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--inputs", metavar="PATH",
                    help="your inputs, for validation and calibration: an .npz (arrays named after the inputs; "
                         "several feeds as 0/NAME, 1/NAME, ...), an .npy (single-input models) or a folder of them")
    sp.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                    help="dims of a synthesized input, e.g. x=1,3,48,320 (repeatable)")
    from graphc.front.cli_options import add_data_args

    add_data_args(sp)


def _fail(as_json: bool, error: str, exit_code: int, kind: str, path: str | None = None) -> int:
    """One line on stderr; with --json also one JSON object on stdout."""
    sys.stderr.write(f"graphc: {error}\n")
    if as_json:
        data = {"error": error.removeprefix("error: "), "exit_code": exit_code, "type": kind}
        sys.stdout.write(json.dumps({**data, **({"path": str(path)} if path else {})}) + "\n")
    return exit_code


def _quiet():
    """Library warnings (numpy's RuntimeWarnings on NaN outputs, onnx_ir's log lines such as
    "Skipped deduplication of initializer") stay off the terminal: graphc reports what matters
    itself. GRAPHC_DEBUG=1 lets them through."""
    import contextlib
    import logging
    import warnings

    if os.environ.get("GRAPHC_DEBUG"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    root = logging.getLogger()
    handler = logging.NullHandler()  # no handler anywhere would send WARNINGs to stderr (lastResort)
    root.addHandler(handler)
    stack.callback(root.removeHandler, handler)
    return stack


def main(argv: list[str] | None = None) -> int:
    from graphc.core.interrupt import Terminated, signals_raise

    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        with signals_raise(), _quiet():  # SIGTERM unwinds like Ctrl-C: temp folders are removed
            try:
                args = build_parser().parse_args(argv)
            except _UsageError as e:
                return _fail(as_json, f"error: {e}", 2, "UsageError")
            as_json = bool(getattr(args, "json", as_json))
            return args.func(args)
    except GraphcError as e:
        return _fail(as_json, f"error: {printable(str(e))}", e.exit_code, type(e).__name__, e.path)
    except KeyboardInterrupt:
        return _fail(as_json, "interrupted", 130, "KeyboardInterrupt")
    except Terminated as e:
        return _fail(as_json, f"terminated ({e})", Terminated.exit_code, "Terminated")
    except Exception as e:  # noqa: BLE001 - never a traceback unless asked for
        if os.environ.get("GRAPHC_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        return _fail(as_json, f"internal error: {type(e).__name__}: {msg} (set GRAPHC_DEBUG=1 for a traceback)",
                     70, type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())

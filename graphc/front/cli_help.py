"""The command line's help texts, version line and exit codes (kept apart from cli.py's logic).

Nothing here imports ONNX or ONNX Runtime: ``graphc --help`` and ``graphc --version`` stay fast.
"""

from __future__ import annotations

import sys


def version_text() -> str:
    """``graphc X (onnx A, onnx-ir B, onnxscript C, onnxruntime D, Python E)``, from package
    metadata (imports none of them)."""
    from importlib.metadata import PackageNotFoundError, version

    from graphc import __version__

    deps = []
    for dist in ("onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        try:
            deps.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            deps.append(f"{dist} missing")
    py = ".".join(map(str, sys.version_info[:3]))
    return f"graphc {__version__} ({', '.join(deps)}, Python {py})"


def add_version_flag(parser) -> None:
    """``--version``: prints :func:`version_text` on one line (argparse's own action wraps it)."""
    import argparse

    class _Version(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            sys.stdout.write(version_text() + "\n")
            parser.exit(0)

    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print graphc's version (and its ONNX packages') and exit")


EXIT_CODES = (
    (0, "success"),
    (1, "bad input or a failure (one line on stderr naming the file and the problem)"),
    (2, "usage error: unknown flag, missing or malformed argument"),
    (3, "validation missed the tolerance (compress wrote nothing; validate: below --min-cosine)"),
    (70, "internal error, a bug in graphc (GRAPHC_DEBUG=1 shows the traceback)"),
    (130, "interrupted (Ctrl-C)"),
)

EXAMPLES = """\
  graphc export minilm -o minilm.onnx
  graphc compress minilm.onnx -o minilm.int8.onnx
  graphc compress minilm.onnx -o minilm.int4.onnx --recipe int4 --min-cosine 0.98
  graphc compress minilm.onnx -o m.onnx --recipe int8 --set quantize-int8.per_channel=false
  graphc compress minilm.onnx -o minilm.plan.onnx --max-error 0.01 --max-flops 0.7
  graphc compress minilm.onnx -o minilm.fast.onnx --recipe auto --target x86-avx2
  graphc compress model.onnx -o model.int8.onnx --calibration-data notes.txt --tokenizer hf_folder/
  graphc --json compress minilm.onnx -o minilm.int8.onnx --progress 2> events.jsonl
  graphc validate minilm.onnx minilm.int8.onnx --min-cosine 0.99
  graphc passes"""


def recipes_line() -> str:
    from graphc.core.recipes import recipe_names  # reads no recipe file, imports no ONNX

    import textwrap

    text = ", ".join([*recipe_names(), "auto"]) + " (or a .toml file; `graphc passes` lists their passes)"
    return "\n  ".join(textwrap.wrap(text, 86))


def exit_codes() -> str:
    codes = "\n".join(f"  {code:<4d} {text}" for code, text in EXIT_CODES)
    return (f"exit codes:\n{codes}\n"
            "With --json (before or after the command), stdout gets one JSON object, also on failure:\n"
            '  {"error": "...", "exit_code": N, "type": "..."}; stderr keeps the one-line message.')


def epilog(examples: str = EXAMPLES) -> str:
    return f"recipes:\n  {recipes_line()}\n\nexamples:\n{examples}\n\n{exit_codes()}"

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


class VersionAction:
    """``--version``: prints :func:`version_text` on one line (argparse's own action wraps it)."""

    @staticmethod
    def add_to(parser) -> None:
        import argparse

        class _Action(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                sys.stdout.write(version_text() + "\n")
                parser.exit(0)

        parser.add_argument("--version", action=_Action, nargs=0, help="print graphc's version (and its ONNX "
                            "packages') and exit")

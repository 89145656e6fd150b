"""A recipe's validation error on some models: largest absolute and relative difference
(``max_abs``; ``max_rel``: over the output's largest |value|) and the output cosine.

    python bench/recipe_error.py fuse MODEL.onnx [MODEL.onnx ...]

Each model is compressed in memory with ``force`` (nothing written); the CPU is named.
"""

from __future__ import annotations

import sys

import graphc
from graphc.core.target import cpu_name


def main() -> None:
    recipe, paths = sys.argv[1], sys.argv[2:]
    print(f"CPU: {cpu_name()}")
    for path in paths:
        v = graphc.compress(path, None, recipe=recipe, force=True, attribution=False).validation
        worst = max(v.outputs, key=lambda o: o.rel_max)
        print(f"{path}: max_abs {v.max_abs:.3g}, max_rel {v.max_rel:.3g} ({worst.name}), "
              f"cosine {v.output_cosine:.7f}, inputs: {v.input_source}")


if __name__ == "__main__":
    main()

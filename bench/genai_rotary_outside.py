"""Three genai folders of SmolLM2's float graph, for the rotary-outside comparison in docs/genai.md:

- ``inside``: ``compress --genai --recipe fuse`` (rotary inside GroupQueryAttention, shared buffers);
- ``outside``: the same with ``fuse-ort``'s ``rotary = false`` (rotary left as primitive ops, which
  the genai writer keeps outside the op over shared buffers);
- ``separate``: that graph written with ``shared_buffer=False`` (how such a graph was written before).

With ``--int4``: ``outside-int4`` and ``separate-int4`` instead, from one built-in ``int4`` compress
with ``fuse-ort``'s ``rotary = false`` (~10 minutes on 2 cores), written both ways.

usage: .venv/bin/python bench/genai_rotary_outside.py [--int4] OUT_DIR
then:  HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_genai.py --recipe none --builder-variants default \\
           --windows 8 --reps 5 --folder "...=OUT_DIR/inside" --folder "...=OUT_DIR/outside" \\
           --folder "...=OUT_DIR/separate" --json OUT.json
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import onnx_ir as ir

from graphc.exporters.genai import write_folder
from graphc.front.api import compress

SOURCE = Path(__file__).resolve().parent.parent / ".graphc-cache" / "bench" / "genai" / "graphc-fp32" / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    int4 = "--int4" in args
    args = [a for a in args if a != "--int4"]
    if len(args) != 1:
        print(__doc__)
        return 2
    if not SOURCE.is_file():
        print(f"{SOURCE}: missing; bench/bench_genai.py builds it")
        return 1
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    if int4:
        from graphc.core.recipe_merge import apply_sets
        from graphc.core.recipes import BUILTIN

        recipe4 = apply_sets(BUILTIN["int4"], ["fuse-ort.rotary=false"])
        result = compress(SOURCE, out / "int4-norotary.onnx", recipe=recipe4)
        for name, shared in (("outside-int4", True), ("separate-int4", False)):
            shutil.rmtree(out / name, ignore_errors=True)
            notices: list[str] = []
            write_folder(ir.load(out / "int4-norotary.onnx"), out / name, source=SOURCE.parent, shared_buffer=shared,
                         notices=notices)
            print(name, *notices)
        print("int4 validation:", result.validation.passed if result.validation else None)
        return 0
    recipe = out / "fuse-norotary.toml"
    recipe.write_text('name = "fuse-norotary"\n[[passes]]\nname = "fuse-ort"\noptions = { rotary = false }\n')
    for name, how in (("inside", "fuse"), ("outside", str(recipe))):
        shutil.rmtree(out / name, ignore_errors=True)
        result = compress(SOURCE, out / name, recipe=how, genai=True)
        print(name, *[n for n in result.notices if "genai" in n])
    shutil.rmtree(out / "separate", ignore_errors=True)
    compress(SOURCE, out / "separate.onnx", recipe=str(recipe))
    write_folder(ir.load(out / "separate.onnx"), out / "separate", source=SOURCE.parent, shared_buffer=False)
    print("separate: written with separate buffers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

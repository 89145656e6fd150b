"""Three genai folders of SmolLM2's float graph, for the rotary-outside comparison in docs/genai.md:

- ``inside``: ``compress --genai --recipe fuse`` (rotary inside GroupQueryAttention, shared buffers);
- ``outside``: the same with ``fuse-ort``'s ``rotary = false`` (rotary left as primitive ops, which
  the genai writer keeps outside the op over shared buffers);
- ``separate``: that graph written with ``shared_buffer=False`` (how such a graph was written before).

usage: .venv/bin/python bench/genai_rotary_outside.py OUT_DIR
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
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    if not SOURCE.is_file():
        print(f"{SOURCE}: missing; bench/bench_genai.py builds it")
        return 1
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
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

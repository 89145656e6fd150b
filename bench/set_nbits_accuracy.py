"""Copy a model with the ``accuracy_level`` of its ``MatMulNBits`` nodes of some bit width changed.

    python bench/set_nbits_accuracy.py IN.onnx OUT.onnx --bits 8 [--block-size 128] --level 1

For kernel comparisons at equal weights (e.g. a mixed 4/8-bit model's 8-bit layers computed in
float32 instead of with int8 activations); prints how many nodes changed. Single-file models only.
"""

from __future__ import annotations

import argparse
import sys

import onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--bits", type=int, default=8, help="the MatMulNBits nodes of this bit width (default 8)")
    parser.add_argument("--block-size", type=int, default=0, help="only those of this block size (default: any)")
    parser.add_argument("--level", type=int, required=True, help="their new accuracy_level (0-4)")
    args = parser.parse_args(argv)
    model = onnx.load(args.input)
    changed = total = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        total += 1
        attrs = {a.name: a for a in node.attribute}
        if attrs["bits"].i != args.bits or (args.block_size and attrs["block_size"].i != args.block_size):
            continue
        if "accuracy_level" in attrs:
            attrs["accuracy_level"].i = args.level
        else:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", args.level))
        changed += 1
    onnx.save(model, args.output)
    print(f"{changed} of {total} MatMulNBits nodes ({args.bits}-bit) now at accuracy_level {args.level}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

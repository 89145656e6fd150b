"""How a low-bit model's MatMulNBits are laid out per input: the projections that read one input
(Q/K/V, gate/up), their bits and blocks, and how often siblings agree (what ``pack-nbits`` can
pack).

    python bench/nbits_layout.py MODEL.onnx [MODEL.onnx ...]
"""

from __future__ import annotations

import collections
import sys

import onnx_ir as ir


def layouts(path: str) -> collections.Counter:
    """Counter of sibling layouts: a tuple of (bits, block) per MatMulNBits reading one input, in
    graph order (a packed node counts once per member listed in ``graphc.nbits.packed``)."""
    model = ir.load(path)
    groups: dict[int, list[tuple[int, int]]] = collections.OrderedDict()
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            members = node.metadata_props.get("graphc.nbits.packed", "").split(",") if node.metadata_props.get(
                "graphc.nbits.packed") else [node.name]
            layout = (node.attributes.get_int("bits", 0), node.attributes.get_int("block_size", 0))
            groups.setdefault(id(node.inputs[0]), []).extend([layout] * len(members))
    return collections.Counter(tuple(g) for g in groups.values() if len(g) > 1)


def main() -> None:
    for path in sys.argv[1:]:
        counts = layouts(path)
        print(path)
        for layout, n in counts.most_common():
            agree = "agree" if len(set(layout)) == 1 else "differ"
            print(f"  {n:3d} x " + ", ".join(f"{b}-bit b{k}" for b, k in layout) + f"  ({agree})")


if __name__ == "__main__":
    main()

"""The model's signature is the user's contract: passes must not change it.

Two shapes of graph make passes change it without meaning to:

- A graph input that is also a graph output (``y = f(x)`` returning ``x`` too). onnx_ir's
  ``OutputFixPass`` (run by onnxscript's optimizer) puts an Identity between them and
  renames the *input* ``x_orig``: callers feeding ``x`` would fail. :class:`SignatureGuard`
  undoes that after every pass (the input gets its name back and is the output again) and
  refuses, naming the pass, any other change of input or output names.
- Initializers that are also graph inputs (every initializer at IR 3; ``keep_initializers_
  as_inputs`` exports later): a caller may override them, so they are not constants.
  graphc keeps that meaning: :func:`overridable_initializers` hides them from the passes
  (which then treat them as the inputs they are: not quantized, folded or removed) and
  restores them afterwards. At IR 3, where every initializer must be listed as an input,
  ONNX Runtime treats them as constants (a feed for one is refused): graphc does the same,
  takes them out of the inputs and writes IR 4, the first version that allows
  initializers that are not inputs (nothing else differs between the two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx_ir as ir

from graphc.core.errors import PassError


class SignatureGuard:
    """Instrument: after each pass, graph input and output names are what they were."""

    def __init__(self, model: ir.Model) -> None:
        self.inputs = [v.name for v in model.graph.inputs]
        self.outputs = [v.name for v in model.graph.outputs]

    def after_pass(self, pass_, model: ir.Model, record) -> None:
        graph = model.graph
        restore_direct_outputs(graph, self.inputs)
        inputs = [v.name for v in graph.inputs]
        outputs = [v.name for v in graph.outputs]
        if inputs != self.inputs:
            changed = next((a, b) for a, b in zip(self.inputs + [None] * 99, inputs + [None] * 99) if a != b)
            raise PassError(f"changed the model's inputs ({changed[0]!r} became {changed[1]!r}); callers would "
                            "break", pass_name=pass_.name)
        if outputs != self.outputs:
            changed = next((a, b) for a, b in zip(self.outputs + [None] * 99, outputs + [None] * 99) if a != b)
            raise PassError(f"changed the model's outputs ({changed[0]!r} became {changed[1]!r}); callers would "
                            "break", pass_name=pass_.name)


def restore_direct_outputs(graph: ir.Graph, names: list[str]) -> int:
    """Undo OutputFixPass's aliasing of a graph input that is also an output: the output
    produced by ``Identity(input)`` under the input's old name becomes the input again, and
    the input gets its name back. Returns how many were restored."""
    restored = 0
    for value, name in zip(graph.inputs, names):
        if value.name == name:
            continue
        for index, out in enumerate(graph.outputs):
            node = out.producer()
            if (out.name == name and node is not None and node.op_type == "Identity" and node.domain == ""
                    and list(node.inputs) == [value] and len(out.uses()) == 0):
                graph.outputs[index] = value
                graph.remove(node, safe=True)
                value.name = name
                restored += 1
                break
    return restored


@contextlib.contextmanager
def overridable_initializers(model: ir.Model, notices: list[str]) -> Iterator[list[str]]:
    """Hide initializers that are also graph inputs from the passes, then restore them."""
    graph = model.graph
    if model.ir_version < 4:
        yield _ir3_constants(model, notices)
        return
    held: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for value in graph.inputs:
        if value.name in graph.initializers and graph.initializers[value.name] is value:
            held.append((value, value.const_value))
    for value, _ in held:
        graph.initializers.pop(value.name)
        value.const_value = None
    if held:
        names = ", ".join(repr(v.name) for v, _ in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        notices.append(f"{len(held)} initializer(s) are also graph inputs ({names}): callers may override them, "
                       "so graphc kept them as they are (not compressed); remove them from the graph inputs to let "
                       "graphc treat them as constants")
    try:
        yield [v.name for v, _ in held]
    finally:
        for value, tensor in held:
            value.const_value = tensor
            graph.register_initializer(value)


def _ir3_constants(model: ir.Model, notices: list[str]) -> list[str]:
    """IR 3 lists every initializer as a graph input, yet they are constants: ONNX Runtime
    refuses a feed for one ("Invalid input name"). Take them out of the inputs and write IR 4,
    so that the passes may compress them and the constants they add are valid."""
    graph = model.graph
    listed = [v for v in graph.inputs if v.name in graph.initializers]
    for value in listed:
        graph.inputs.remove(value)
    model.ir_version = 4
    notices.append(f"IR version 3: {len(listed)} initializer(s) listed as graph inputs are constants (ONNX Runtime "
                   "does not let callers feed them at IR 3); written as IR 4 without them in the inputs")
    return []

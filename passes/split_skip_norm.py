"""``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` as ``Add`` nodes and the plain
normalization op, on CPU targets where ONNX Runtime runs that form faster.

    SkipLayerNormalization(x, skip, gamma, beta, bias)
        →  Add(x, skip) → Add(·, bias) → LayerNormalization(·, gamma, beta)
    SkipSimplifiedLayerNormalization(x, skip, gamma, bias)     (option ``simplified``)
        →  Add(x, skip) [→ Add(·, bias)] → SimplifiedLayerNormalization(·, gamma)

The sums are the fused op's, in its order ((x + skip) + bias), so the residual stream it passes
on (its ``input_skip_bias_sum`` output) is bit for bit the same; the normalized output differs by
float rounding (~1e-6: another kernel).

Why: ONNX Runtime's CPU kernel for the fused ops is several times slower than its
``LayerNormalization`` / ``SimplifiedLayerNormalization`` kernels plus the ``Add`` nodes
(``bench/bench_skip_norm.py``: measured on an AMD EPYC Zen 4, AVX-512, ONNX Runtime 1.32, in
docs/targets.md): ``SkipLayerNormalization`` 0.23-0.39x at 229-1024 rows. The RMS form gains
less (0.54-0.69x) and loses on a decode step's single row (1.05-1.12x, one more node to
dispatch), where decoders, the models that use it, spend their time: ``simplified`` is off by
default. The fusion still pays off while compressing: the passes before this one (padding
removal, smoothing and AWQ scale folding, pruning) read the fused op.

Left fused, with the reason in the stats:

- ``SkipLayerNormalization`` without a bias: ONNX Runtime fuses ``Add → LayerNormalization``
  back into it when it loads the model (its ``SkipLayerNormFusion``), so splitting gains
  nothing; with the bias added after the skip, its patterns do not match;
- a node whose mean or inverse-deviation output is read (the plain op has no such outputs in
  the shape the fused op gives them);
- tensors other than float32 (float16 kernels not measured), a model below opset 17 for
  ``LayerNormalization``;
- every node on a target that is not x86-64 (``arm64``: not measured; the option ``targets``).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphc.core import ops
from graphc.core.pass_base import GraphcPass, PassStats
from graphc.core.registry import register

SKIP_LN = ops.SKIP_LAYER_NORM
SKIP_SLN = "SkipSimplifiedLayerNormalization"
# the input index of each op's optional bias
_BIAS_INPUT = {SKIP_LN: 4, SKIP_SLN: 3}


@dataclass(frozen=True)
class SplitSkipNormOptions:
    # the machine kinds ("x86_64", "arm64") whose targets get the split form
    targets: tuple[str, ...] = ("x86_64",)
    # SkipSimplifiedLayerNormalization too (faster on many rows, slower on one: see above)
    simplified: bool = False


@register
class SplitSkipNorm(GraphcPass):
    name = "split-skip-norm"
    summary = "fused skip + layer norms as Add nodes and the plain norm op, where ORT's CPU runs that faster"
    Options = SplitSkipNormOptions
    dtypes = ("float32", "float16")

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from graphc.core.errors import UnsupportedError
        from graphc.core.target import TABLE

        kinds = sorted({info.arch for info in TABLE.values()})
        if unknown := [t for t in self.options.targets if t not in kinds]:
            raise UnsupportedError(f"targets={unknown[0]!r}; supported: {', '.join(kinds)}", pass_name=self.name)
        target = self.context.target_info()
        if target.arch not in self.options.targets:
            stats.notes.append(f"target {target.name}: the fused form is kept (split form measured on "
                               f"{', '.join(self.options.targets) or 'no target'} only)")
            return False
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        graph = model.graph
        changed = False
        for node in list(graph):
            if node.domain != ops.MS_DOMAIN or node.op_type not in _BIAS_INPUT:
                continue
            label = node.name or node.op_type
            if node.op_type == SKIP_SLN and not self.options.simplified:
                stats.skip(label, "RMS form kept fused (option simplified: faster on many rows, slower on one)")
                continue
            reason = self._reason(node, graph, opset)
            if reason is not None:
                stats.skip(label, reason)
                continue
            self._split(graph, node)
            stats.add("split")
            changed = True
        if not changed and not stats.skipped:
            stats.notes.append("no SkipLayerNormalization or SkipSimplifiedLayerNormalization found")
        return changed

    @staticmethod
    def _reason(node: ir.Node, graph: ir.Graph, opset: int) -> str | None:
        x = node.inputs[0] if node.inputs else None
        if x is None or x.dtype != ir.DataType.FLOAT:
            return "not float32 (the split form is measured in float32 only)"
        for i in (1, 2):
            if len(node.outputs) > i and (node.outputs[i].uses() or node.outputs[i] in graph.outputs):
                return "its mean / inverse standard deviation output is read"
        bias = _input(node, _BIAS_INPUT[node.op_type])
        if node.op_type == SKIP_LN:
            if opset < 17:
                return f"opset {opset} has no LayerNormalization (17 and later)"
            if bias is None:
                return "no bias: ONNX Runtime would fuse Add + LayerNormalization back into this op"
        return None

    @staticmethod
    def _split(graph: ir.Graph, node: ir.Node) -> None:
        base = node.name or node.op_type
        x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
        bias = _input(node, _BIAS_INPUT[node.op_type])
        eps = node.attributes.get_float("epsilon", 1e-12)
        new = [ir.node(ops.ADD, [x, skip], name=f"{base}_skip_add")]
        if bias is not None:
            new.append(ir.node(ops.ADD, [new[-1].outputs[0], bias], name=f"{base}_bias_add"))
        total = new[-1].outputs[0]
        if node.op_type == SKIP_LN:
            beta = _input(node, 3)
            norm = ir.node("LayerNormalization", [total, gamma, *([beta] if beta is not None else [])],
                           attributes={"axis": -1, "epsilon": eps}, name=base)
        else:
            norm = ir.node("SimplifiedLayerNormalization", [total, gamma],
                           attributes={"axis": -1, "epsilon": eps}, name=base)
        new.append(norm)
        for n in new:  # the fused node's scope and provenance (layer attribution, which pass made it)
            n.metadata_props.update(node.metadata_props)
        out = norm.outputs[0]
        out.name, out.shape, out.type = node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type
        old, replacement = [node.outputs[0]], [out]
        if len(node.outputs) > 3:  # input_skip_bias_sum: the residual stream, read or not
            total.name, total.shape, total.type = node.outputs[3].name, node.outputs[3].shape, node.outputs[3].type
            old.append(node.outputs[3])
            replacement.append(total)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, old, replacement)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None

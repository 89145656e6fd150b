"""What a model holds, and what changed between two: ops, parameters and bytes, by op type
and by layer, and which pass made each new node."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from graphc.core import ops
from graphc.checks.provenance import read_provenance

_LAYER_RE = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?)[./_](\d+)(?:[./_]|$)")


def layer_of_text(text: str) -> str | None:
    m = _LAYER_RE.search(text)
    return f"layer.{int(m.group(1))}" if m else None


_PADDLE_RE = re.compile(r"^([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z][A-Za-z0-9]*)*_\d+)\.(?:w|b|tmp)_\d+$")  # conv2d_3.w_0
_WRAPPERS = re.compile(r"^(?:model|StatefulPartitionedCall|jax2tf_\w*|pjit_\w*|sequential\w*)$")


def module_of_text(text: str) -> str | None:
    """A module name from names that exporters other than torch's write, for grouping where
    no layer index is found: Paddle's ``conv2d_3.w_0`` / ``batch_norm_3.tmp_2`` → ``conv2d_3``;
    tf2onnx's ``model/dense/MatMul`` → ``dense``, ``.../MagikaV2/Conv_0/transpose`` → ``Conv_0``;
    older torch's ``/encoder/LayerNorm/Add`` → ``encoder/LayerNorm``."""
    m = _PADDLE_RE.match(text)
    if m:
        return m.group(1)
    parts = [p for p in re.sub(r":\d+$", "", text).split("/") if p and not _WRAPPERS.search(p)]
    if len(parts) < 2:
        return None
    return "/".join(parts[:-1][-2:]) if text.startswith("/") else parts[-2]


def _own_layer(node: ir.Node) -> str | None:
    for text in (node.metadata_props.get("graphc.scope", ""), node.metadata_props.get("namespace", ""), node.name or ""):
        layer = layer_of_text(text)
        if layer:
            return layer
    return None


def node_layer(node: ir.Node) -> str:
    """The layer a node belongs to: its scope or name, else (for helper nodes a pass added
    without a scope, such as Casts of stored constants) the layer of the node it feeds."""
    layer = _own_layer(node)
    if layer is None and "graphc.scope" not in node.metadata_props:
        for out in node.outputs:
            for user, _ in out.uses():
                layer = _own_layer(user)
                if layer:
                    return layer
    return layer or "other"


def _sort_layers(keys):
    def key(k: str):
        m = re.match(r"layer\.(\d+)$", k)
        return (0, int(m.group(1)), "") if m else (1, 0, k)

    return sorted(keys, key=key)


@dataclass
class Inspection:
    nodes: int
    op_counts: dict[str, int]
    params: int
    bytes: int
    by_op: dict[str, dict[str, int]]
    by_layer: dict[str, dict[str, Any]]
    by_pass: dict[str, int]
    metadata: dict[str, str]
    opsets: dict[str, int]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    made_by_pass: list[dict[str, str]] = field(default_factory=list)  # nodes a graphc pass created

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "params": self.params,
            "bytes": self.bytes,
            "opsets": self.opsets,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "op_counts": self.op_counts,
            "by_op": self.by_op,
            "layers": [{"layer": k, **v} for k, v in self.by_layer.items()],
            "nodes_by_pass": self.by_pass,
            "provenance": self.provenance,
            "metadata": self.metadata,
        }


def _op_key(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _sig(value: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
    return {"name": value.name, "dtype": str(value.dtype) if value.dtype is not None else None, "shape": shape}


def inspect_model(model: ir.Model) -> Inspection:
    graph = model.graph
    op_counts: Counter[str] = Counter()
    by_pass: Counter[str] = Counter()
    layer_ops: dict[str, Counter[str]] = defaultdict(Counter)
    for node in graph.all_nodes():
        key = _op_key(node)
        op_counts[key] += 1
        layer_ops[_group(node)][key] += 1
        if ops.META_PASS in node.metadata_props:
            by_pass[node.metadata_props[ops.META_PASS]] += 1
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "bytes": 0})
    by_layer: dict[str, dict[str, Any]] = defaultdict(lambda: {"params": 0, "bytes": 0, "nodes": 0})
    total_params = total_bytes = 0
    for value, tensor in _weights(graph):
        users = [u for u, _ in value.uses()]
        op = _op_key(users[0]) if users else "(unused)"
        layer = (layer_of_text(value.name or "") or (_group(users[0]) if users else None)
                 or module_of_text(value.name or "") or "other")
        for bucket in (by_op[op], by_layer[layer]):
            bucket["params"] += tensor.size
            bucket["bytes"] += tensor.nbytes
        total_params += tensor.size
        total_bytes += tensor.nbytes
    for layer, counts in layer_ops.items():
        by_layer[layer]["nodes"] = sum(counts.values())
        by_layer[layer]["ops"] = dict(counts.most_common())
    return Inspection(
        nodes=sum(op_counts.values()),
        op_counts=dict(op_counts.most_common()),
        params=total_params,
        bytes=total_bytes,
        by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1]["bytes"])),
        by_layer={k: by_layer[k] for k in _sort_layers(by_layer)},
        by_pass=dict(by_pass.most_common()),
        metadata=dict(model.metadata_props),
        opsets=dict(model.opset_imports),
        inputs=[_sig(v) for v in graph.inputs],
        outputs=[_sig(v) for v in graph.outputs],
        provenance=read_provenance(model),
        made_by_pass=[
            {"node": n.name or "", "op": _op_key(n), "pass": n.metadata_props[ops.META_PASS], "layer": node_layer(n)}
            for n in graph.all_nodes()
            if ops.META_PASS in n.metadata_props
        ],
    )


def _group(node: ir.Node) -> str:
    """The node's layer, else a module named in it (graphs no torch exporter wrote), else other."""
    layer = node_layer(node)
    if layer != "other":
        return layer
    for text in (node.name or "", *(o.name or "" for o in node.outputs)):
        module = module_of_text(text)
        if module:
            return module
    return "other"


def _weights(graph: ir.Graph):
    """(value, tensor) of every stored tensor: initializers, and Constant nodes (Paddle and
    tf2onnx hold weights there), in subgraphs too."""
    from graphc.passes._quant import subgraphs

    for g in (graph, *subgraphs(graph)):
        for value in g.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value
        for node in g:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
                attr = node.attributes["value"]
                if attr.type == ir.AttributeType.TENSOR:
                    yield node.outputs[0], attr.as_tensor()


def diff(before: Inspection, after: Inspection) -> dict[str, Any]:
    """What changed from ``before`` to ``after``: op counts, and params/bytes per layer."""
    ops_all = sorted(set(before.op_counts) | set(after.op_counts))
    op_delta = {
        k: {"before": before.op_counts.get(k, 0), "after": after.op_counts.get(k, 0)}
        for k in ops_all
        if before.op_counts.get(k, 0) != after.op_counts.get(k, 0)
    }
    layers = []
    for layer in _sort_layers(set(before.by_layer) | set(after.by_layer)):
        b = before.by_layer.get(layer, {"params": 0, "bytes": 0, "nodes": 0})
        a = after.by_layer.get(layer, {"params": 0, "bytes": 0, "nodes": 0})
        layers.append(
            {
                "layer": layer,
                "params_before": b["params"],
                "params_after": a["params"],
                "bytes_before": b["bytes"],
                "bytes_after": a["bytes"],
                "nodes_before": b.get("nodes", 0),
                "nodes_after": a.get("nodes", 0),
            }
        )
    return {
        "nodes_before": before.nodes,
        "nodes_after": after.nodes,
        "params_before": before.params,
        "params_after": after.params,
        "bytes_before": before.bytes,
        "bytes_after": after.bytes,
        "ops_changed": op_delta,
        "layers": layers,
        "new_nodes_by_pass": after.by_pass,
        "new_nodes": [n for n in after.made_by_pass if n not in before.made_by_pass],
    }

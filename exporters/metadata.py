"""Metadata an exported model carries: architecture facts, provenance, compact node scopes."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from graphc.core import ops
from graphc.core.arch import ArchFacts

SCOPE_KEY = "graphc.scope"  # node metadata: dotted module path the node came from
EXPORTER_KEY = "graphc.exporter"  # model metadata: "dynamo" or "legacy"

# Heavy per-node keys the torch exporters write; replaced by SCOPE_KEY.
_TORCH_NODE_PREFIXES = ("pkg.torch.",)
_TORCH_NODE_KEYS = ("namespace",)
_TORCH_MODEL_PREFIXES = ("pkg.torch.",)  # pkg.torch.export.* and friends


def arch_facts_from_config(config: Any) -> ArchFacts:
    """Architecture facts from a transformers config (or anything with the same attributes)."""

    def get(name: str, default: Any = None) -> Any:
        value = getattr(config, name, default)
        return default if value is None else value

    heads = int(get("num_attention_heads", 0))
    hidden = int(get("hidden_size", 0))
    head_dim = get("head_dim") or (hidden // heads if heads else 0)
    return ArchFacts(
        model_type=str(get("model_type", "unknown")),
        num_layers=int(get("num_hidden_layers", 0)),
        num_heads=heads,
        head_dim=int(head_dim),
        num_kv_heads=int(get("num_key_value_heads", heads)),
        hidden_size=hidden,
        intermediate_size=_intermediate_size(config, hidden),
        vocab_size=int(get("vocab_size", 0)),
        sliding_window=int(get("sliding_window", 0) or 0) if get("use_sliding_window", True) else 0,
        layer_types=",".join(str(t) for t in (get("layer_types") or ())),
        rope_layers=",".join(str(int(bool(t))) for t in (get("no_rope_layers") or ())),
    )


def _intermediate_size(config: Any, hidden: int) -> int:
    """The MLP width, under the names the families use (DistilBERT's ``hidden_dim``, GPT-2's
    ``n_inner`` defaulting to 4x hidden, DINOv2's ``mlp_ratio``)."""
    for name in ("intermediate_size", "hidden_dim", "n_inner"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if hasattr(config, "n_inner"):
        return 4 * hidden
    ratio = getattr(config, "mlp_ratio", None)
    return int(ratio * hidden) if isinstance(ratio, (int, float)) and ratio > 0 else 0


def read_arch_facts(metadata: ir.Model | Mapping[str, str]) -> ArchFacts | None:
    """The ``graphc.arch.*`` facts of a model (or its metadata_props), None when absent."""
    props = metadata.metadata_props if isinstance(metadata, ir.Model) else metadata
    prefix = ops.META_ARCH_PREFIX
    values = {k[len(prefix):]: v for k, v in props.items() if k.startswith(prefix)}
    fields = ArchFacts.__dataclass_fields__
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    if not values or required - set(values):
        return None
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = values[name] if field.type in ("str", str) else int(values[name])
    return ArchFacts(**kwargs)


def write_model_metadata(
    model: ir.Model,
    *,
    exporter: str,
    arch_facts: ArchFacts | None = None,
    recipe: str | None = None,
) -> None:
    """Drop torch's model-level metadata, then write graphc's provenance and facts."""
    for key in [k for k in model.metadata_props if k.startswith(_TORCH_MODEL_PREFIXES)]:
        del model.metadata_props[key]
    model.metadata_props[EXPORTER_KEY] = exporter
    if arch_facts is not None:
        model.metadata_props.update(arch_facts.to_metadata())
    if recipe:
        model.metadata_props[ops.META_MODEL_SPEC] = recipe


def compact_node_metadata(model: ir.Model, *, strip_prefix: str = "", all_nodes: bool = False) -> int:
    """Replace the exporters' heavy per-node metadata with one ``graphc.scope`` key.

    The scope is the dotted path of the module that produced the node (``""`` for the
    root), with ``strip_prefix`` (the export wrapper's own attribute, e.g. ``"model."``)
    removed. Works on dynamo graphs (``pkg.torch.onnx.name_scopes``) and on legacy graphs
    (scope encoded in node names such as ``/model/encoder/layer.0/.../MatMul``). Nodes that
    already have a scope keep it; others without any scope information are left alone unless
    ``all_nodes`` (then they get ``""``). Returns the number of nodes changed.
    """
    changed = 0
    for node in model.graph.all_nodes():
        props = node.metadata_props
        torch_keys = [k for k in props if k.startswith(_TORCH_NODE_PREFIXES) or k in _TORCH_NODE_KEYS]
        if not torch_keys and (SCOPE_KEY in props or (_legacy_scope(node.name) is None and not all_nodes)):
            continue
        scope = _dynamo_scope(props.get("pkg.torch.onnx.name_scopes"))
        if scope is None:
            scope = _namespace_scope(props.get("namespace"))
        if scope is None:
            scope = _legacy_scope(node.name)
        for key in torch_keys:
            del props[key]
        if SCOPE_KEY not in props:
            props[SCOPE_KEY] = _strip(scope or "", strip_prefix)
        changed += 1
    return changed


def _namespace_scope(namespace: str | None) -> str | None:
    """``": __main__.W/m.encoder: BertEncoder/m.encoder.layer.0: BertLayer/linear: aten..."``
    -> ``"m.encoder.layer.0"`` (the entry before the op)."""
    if not namespace:
        return None
    parts = [p.split(":")[0].strip() for p in namespace.split("/") if p.strip()]
    parts = [p for p in parts if p]
    return parts[-2] if len(parts) >= 2 else ""


def _strip(scope: str, prefix: str) -> str:
    if not prefix:
        return scope
    if scope == prefix.rstrip("."):
        return ""
    return scope[len(prefix):] if scope.startswith(prefix) else scope


def _dynamo_scope(name_scopes: str | None) -> str | None:
    """``"['', 'model', 'model.encoder', 'add_3']"`` -> ``"model.encoder"``.

    The last entry is the FX node itself, the one before it the innermost module.
    """
    if not name_scopes:
        return None
    try:
        scopes = ast.literal_eval(name_scopes)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2:
        return ""
    module = str(scopes[-2])
    # Nodes torch inserts outside any module (shape asserts) carry a hook's name.
    return "" if module.startswith("_") and "." not in module else module


def _legacy_scope(name: str | None) -> str | None:
    """``"/model/encoder/layer.0/attention/self/query/MatMul"`` -> dotted module path."""
    if not name or not name.startswith("/"):
        return None
    parts = [p for p in name.split("/")[1:-1] if p]
    return ".".join(parts)

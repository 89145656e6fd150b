"""What loading checks before the IR sees a model: names, topological order, known ops,
sparse tensors, inline sizes and external data paths (never outside the model's folder), each
failure a typed one-line error naming the file. ``graphc.core.io.load_model`` calls
:func:`check_proto`."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from graphc.core import ops
from graphc.core.errors import ExternalDataError, InvalidModelError, ModelLoadError


_MAX_DETAIL = 300  # characters of a foreign error message kept in ours


def check_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Structural checks: names, order, ops, tensors, external data, then onnx.checker."""
    _check_no_sparse_initializers(proto.graph, path)
    _check_no_sparse_attributes(proto, path)
    _check_names(proto.graph, path)
    bad = bad_utf8_field(proto)  # metadata keys and values, doc strings, ...: passes read them as str
    if bad:
        raise InvalidModelError(f"field {bad} is not valid UTF-8", path=path)
    _check_order(proto.graph, path)
    _check_ops_known(proto, path)
    has_external = False
    for tensor in model_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(tensor, path.parent, path)
            has_external = True
        else:
            _check_inline_size(tensor, path)
    register_ort_onnx_domain_ops()
    try:
        # With external data the checker needs the model's folder, which only a path gives it.
        onnx.checker.check_model(str(path) if has_external else proto, full_check=False)
    except Exception as e:  # noqa: BLE001 - ValidationError and assorted C++ errors
        raise InvalidModelError(one_line(str(e)) or type(e).__name__, path=path) from None


def one_line(text: str) -> str:
    text = " ".join(text.split())  # onnx.checker messages span lines
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:  # onnx_ir's SerdeError wraps the real error
        e = e.__cause__
    return one_line(f"{type(e).__name__}: {e}")


def bad_utf8_field(msg, where: str = "model") -> str | None:
    """The first string field holding invalid UTF-8 (protobuf hands those back as bytes).
    A walk over every message (not over tensor data): milliseconds for thousands of nodes."""
    for fd, value in msg.ListFields():
        if fd.type not in (fd.TYPE_STRING, fd.TYPE_MESSAGE):
            continue
        for i, item in enumerate(value if fd.is_repeated else [value]):
            here = f"{where}.{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
            if fd.type == fd.TYPE_STRING and isinstance(item, bytes):
                return here
            if fd.type == fd.TYPE_MESSAGE and (found := bad_utf8_field(item, here)):
                return found
    return None


def _check_no_sparse_initializers(graph: onnx.GraphProto, path: Path) -> None:
    """onnx_ir drops sparse initializers (the nodes reading them would dangle): refuse them
    by name instead of failing later on a 'dangling input'."""
    for g in _all_graphs(graph):
        if g.sparse_initializer:
            sparse = g.sparse_initializer[0]
            name = sparse.values.name or sparse.indices.name or "<unnamed>"
            raise ModelLoadError(
                f"sparse initializer {name!r} (shape {list(sparse.dims)}): graphc does not support sparse "
                "initializers; store it dense", path=path,
            )


def _check_no_sparse_attributes(proto: onnx.ModelProto, path: Path) -> None:
    """Sparse tensor attributes (``Constant(sparse_value=...)``), anywhere: onnx_ir cannot
    hold them, and refusing them here means their data is never read."""
    for node in _all_model_nodes(proto):
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                where = f"node {node.name!r}" if node.name else f"a {node.op_type} node"
                raise ModelLoadError(
                    f"sparse tensor attribute {attr.name!r} at {where}: graphc does not support sparse "
                    "tensors; store it dense", path=path,
                )


def _all_model_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: the main graph, its subgraphs, and local functions (with their subgraphs)."""
    yield from _all_nodes(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _all_nodes(_wrap_nodes(node))


def _wrap_nodes(*nodes: onnx.NodeProto) -> onnx.GraphProto:
    graph = onnx.GraphProto()
    graph.node.extend(nodes)
    return graph


def model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds: initializers and tensor attributes of the main graph, of
    every subgraph (If/Loop/Scan) and of every local function; sparse initializers' values
    and indices too (so that path checks see them before anything refuses them)."""
    yield from _all_tensors(proto.graph)
    for g in _all_graphs(proto.graph):
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for function in proto.functions:
        yield from _all_tensors(_wrap_nodes(*function.node))


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def _label(node: onnx.NodeProto, index: int) -> str:
    return repr(node.name) if node.name else f"#{index} ({node.op_type})"


def _check_names(graph: onnx.GraphProto, path: Path) -> None:
    """Names are text, each value has one producer, every value read exists, outputs are unique."""
    for index, node in enumerate(graph.node):
        for text in (node.name, node.op_type, node.domain, *node.input, *node.output):
            if isinstance(text, bytes):  # protobuf hands back invalid UTF-8 as bytes
                raise InvalidModelError(f"node #{index} has a name that is not valid UTF-8: {text!r}", path=path)
    seen: set[str] = set()
    for out in graph.output:
        if out.name in seen:
            raise InvalidModelError(f"duplicate graph output name {out.name!r}", path=path)
        seen.add(out.name)
    given = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    produced = set(given)
    for index, node in enumerate(graph.node):
        for name in filter(None, node.output):
            if name in produced:
                what = "a graph input or initializer" if name in given else "another node"
                raise InvalidModelError(
                    f"value {name!r} is produced by node {_label(node, index)} and by {what} (duplicate output name)",
                    path=path,
                )
            produced.add(name)
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in produced:
                raise InvalidModelError(
                    f"node {_label(node, index)} reads {name!r}, which nothing produces (dangling input)", path=path
                )
    for out in graph.output:
        if out.name not in produced:
            raise InvalidModelError(f"graph output {out.name!r} is produced by no node", path=path)


def _check_order(graph: onnx.GraphProto, path: Path) -> None:
    """Nodes must be topologically sorted (ONNX requires it); name a cycle when there is one."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    preds = [{producer[n] for n in node.input if n in producer} for node in graph.node]
    late = next(((i, p) for i, ps in enumerate(preds) for p in ps if p >= i), None)
    if late is None:
        return
    # Kahn's algorithm: the nodes that never reach in-degree 0 are on a cycle or behind one.
    indegree = [len(ps) for ps in preds]
    succs: list[list[int]] = [[] for _ in graph.node]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].append(i)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    while ready:
        for s in succs[ready.pop()]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    stuck = {i for i, d in enumerate(indegree) if d > 0}
    if stuck:
        # Every stuck node has a stuck predecessor: walk back until a node repeats; it is on the cycle.
        walk: list[int] = []
        i = min(stuck)
        while i not in walk:
            walk.append(i)
            i = min(p for p in preds[i] if p in stuck)
        cycle = walk[walk.index(i):][::-1]
        shown = " -> ".join(_label(graph.node[j], j) for j in [*cycle[:6], cycle[0]])
        more = f" ({len(cycle)} nodes)" if len(cycle) > 6 else ""
        raise InvalidModelError(
            f"graph has a cycle through node {_label(graph.node[cycle[0]], cycle[0])}: {shown}{more}", path=path
        )
    i, p = late
    name = next(n for n in graph.node[i].input if producer.get(n) == p)
    raise InvalidModelError(
        f"nodes are not in topological order, as ONNX requires: node {_label(graph.node[i], i)} reads {name!r} "
        f"before node {_label(graph.node[p], p)} produces it",
        path=path,
    )


@functools.cache
def _ort_schemas() -> frozenset[tuple[str, str]]:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        return frozenset((s.domain or "", s.name) for s in ort_c.get_all_operator_schema())
    except Exception:  # noqa: BLE001 - an ORT build without schemas: fall back to onnx.defs only
        return frozenset()


@functools.cache
def register_ort_onnx_domain_ops() -> tuple[str, ...]:
    """Teach onnx.checker (onnx.defs) the ops ONNX Runtime registers in the ONNX domain that
    ONNX itself does not define, with ORT's own schemas; returns their names.

    ``SimplifiedLayerNormalization`` (RMSNorm) is one: ORT's and onnxscript's fusions write it
    in the default domain, so ``fuse-ort`` on a Llama graph emits it, and without this graphc
    could not load its own output. Only names ONNX leaves free are added.
    """
    OpSchema = onnx.defs.OpSchema
    latest: dict[str, object] = {}
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        for schema in ort_c.get_all_operator_schema():
            if (schema.domain or "") == "" and not onnx.defs.has(schema.name, ""):
                if schema.name not in latest or latest[schema.name].since_version < schema.since_version:
                    latest[schema.name] = schema
    except Exception:  # noqa: BLE001 - an ORT build without schemas: nothing to add
        return ()

    def params(formal):
        return [
            OpSchema.FormalParameter(
                p.name, p.typeStr, p.description,
                param_option=OpSchema.FormalParameterOption(int(p.option.value)),
                is_homogeneous=p.isHomogeneous,
            )
            for p in formal
        ]

    added = []
    for name, schema in sorted(latest.items()):
        try:
            onnx.defs.register_schema(OpSchema(
                name, "", schema.since_version, schema.doc or "",
                inputs=params(schema.inputs),
                outputs=params(schema.outputs),
                type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description)
                                  for t in schema.type_constraints],
                attributes=[OpSchema.Attribute(a.name, OpSchema.AttrType(int(a.type.value)), a.description, required=a.required)
                            for a in schema.attributes.values()],
            ))
            added.append(name)
        except Exception:  # noqa: BLE001 - a schema onnx cannot express: the checker will name the op
            continue
    return tuple(added)


def known_domains() -> frozenset[str]:
    return ops.KNOWN_DOMAINS | {d for d, _ in _ort_schemas()}


def op_is_known(domain: str, op_type: str, functions: set[tuple[str, str]] = frozenset()) -> bool:
    domain = "" if domain == "ai.onnx" else domain
    if (domain, op_type) in functions:
        return True
    if onnx.defs.has(op_type, domain):
        return True
    return (domain, op_type) in _ort_schemas()


def _check_ops_known(proto: onnx.ModelProto, path: Path) -> None:
    functions = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto.graph):
        if op_is_known(node.domain, node.op_type, functions):
            continue
        where = f"node {node.name!r}" if node.name else f"a {node.op_type} node"
        if node.domain not in known_domains() | {d for d, _ in functions}:
            if node.domain in {o.domain for o in proto.opset_import}:
                continue  # a custom op (ai.onnx.contrib, ...): passes leave it as it is
            problem = (f"{where} uses op {node.op_type!r} from domain {node.domain!r}, which the model "
                       "declares no opset import for")
        else:
            domain = f"domain {node.domain!r}" if node.domain else "the default ONNX domain"
            problem = f"unknown op {node.op_type!r} in {domain} at {where}; ONNX and ONNX Runtime define no such op"
        raise InvalidModelError(problem, path=path)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in _all_graphs(graph):
        yield from g.node


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the raw data of this tensor must have; None for strings and unknown types."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        return None
    return (math.prod(tensor.dims) * dtype.bitwidth + 7) // 8


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _check_inline_size(tensor: onnx.TensorProto, path: Path) -> None:
    name, shape = tensor.name or "<unnamed>", list(tensor.dims)
    if any(d < 0 for d in shape):
        raise InvalidModelError(f"tensor {name!r} has a negative dimension {shape}", path=path)
    expected = _expected_nbytes(tensor)
    if expected is None:
        return
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != expected:
            raise InvalidModelError(
                f"tensor {name!r} declares shape {shape} ({expected} bytes) but holds {len(tensor.raw_data)} bytes",
                path=path,
            )
        return
    count = math.prod(shape)
    dtype = ir.DataType(tensor.data_type)
    if dtype.bitwidth == 4:  # packed two to an int32_data entry
        count = (count + 1) // 2
    if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        count *= 2
    held = max(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
    if held != count:
        raise InvalidModelError(f"tensor {name!r} declares shape {shape} ({count} values) but holds {held}", path=path)


def _check_external(tensor: onnx.TensorProto, base: Path, path: Path) -> None:
    name, shape = tensor.name or "<unnamed>", list(tensor.dims)
    if any(d < 0 for d in shape):
        raise InvalidModelError(f"tensor {name!r} has a negative dimension {shape}", path=path)
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ExternalDataError(f"tensor {name!r} is external but names no location", path=path)
    resolved = safe_external_path(base, location)
    if resolved is None:
        via = " through a symlink" if _is_symlink(base, location) else ""
        raise ExternalDataError(
            f"tensor {name!r}: external data location {location!r} resolves outside the model's folder{via}; refused",
            path=path,
        )
    if not resolved.is_file():
        raise ExternalDataError(f"tensor {name!r}: external data file {location!r} is missing", path=path)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ExternalDataError(f"tensor {name!r}: bad external data offset/length", path=path) from None
    file_size = resolved.stat().st_size
    expected = _expected_nbytes(tensor)
    if length is None:
        length = expected if expected is not None else file_size - offset
    if offset < 0 or length < 0 or offset + length > file_size:
        raise ExternalDataError(
            f"tensor {name!r}: external data {location!r} is truncated "
            f"(needs bytes {offset}..{offset + length}, file has {file_size})",
            path=path,
        )
    if expected is not None and length != expected:
        raise InvalidModelError(
            f"tensor {name!r} declares shape {shape} ({expected} bytes) but its external data holds {length} bytes",
            path=path,
        )


def safe_external_path(base: str | os.PathLike, location: str) -> Path | None:
    """The file an external-data location names, or None if it escapes ``base``.

    Refused: empty, NUL bytes, absolute paths, drive letters and URLs, ``..`` components,
    and anything whose real path (symlinks resolved) is not inside the model's folder.
    """
    parts = location.replace("\\", "/").split("/")
    if not location or "\0" in location or os.path.isabs(location) or location.startswith(("/", "\\")):
        return None
    if ":" in parts[0] or ".." in parts:  # a drive letter or URL scheme; a step up
        return None
    try:
        real = (Path(base) / location).resolve()
        real.relative_to(Path(base).resolve())
    except (ValueError, OSError, RuntimeError):  # outside, or a symlink loop
        return None
    return real


def _is_symlink(base: Path, location: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return (Path(base) / location).is_symlink()
    return False

"""Load and save models: the only place that touches protobuf.

Loading checks everything a bad file can get wrong before the IR sees it, and raises a
typed error whose message is one line naming the file and the problem. Saving writes to a
temporary folder beside the destination and renames into place, so a failure leaves
nothing half-written and the input is never touched.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphc import ops
from graphc.errors import ExternalDataError, InvalidModelError, ModelLoadError, SaveError

# Protobuf cannot serialize more than 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model into onnx_ir, checking it thoroughly first.

    External data stays lazy (memory-mapped by onnx_ir), so loading does not read weights.
    """
    path = Path(path)
    proto = load_proto(path)
    check_proto(proto, path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def load_proto(path: Path) -> onnx.ModelProto:
    """Parse the file as a ModelProto without its external data."""
    if not path.exists():
        raise ModelLoadError("no such file", path=path)
    if path.is_dir():
        raise ModelLoadError("is a directory, not an ONNX file", path=path)
    try:
        size = path.stat().st_size
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"cannot read: {e.strerror}", path=path) from None
    if size == 0:
        raise ModelLoadError("empty file, not an ONNX model", path=path)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"not an ONNX model (protobuf does not parse: {e or 'truncated or corrupt'})", path=path
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or len(proto.opset_import) == 0:
        raise ModelLoadError(
            "parses as protobuf but is not an ONNX model (no graph, IR version or opset)", path=path
        )
    if len(proto.graph.output) == 0:
        raise InvalidModelError("graph has no outputs", path=path)
    return proto


def check_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Structural checks: names, ops, tensors, external data, then onnx.checker."""
    _check_unique_outputs(proto.graph, path)
    _check_ops_known(proto, path)
    base = path.parent
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(tensor, base, path)
        else:
            _check_inline_size(tensor, path)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as e:
        raise InvalidModelError(_first_line(str(e)), path=path) from None
    except Exception as e:  # noqa: BLE001 - the checker raises assorted C++ errors
        raise InvalidModelError(_first_line(str(e)), path=path) from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # onnx.checker puts the useful line first, with a context dump after it.
    return lines[0] if lines else "invalid model"


def _check_unique_outputs(graph: onnx.GraphProto, path: Path) -> None:
    seen: set[str] = set()
    for out in graph.output:
        if out.name in seen:
            raise InvalidModelError(f"duplicate graph output name {out.name!r}", path=path)
        seen.add(out.name)
    produced: set[str] = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    node_outputs: set[str] = set()
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            if name in node_outputs:
                raise InvalidModelError(
                    f"value {name!r} is produced by more than one node (node {node.name!r})", path=path
                )
            node_outputs.add(name)
    produced |= node_outputs
    for node in graph.node:
        for name in node.input:
            if name and name not in produced:
                raise InvalidModelError(
                    f"node {node.name or node.op_type!r} reads {name!r}, which nothing produces "
                    "(dangling input)",
                    path=path,
                )
    for out in graph.output:
        if out.name not in produced:
            raise InvalidModelError(f"graph output {out.name!r} is produced by no node", path=path)


@functools.cache
def _ort_schemas() -> frozenset[tuple[str, str]]:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        return frozenset(
            (s.domain or "", s.name) for s in ort_c.get_all_operator_schema()
        )
    except Exception:  # noqa: BLE001 - an ORT build without schemas: fall back to onnx.defs only
        return frozenset()


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
        if not op_is_known(node.domain, node.op_type, functions):
            where = f"domain {node.domain!r}" if node.domain else "the default ONNX domain"
            hint = "" if node.domain in ops.KNOWN_DOMAINS else " (unknown domain)"
            raise InvalidModelError(
                f"unknown op {node.op_type!r} in {where}{hint} at node {node.name or '?'!r}; "
                "ONNX and ONNX Runtime define no such op",
                path=path,
            )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
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
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    bits = dtype.bitwidth
    return (count * bits + 7) // 8


_TYPED_FIELDS = (
    "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
)


def _check_inline_size(tensor: onnx.TensorProto, path: Path) -> None:
    if any(d < 0 for d in tensor.dims):
        raise InvalidModelError(f"initializer {tensor.name!r} has a negative dimension", path=path)
    expected = _expected_nbytes(tensor)
    if expected is None:
        return
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != expected:
            raise InvalidModelError(
                f"initializer {tensor.name!r} declares shape {list(tensor.dims)} "
                f"({expected} bytes) but holds {len(tensor.raw_data)} bytes",
                path=path,
            )
        return
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    held = max(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
    dtype = ir.DataType(tensor.data_type)
    if dtype.bitwidth == 4:
        count = (count + 1) // 2
    if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        count *= 2
    if held != count and not (held == 0 and count == 0):
        raise InvalidModelError(
            f"initializer {tensor.name!r} declares shape {list(tensor.dims)} ({count} values) "
            f"but holds {held}",
            path=path,
        )


def _check_external(tensor: onnx.TensorProto, base: Path, path: Path) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not location:
        raise ExternalDataError(f"tensor {name!r} is external but names no location", path=path)
    resolved = safe_external_path(base, location)
    if resolved is None:
        raise ExternalDataError(
            f"tensor {name!r}: external data location {location!r} resolves outside the "
            "model's folder; refused",
            path=path,
        )
    if not resolved.is_file():
        raise ExternalDataError(
            f"tensor {name!r}: external data file {location!r} is missing", path=path
        )
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
            f"tensor {name!r} declares shape {list(tensor.dims)} ({expected} bytes) but its "
            f"external data holds {length} bytes",
            path=path,
        )


def safe_external_path(base: Path, location: str) -> Path | None:
    """The file an external-data location names, or None if it escapes ``base``.

    Refused: absolute paths, drive letters, ``..`` components, and anything whose real
    path (symlinks resolved) is not inside the model's folder.
    """
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
        return None
    if ":" in location.split("/")[0]:  # a Windows drive letter or URL scheme
        return None
    parts = Path(location.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        return None
    real_base = base.resolve()
    real = (base / location).resolve()
    try:
        real.relative_to(real_base)
    except ValueError:
        return None
    return real


# --------------------------------------------------------------------------- saving


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (without loading external data)."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    forbid: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Save atomically; returns the files written.

    ``external_data``: None chooses it when the weights would push the protobuf near
    2 GB. The external file is ``<name>.data`` beside the model, with a relative location.
    ``forbid``: paths the output must not overwrite (the input model and its data).
    """
    path = Path(path)
    if path.is_dir():
        raise SaveError("output path is a directory", path=path)
    if not path.parent.exists():
        raise SaveError("output folder does not exist", path=path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    targets = [path] + ([path.parent / data_name] if external_data else [])
    for target in targets:
        for other in forbid:
            if _same_file(target, Path(other)):
                raise SaveError(
                    f"would overwrite the input {os.fspath(other)!r}; choose another output path",
                    path=path,
                )
    tmp_dir = Path(tempfile.mkdtemp(prefix=".graphc-tmp-", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        try:
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                # Pull any lazily-loaded external tensors into the single file.
                ir.save(model, tmp_model)
        except Exception as e:  # noqa: BLE001 - surface as a typed one-line error
            raise SaveError(f"could not serialize the model: {e}", path=path) from None
        written = []
        for target in targets:
            os.replace(tmp_dir / target.name, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return a.resolve() == b.resolve()


def model_files(path: str | os.PathLike, model: ir.Model | None = None) -> list[Path]:
    """The model file and the external data files it refers to."""
    path = Path(path)
    files = [path]
    proto = onnx.load_model(path, load_external_data=False)
    seen = set()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                resolved = safe_external_path(path.parent, loc)
                if resolved is not None:
                    files.append(resolved)
    return files


def file_bytes(path: str | os.PathLike) -> int:
    """On-disk bytes of a model, external data included."""
    return sum(p.stat().st_size for p in model_files(path))

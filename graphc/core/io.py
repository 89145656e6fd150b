"""Load and save models: the only place that touches protobuf.

Loading checks everything a bad file can get wrong before the IR sees it, and raises a
typed error whose message is one line naming the file and the problem. Saving writes to a
temporary folder beside the destination and renames into place, so a failure leaves
nothing half-written, and it refuses to overwrite the input or its external data.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from graphc.core import tempdirs
from graphc.core.errors import GraphcError, InvalidModelError, ModelLoadError, SaveError
from graphc.core.model_checks import (  # noqa: F401 - safe_external_path: io's API for external data paths
    bad_utf8_field, check_proto, model_tensors, one_line, root_cause, safe_external_path,
)

# Above this many bytes of weights the output gets external data: a reader parses a single file
# whole (protobuf's limit is 2 GB) and holds it while it loads, while external data can be
# mapped. (Writing holds one tensor at a time either way: write_single_file.)
INLINE_LIMIT = 512 * 2**20


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model into onnx_ir, checking it thoroughly first.

    External data stays lazy (memory-mapped by onnx_ir), so loading does not read weights.
    Every failure is a :class:`ModelLoadError` (or a subclass) naming the file.
    """
    path = Path(path)
    proto = load_proto(path)
    try:
        check_proto(proto, path)
        model = ir.serde.deserialize_model(proto)
    except GraphcError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a malformed proto trips on, in one line
        bad = bad_utf8_field(proto)
        detail = f"field {bad} is not valid UTF-8" if bad else f"malformed model ({root_cause(e)})"
        raise InvalidModelError(detail, path=path) from None
    set_base_dir(model, path.parent)
    return model


def set_base_dir(model: ir.Model, base: str | os.PathLike) -> None:
    """Resolve every external tensor of the model against ``base`` (the model's folder):
    the main graph, its subgraphs and the local functions' nodes (onnx_ir's own helper
    leaves functions at the working directory)."""
    ir.external_data.set_base_dir(model.graph, str(base))
    for tensor in _ir_attribute_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base)


def _ir_function_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _ir_attribute_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Tensors in function nodes' attributes and in their subgraphs' initializers."""
    for node in _ir_function_nodes(model):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value
            elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value
                for g in graphs:
                    yield from (v.const_value for v in g.initializers.values() if v.const_value is not None)


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse the file as a ModelProto without its external data; it must look like a model."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ModelLoadError("is a directory, not an ONNX file", path=path)
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise ModelLoadError("not a regular file", path=path)
        data = path.read_bytes()
    except FileNotFoundError:
        broken = " (a broken symlink)" if path.is_symlink() else ""
        raise ModelLoadError(f"no such file{broken}", path=path) from None
    except OSError as e:
        raise ModelLoadError(f"cannot read: {e.strerror or e}", path=path) from None
    if not data:
        raise ModelLoadError("empty file, not an ONNX model", path=path)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # noqa: BLE001 - DecodeError mostly; also size and nesting limits
        raise ModelLoadError(
            "not an ONNX model: protobuf cannot parse it (truncated, corrupt, or another format)", path=path
        ) from None
    # Protobuf is lenient: random bytes, a GraphProto or a TensorProto may parse as a ModelProto.
    checks = (("graph", proto.HasField("graph")), ("IR version", proto.ir_version > 0),
              ("opset import", len(proto.opset_import) > 0))
    missing = [what for what, ok in checks if not ok]
    if missing:
        raise ModelLoadError(f"parses as protobuf but is not an ONNX model (no {', no '.join(missing)})", path=path)
    if len(proto.graph.output) == 0:
        raise InvalidModelError("graph has no outputs", path=path)
    return proto


# --------------------------------------------------------------------------- IR version


@functools.cache
def max_ir_version() -> int:
    """The highest IR version the installed ONNX Runtime loads, probed once with a trivial
    model at decreasing versions (onnx.helper writes its newest by default: IR 14 with onnx
    1.23, which ONNX Runtime 1.31 refuses; it loads up to 13)."""
    import onnxruntime as ort

    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "ir_probe", [value],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    so = ort.SessionOptions()
    so.log_severity_level = 4
    for version in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=version)
        try:
            ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - "Unsupported model IR version"
            continue
        return version
    return onnx.IR_VERSION  # pragma: no cover - an ORT that loads nothing: let it say why itself


@contextlib.contextmanager
def ort_ir_version(model: ir.Model) -> Iterator[None]:
    """Temporarily lower the model's IR version to the highest ONNX Runtime loads."""
    original = model.ir_version
    model.ir_version = min(original, max_ir_version())
    try:
        yield
    finally:
        model.ir_version = original


# --------------------------------------------------------------------------- saving


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (without loading external data)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(
    path: str | os.PathLike, *, external_data: bool = False, forbid: tuple[str | os.PathLike, ...] = (),
    must_be_new: bool = False,
) -> list[Path]:
    """The files a save to ``path`` would write (model, then data); SaveError if it must not.

    Cheap: call it before a long computation so that a bad ``-o`` fails fast.
    ``forbid``: paths the output must not overwrite (the input model and its data), also
    through a symlink or a hard link. A missing folder is fine (the save creates it); a
    named pipe, a device or a folder at the path is refused (graphc.core.outputs).
    ``must_be_new``: refuse files that exist (dump files are only ever created).
    """
    from graphc.core.outputs import check_target, data_sidecar

    path = Path(path)
    forbid_paths = tuple(Path(p) for p in forbid)
    check_target(path, forbid=forbid_paths, name_extra=len(".data") if external_data else 0, must_be_new=must_be_new)
    targets = [path]
    sidecar = data_sidecar(path)
    if external_data:
        check_target(sidecar, what=f"its external data file {sidecar.name!r}", forbid=forbid_paths,
                     must_be_new=must_be_new, shown=path)
        targets.append(sidecar)
    return targets


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    forbid: tuple[str | os.PathLike, ...] = (),
    must_be_new: bool = False,
) -> list[Path]:
    """Save atomically; returns the files written.

    ``external_data``: None chooses it when the weights exceed :data:`INLINE_LIMIT`. A single
    file is written a tensor at a time (:func:`write_single_file`). The external file is ``<name>.data`` beside the model, with a relative location;
    without it, weights that were external in the input are pulled into the single file.
    ``forbid``: paths the output must not overwrite (the input model and its data).
    ``must_be_new``: never replace a file (the final rename is a link that fails if the
    name exists). A missing output folder is created (and removed again if the save fails).
    The temporary folder beside the output is removed whatever happens, a signal that
    raises (KeyboardInterrupt, graphc.core.interrupt.Terminated) included.
    The file's IR version is at most :func:`max_ir_version` (what ONNX Runtime loads).
    """
    path = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > INLINE_LIMIT
    targets = check_output_path(path, external_data=external_data, forbid=forbid, must_be_new=must_be_new)
    created = _make_folder(path)
    tmp_dir = None
    done = False
    try:
        try:
            tmp_dir = Path(tempfile.mkdtemp(prefix=tempdirs.SAVE_PREFIX, dir=path.parent))
            tempdirs.mark(tmp_dir)  # a killed run's folder is removed by the next (tempdirs.sweep)
        except OSError as e:
            raise SaveError(f"cannot write in the output folder: {e.strerror or e}", path=path) from None
        try:
            with ort_ir_version(model):
                if external_data:
                    ir.save(model, tmp_dir / path.name, external_data=targets[1].name)
                else:
                    with inline_external_data(model, initializers=False):
                        write_single_file(model, tmp_dir / path.name)
        except Exception as e:  # noqa: BLE001 - surface as a typed one-line error
            raise SaveError(f"could not serialize the model: {one_line(str(e)) or type(e).__name__}", path=path) from None
        # The data file first: once the model file appears, everything it refers to is there.
        for target in reversed(targets):
            _move_into_place(tmp_dir / target.name, target, path, must_be_new)
        done = True
        return targets
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if not done:
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def write_single_file(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` as one .onnx file, holding one main-graph initializer's bytes at a time.

    Serializing the whole ModelProto holds every weight three times (the model, the protobuf,
    its bytes). Protobuf merges a message field that occurs several times, repeated fields
    concatenated in order, so the file is written as: a graph holding the initializers' value
    infos; the model without the main graph's initializers; then one graph per initializer,
    each holding that one tensor (an external one is read only then). Parsed, it is the
    ModelProto ``ir.save`` writes. A model whose initializers carry quantization annotations
    is saved by ``ir.save`` (those annotations follow the initializers there)."""
    from onnx_ir import serde

    graph = model.graph
    values = list(graph.initializers.values())
    if any(v.meta.get("quant_parameter_tensor_names") for v in values):
        ir.save(model, path)
        return
    inputs = {v.name for v in graph.inputs}
    infos = onnx.GraphProto()
    for value in values:
        if value.name and value.name not in inputs and (value.shape is not None or value.type is not None
                                                        or value.metadata_props or value.doc_string):
            serde.serialize_value_into(infos.value_info.add(), value)
    graph.initializers.clear()
    try:
        proto = serde.serialize_model(model)
    finally:
        for value in values:
            graph.register_initializer(value)
    tag = _varint((7 << 3) | 2)  # ModelProto.graph, length-delimited
    with open(path, "wb") as f:
        chunk = infos.SerializeToString()
        f.write(tag + _varint(len(chunk)) + chunk)
        f.write(proto.SerializeToString())
        del proto, infos
        for value in values:
            if value.const_value is None:
                continue
            one = onnx.GraphProto()
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                tensor = ir.Tensor(tensor.numpy(), dtype=tensor.dtype)
            tensor.name = value.name
            serde.serialize_tensor_into(one.initializer.add(), tensor)
            chunk = one.SerializeToString()
            del one, tensor
            f.write(tag + _varint(len(chunk)))
            f.write(chunk)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _make_folder(path: Path) -> list[Path]:
    """Create the output's missing folders; returns them deepest first (to undo)."""
    missing = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise SaveError(f"cannot create the output folder: {e.strerror or e}", path=path) from None
    return missing


def _move_into_place(tmp: Path, target: Path, path: Path, must_be_new: bool) -> None:
    try:
        if must_be_new:
            try:
                os.link(tmp, target)  # fails if the name exists: never replaces a file
                return
            except FileExistsError:
                raise SaveError(f"{target.name!r} exists already; graphc only creates new files there",
                                path=path) from None
            except OSError:  # a file system without hard links: check, then rename
                if target.exists() or target.is_symlink():
                    raise SaveError(f"{target.name!r} exists already; graphc only creates new files there",
                                    path=path) from None
        os.replace(tmp, target)
    except OSError as e:
        raise SaveError(f"cannot write {target.name!r}: {e.strerror or e}", path=path) from None


@contextlib.contextmanager
def inline_external_data(model: ir.Model, *, initializers: bool = True) -> Iterator[None]:
    """Temporarily swap external tensors (initializers and tensor attributes) for in-memory
    copies, so that a single-file save, or a model handed to ONNX Runtime as bytes, holds
    the weights instead of references relative to the input's folder. ``initializers=False``:
    tensor attributes and subgraphs' initializers only (:func:`write_single_file` reads the main
    graph's one at a time)."""

    def loaded(t: ir.ExternalTensor) -> ir.Tensor:
        return ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)

    undo: list[tuple[ir.Value | ir.Node, object]] = []
    try:
        for graph in model.graphs():
            if graph is model.graph and not initializers:
                continue
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    undo.append((value, value.const_value))
                    value.const_value = loaded(value.const_value)
        nodes = [n for graph in model.graphs() for n in graph]
        for node in nodes + list(_ir_function_nodes(model)):  # local functions' Constants too
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    undo.append((node, attr))
                    node.attributes[name] = ir.AttrTensor(name, loaded(attr.value))
        yield
    finally:
        for owner, old in reversed(undo):
            if isinstance(owner, ir.Node):
                owner.attributes[old.name] = old
            else:
                owner.const_value = old


def model_files(path: str | os.PathLike, model: ir.Model | None = None) -> list[Path]:
    """The model file and the external data files it refers to (``model`` is unused)."""
    path = Path(path)
    files = [path]
    for tensor in model_tensors(load_proto(path)):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            resolved = safe_external_path(path.parent, loc) if loc else None
            if resolved is not None and resolved not in files:
                files.append(resolved)
    return files


def file_bytes(path: str | os.PathLike) -> int:
    """On-disk bytes of a model, external data included."""
    return sum(p.stat().st_size for p in model_files(path))

"""Symbolic shapes for graphs whose reshapes are computed at run time (legacy exporter).

The legacy TorchScript exporter reshapes with ``Concat(Shape(x)[0], Shape(x)[1], H, D)``;
ONNX shape inference gives each such result fresh unknown dimensions, so the fusion rules'
shape checks (same batch, same sequence for Q, K and V) cannot pass. ONNX Runtime's symbolic
shape inference follows Shape → Gather → Concat → Reshape and names the dimensions after the
graph inputs' (``batch``, ``sequence``). Its shapes are copied back onto the IR values.

This is the one place outside graphc/core/io.py that builds a protobuf: ORT's tool works on
``onnx.ModelProto`` only. Large initializers are left out of the copy it sees.
"""

from __future__ import annotations

import onnx_ir as ir

_MAX_INLINE_ELEMENTS = 64  # shape-like constants stay; weights are replaced by graph inputs
_TOOL_MODULE = "graphc._ort_symbolic_shape_infer"


def shape_tool():
    """ORT's ``symbolic_shape_infer`` module, loaded from its file alone: importing it through
    ``onnxruntime.tools`` runs that package's ``__init__``, which imports torch whenever torch is
    installed (~180 MB resident for the rest of the run, in every pass after this one)."""
    import importlib.util
    import sys

    if _TOOL_MODULE in sys.modules:
        return sys.modules[_TOOL_MODULE]
    ort = importlib.util.find_spec("onnxruntime")
    folder = next(iter(ort.submodule_search_locations or []), None) if ort is not None else None
    if folder is None:
        raise ImportError("onnxruntime is not installed")
    spec = importlib.util.spec_from_file_location(_TOOL_MODULE, f"{folder}/tools/symbolic_shape_infer.py")
    if spec is None or spec.loader is None:
        raise ImportError("onnxruntime's symbolic_shape_infer is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_TOOL_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_TOOL_MODULE]
        raise
    return module


def symbolic_shapes(model: ir.Model) -> int:
    """Give values symbolic shapes from ORT's symbolic shape inference; the number improved.

    Never raises: a graph ORT's tool cannot handle keeps the shapes it had."""
    SymbolicShapeInference = shape_tool().SymbolicShapeInference
    try:
        proto = _without_weights(ir.serde.serialize_model(model))
        inferred = _infer(SymbolicShapeInference, proto)
    except Exception:  # noqa: BLE001 - best effort: the tool asserts on graphs it does not know
        return 0
    if inferred is None:
        return 0
    shapes: dict[str, list] = {}
    for info in inferred.graph.value_info:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    improved = 0
    for node in model.graph:
        for value in node.outputs:
            dims = shapes.get(value.name)
            if dims is None or not _better(dims, value.shape):
                continue
            value.shape = ir.Shape(dims)
            improved += 1
    return improved


def _infer(tool, proto):
    """``SymbolicShapeInference.infer_shapes`` without its side effect: where inference stays
    incomplete, the tool saves ``sym_shape_infer_temp.onnx`` (with external data) in the
    working directory before raising. Its steps are run here instead, and an incomplete
    inference gives None (as the raise did), with nothing written."""
    opset = shape_tool().get_opset(proto)
    if not opset or opset < 7:
        return None
    inference = tool(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(proto)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    if not complete:
        return None
    inference._update_output_from_vi()
    return inference.out_mp_


def _without_weights(proto):
    """Large initializers become graph inputs of the same type (the tool needs no weights)."""
    import onnx

    graph = proto.graph
    keep = []
    for init in graph.initializer:
        size = 1
        for d in init.dims:
            size *= d
        if size > _MAX_INLINE_ELEMENTS:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def _better(dims: list, shape: ir.Shape | None) -> bool:
    """True when ``dims`` knows at least as much as ``shape`` and ties some unknown dim."""
    if shape is None:
        return True
    if len(shape) != len(dims):
        return False
    gained = False
    for new, old in zip(dims, shape):
        if isinstance(old, int):
            if new != old:
                return False
        elif new is not None and (old.value is None or str(old.value).startswith("unk__")):
            gained = True
    return gained

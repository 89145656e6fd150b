"""ONNX Runtime sessions for graphc's own runs (validation, calibration, measurements): CPU,
quiet, custom ops of onnxruntime-extensions where installed, models past protobuf's 2 GB
limit (``ort_large``) and files newer than the IR version ONNX Runtime loads."""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphc.core.errors import GraphcError, ValidationError


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 4  # ORT's own error lines would break one-line errors
    _register_extensions(so)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


_shared_arena: bool | None = None  # registered in this process (None: not tried yet)


def use_shared_arena(options: ort.SessionOptions) -> bool:
    """Point a session at this process's one shared CPU memory arena, registered with ONNX
    Runtime's environment on first use; False (options unchanged) where ORT refuses it.

    For many sessions that run one after another (the sensitivity probes' sessions, one per
    cut): each with its own arena they held 2.6 GB more between probes on SmolLM2-135M, and
    without one every run maps and faults in its buffers afresh; one arena shared by all of
    them reuses the same pages (SmolLM2-135M's 18 probe sessions on an AMD EPYC, 2 cores: a pass
    over every cut in 0.84x the time, peak RSS 2.2 GB instead of 2.8 GB;
    ``bench/bench_probe_arena.py``). The arena lives as long as the process, holding the most
    the probes needed at once, for later runs to reuse."""
    global _shared_arena
    if _shared_arena is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _shared_arena = True
        except Exception:  # noqa: BLE001 - one registered already by the caller's code, or none to register
            _shared_arena = False
    if _shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    return _shared_arena


def make_session(
    model: ir.Model | onnx.ModelProto | str | os.PathLike, *, threads: int | None = None, what: str = "model",
    edit: Callable[[onnx.ModelProto], None] | None = None,
) -> ort.InferenceSession:
    """An ORT CPU session for a path, an in-memory IR model or a ModelProto.

    A model whose IR version is newer than ONNX Runtime loads (onnx.helper's default) is
    handed to it with the highest IR version it does load (graphc.core.io.max_ir_version).
    ``edit`` (an in-memory IR model only): applied to its protobuf before ORT reads it (outputs
    added, nodes left out), the model itself untouched."""
    from graphc.core.io import inline_external_data, max_ir_version

    try:
        if isinstance(model, (ir.Model, onnx.ModelProto)):
            from graphc.core import ort_large
            if isinstance(model, ir.Model):
                if ort_large.tensor_bytes(model) >= WEIGHTLESS_MIN or ort_large.needs_external(model):
                    return _weightless_session(model, threads, edit)  # the weights beside the bytes
                with inline_external_data(model):
                    proto = ir.serde.serialize_model(model)
                proto.ir_version = min(proto.ir_version, max_ir_version())
                if edit is not None:
                    edit(proto)
            elif edit is not None:
                raise TypeError("make_session(edit=...) takes an ir.Model")
            elif model.ir_version > max_ir_version():
                proto = _with_ir_version(model, max_ir_version())
            else:
                proto = model
            data = proto.SerializeToString()
            return ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        try:
            return ort.InferenceSession(
                os.fspath(model), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception:  # noqa: BLE001
            if _file_ir_version(model) <= max_ir_version():
                raise
        from graphc.core.io import load_model  # a file newer than ORT: through the in-memory path

        return make_session(load_model(model), threads=threads, what=what)
    except GraphcError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(_custom_op_text(first, what) or f"ONNX Runtime cannot load the {what}: {first}") from None


# Weights above which an in-memory model reaches ONNX Runtime as a weightless protobuf plus its
# arrays (SessionOptions.add_external_initializers), not as one serialized message: for SmolLM2's
# 540 MB a session in 0.5-0.9 s instead of 3.6-7.7 s on an AVX2 EPYC, outputs bit-identical
# (protobuf serializes and ORT parses the whole message; bench/bench_sweep.py --sessions).
WEIGHTLESS_MIN = 64 << 20


def _weightless_session(model: ir.Model, threads: int | None,
                        edit: Callable[[onnx.ModelProto], None] | None = None) -> ort.InferenceSession:
    """A session whose large initializers are handed over as arrays. ONNX Runtime 1.32 copies
    them into its own tensors while it builds the session (tests/test_ort_large.py checks that a
    later in-place change of the model's weights does not reach it, as with the serialized path)."""
    from graphc.core import ort_large
    from graphc.core.io import inline_external_data

    with inline_external_data(model, initializers=False):  # subgraphs and tensor attributes into the bytes
        proto, arrays = ort_large.weightless_proto(model)  # IR version capped as ORT loads it
    if edit is not None:
        edit(proto)
        from graphc.core.calibrate import _names_read

        used = {o.name for o in proto.graph.output}.union(*(_names_read(n) for n in proto.graph.node))
        if any(name not in used for name in arrays):  # an initializer only left-out nodes read
            kept = [t for t in proto.graph.initializer if t.name in used or t.name not in arrays]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(kept)
            arrays = {name: a for name, a in arrays.items() if name in used}
    return ort_large.session_from_proto(proto, arrays, threads=threads)


def _register_extensions(so: ort.SessionOptions) -> None:
    """Custom ops of onnxruntime-extensions (ai.onnx.contrib: tokenizers, audio, image
    decoding) where that package is installed; nothing otherwise."""
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        return
    so.register_custom_ops_library(get_library_path())


def _custom_op_text(ort_message: str, what: str) -> str | None:
    """One line for ORT's refusal of an op from a custom domain, or None for other errors."""
    import re

    from graphc.core.model_checks import known_domains

    found = re.search(r"([\w.]+):(\w+)\(-?\d+\) is not a registered function/op", ort_message)
    if found is None or found.group(1) in known_domains():
        return None
    domain, op = found.groups()
    hint = " (pip install onnxruntime-extensions)" if domain == "ai.onnx.contrib" else ""
    after = "" if "calibration" in what else "; validate where it runs, or pass --no-validate"
    return f"ONNX Runtime cannot run the {what}: op {op!r} of custom domain {domain!r} has no kernel here{hint}{after}"


def _with_ir_version(proto: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``proto`` with another IR version (the caller's proto stays as it is)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.ir_version = version
    return copy


def _file_ir_version(path: str | os.PathLike) -> int:
    """The IR version of a model file, read without its weights; 0 if it cannot be read
    (ORT then says why)."""
    try:
        return onnx.load(os.fspath(path), load_external_data=False).ir_version
    except Exception:  # noqa: BLE001
        return 0

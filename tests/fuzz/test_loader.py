"""Fuzz graphc.core.io.load_model with mutated model files: a model comes back or graphc's typed
error (a ModelLoadError, one line naming the file), never another exception, a crash, a hang
or a large allocation. Each load must finish in LOAD_SECONDS; files that declare huge tensors
are refused without allocating them (checked under an address-space limit in a child
process, where an allocation would fail loudly instead of swapping).

tests/test_bad_input.py fuzzes the loader with random bytes and byte edits of a tiny MLP
(200 examples); this module mutates whole transformer graphs structurally (tensor dims and
types, external data entries, ops, domains, edges, opsets, IR versions, subgraphs, local
functions) and bytewise, with a time and memory bound on every input.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphc.core import io
from graphc.core.errors import GraphcError, ModelLoadError
from graphc.core.registry import get_pass
from tests.fuzz.harness import is_crash
from tests.fuzz.strategies import Spec, build

LOAD_SECONDS = 2.0  # per input
LOAD_MEGABYTES = 300  # peak RSS growth allowed over the whole fuzz run (inputs are < 100 kB)
PASSES_ON_LOADED = ("fold-constants", "fuse-ort", "quantize-int8")
PASS_SECONDS = 10.0

_BASES = [
    build(Spec(hidden=8, heads=2, vocab=40, layers=1, lm_head=True)).SerializeToString(),
    build(Spec(hidden=8, heads=1, vocab=40, layers=1, style="legacy", linear="gemm", opset=20,
               norm="layernorm_decomposed", act="gelu_op", mask="both")).SerializeToString(),
]

_HUGE = [0, 1, -1, 3, 10**12, 2**31, 2**40, 2**62, 2**63 - 1]
_IR_VERSIONS = [-1, 0, 1, 2, 3, 7, 8, 11, 13, 14, 15, 100, 2**40]
_OPSETS = [-1, 0, 1, 6, 13, 16, 17, 23, 24, 30, 10**6]
_OP_TYPES = ["Add", "MatMul", "Gemm", "Reshape", "Constant", "If", "Loop", "Frobnicate", "", "Softmax",
             "LayerNormalization", "SimplifiedLayerNormalization", "MultiHeadAttention", "QAttention"]
_DOMAINS = ["", "ai.onnx", "com.microsoft", "ai.onnx.ml", "ai.onnxruntime._fusion", "x.y", "pkg.onnxscript.torch_lib"]
_LOCATIONS = ["w.bin", "../w.bin", "/etc/passwd", "a\0b", "", "C:/w.bin", "http://x/w", "sub/../../w", ".", "w.bin/"]
_NUMBERS = ["0", "-1", "abc", "4", "99999999999999999999", "1e3", " 8"]


def _mutate(proto: onnx.ModelProto, op: tuple, rng: np.random.Generator) -> None:
    g = proto.graph
    kind, i, v = op
    if kind == "dims" and g.initializer:
        t = g.initializer[i % len(g.initializer)]
        if t.dims:
            t.dims[i % len(t.dims)] = _HUGE[v % len(_HUGE)]
        else:
            t.dims.append(_HUGE[v % len(_HUGE)])
    elif kind == "dtype" and g.initializer:
        g.initializer[i % len(g.initializer)].data_type = [-1, 0, 1, 7, 8, 10, 16, 17, 21, 23, 25, 99][v % 12]
    elif kind == "raw" and g.initializer:
        t = g.initializer[i % len(g.initializer)]
        t.raw_data = rng.bytes(v % 64)
    elif kind == "external" and g.initializer:
        t = g.initializer[i % len(g.initializer)]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", _LOCATIONS[v % len(_LOCATIONS)]), ("offset", _NUMBERS[v % 7]),
                           ("length", _NUMBERS[(v // 7) % 7])):
            if (v >> 3) % 2 or key == "location":
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    elif kind == "op" and g.node:
        g.node[i % len(g.node)].op_type = _OP_TYPES[v % len(_OP_TYPES)]
    elif kind == "domain" and g.node:
        g.node[i % len(g.node)].domain = _DOMAINS[v % len(_DOMAINS)]
    elif kind == "input" and g.node:
        node = g.node[i % len(g.node)]
        names = [n for other in g.node for n in other.output] + ["", "nowhere"]
        if node.input:
            node.input[v % len(node.input)] = names[v % len(names)]
        else:
            node.input.append(names[v % len(names)])
    elif kind == "output" and g.node:
        node = g.node[i % len(g.node)]
        names = [n for other in g.node for n in other.output] + [t.name for t in g.initializer] + ["input_ids"]
        node.output[0] = names[v % len(names)]
    elif kind == "swap" and len(g.node) > 1:
        a, b = i % len(g.node), v % len(g.node)
        na, nb = onnx.NodeProto(), onnx.NodeProto()
        na.CopyFrom(g.node[a])
        nb.CopyFrom(g.node[b])
        g.node[a].CopyFrom(nb)
        g.node[b].CopyFrom(na)
    elif kind == "delete" and g.node:
        del g.node[i % len(g.node)]
    elif kind == "attr" and g.node:
        node = g.node[i % len(g.node)]
        choices = [
            helper.make_attribute("perm", [v % 5, -1, 2**40]),
            helper.make_attribute("axis", _HUGE[v % len(_HUGE)] * (-1 if v % 2 else 1)),
            helper.make_attribute("to", v % 30),
            helper.make_attribute("epsilon", float("nan")),
            helper.make_attribute("value", numpy_helper.from_array(np.zeros((2, 2), np.float32))),
            helper.make_attribute("num_heads", 0),
        ]
        del node.attribute[:]
        node.attribute.append(choices[v % len(choices)])
    elif kind == "ir":
        proto.ir_version = _IR_VERSIONS[v % len(_IR_VERSIONS)]
    elif kind == "opset":
        if v % 3 == 0:
            proto.opset_import.add(domain=_DOMAINS[i % len(_DOMAINS)], version=_OPSETS[v % len(_OPSETS)])
        else:
            proto.opset_import[0].version = _OPSETS[v % len(_OPSETS)]
    elif kind == "value_info":
        values = list(g.input) + list(g.output)
        value = values[i % len(values)]
        tt = value.type.tensor_type
        if v % 3 == 0:
            tt.elem_type = [0, 8, 16, 99][v % 4]
        elif tt.shape.dim:
            tt.shape.dim[v % len(tt.shape.dim)].dim_value = _HUGE[v % len(_HUGE)] & (2**63 - 1)
    elif kind == "subgraph" and g.node:
        # wrap a node into If(cond) { node } else { Identity }, nested v % 4 + 1 times (the
        # else branch stays small: copying the node into both would double the file per level)
        node = g.node[i % len(g.node)]
        inner = onnx.NodeProto()
        inner.CopyFrom(node)
        out = node.output[0] if node.output else "y"
        for depth in range(v % 4 + 1):
            then = helper.make_graph([inner], f"then{depth}", [], [helper.make_value_info(out, onnx.TypeProto())])
            other = helper.make_graph([helper.make_node("Identity", ["input_ids"], [out])], f"else{depth}", [],
                                      [helper.make_value_info(out, onnx.TypeProto())])
            inner = helper.make_node("If", ["input_ids" if v % 2 else "cond"], [out], then_branch=then, else_branch=other)
        node.CopyFrom(inner)
    elif kind == "function":
        # a model-local function; v odd: it calls itself (inlining would never end)
        callee = "self_loop" if v % 2 else "Relu"
        domain = "local" if v % 2 else ""
        fn = helper.make_function("local", "self_loop", ["x"], ["y"], [helper.make_node(callee, ["x"], ["y"], domain=domain)],
                                  [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
        proto.functions.append(fn)
        proto.opset_import.add(domain="local", version=1)
        if g.node:
            node = g.node[i % len(g.node)]
            if len(node.input) >= 1 and len(node.output) == 1:
                node.op_type, node.domain = "self_loop", "local"
                del node.input[1:]
                del node.attribute[:]
    elif kind == "metadata":
        entry = proto.metadata_props.add()
        entry.key, entry.value = ["graphc.model_recipe", "graphc.arch.num_heads", "x" * 300][v % 3], ["minilm", "-3", "\x00"][i % 3]


_KINDS = ["dims", "dtype", "raw", "external", "op", "domain", "input", "output", "swap", "delete", "attr",
          "ir", "opset", "value_info", "subgraph", "function", "metadata"]
_op = st.tuples(st.sampled_from(_KINDS), st.integers(0, 1000), st.integers(0, 1000))


def _bytes_edit(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    b = bytearray(data)
    for pos, chunk in edits:
        pos %= max(len(b), 1)
        b[pos:pos + len(chunk)] = chunk
    return bytes(b)


@st.composite
def mutated_files(draw) -> bytes:
    base = draw(st.sampled_from(_BASES))
    proto = onnx.ModelProto()
    proto.ParseFromString(base)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for op in draw(st.lists(_op, min_size=1, max_size=4)):
        _mutate(proto, op, rng)
    data = proto.SerializeToString()
    if draw(st.integers(0, 4)) == 0:  # and sometimes a few raw byte edits on top
        data = _bytes_edit(data, draw(st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=4)), max_size=3)))
    return data


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_STATE = {"start_rss": None, "slowest": 0.0, "outcomes": {}}


@settings(
    # 210 files in `make test`; `make fuzz` (GRAPHC_FUZZ_EXAMPLES=200) tries 1,400
    derandomize=True, max_examples=7 * int(os.environ.get("GRAPHC_FUZZ_EXAMPLES", "30")), deadline=None,
    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_files())
def test_mutated_transformer_files_load_or_refuse_quickly(tmp_path_factory, data):
    if _STATE["start_rss"] is None:
        _STATE["start_rss"] = _rss_mb()
    path = tmp_path_factory.getbasetemp() / "mutated.onnx"
    path.write_bytes(data)
    (path.parent / "w.bin").write_bytes(b"\0" * 64)  # a real external file for some locations
    start = time.perf_counter()
    try:
        io.load_model(path)
        outcome = "loaded"
    except GraphcError as e:
        assert isinstance(e, ModelLoadError), repr(e)
        assert "\n" not in str(e) and str(e).startswith(f"{path}: "), str(e)
        outcome = type(e).__name__
    elapsed = time.perf_counter() - start
    _STATE["slowest"] = max(_STATE["slowest"], elapsed)
    _STATE["outcomes"][outcome] = _STATE["outcomes"].get(outcome, 0) + 1
    assert elapsed < LOAD_SECONDS, f"load took {elapsed:.2f} s"
    assert _rss_mb() - _STATE["start_rss"] < LOAD_MEGABYTES, "the loader allocated far more than the file holds"
    if outcome == "loaded":  # a valid but odd model: the generic passes refuse or cope, never crash
        for name in PASSES_ON_LOADED:
            model = io.load_model(path)
            start = time.perf_counter()
            try:
                get_pass(name)()(model)
            except GraphcError as e:
                assert not is_crash(e), f"{name} crashed on a loadable model: {e!r} from {e.__cause__!r}"
            assert time.perf_counter() - start < PASS_SECONDS, name


# --------------------------------------------------------------------------- huge declarations


def _huge_cases() -> dict[str, onnx.ModelProto]:
    """Small files that declare tensors of 10^12 elements and more, in every place a tensor
    can sit: initializer (no data, short raw data, typed data), Constant attribute,
    external data (length and offset), sparse initializer, subgraph."""
    def model(nodes, inits=(), sparse=()):
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], list(inits), sparse_initializer=list(sparse),
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    add = [helper.make_node("Add", ["x", "w"], ["y"])]
    cases = {
        "initializer_no_data": model(add, [TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**6, 10**6])]),
        "initializer_short_raw": model(add, [TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**12], raw_data=b"\0" * 4)]),
        "initializer_overflowing_dims": model(add, [TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**62, 2**62], float_data=[1.0])]),
        "initializer_string": model(add, [TensorProto(name="w", data_type=TensorProto.STRING, dims=[10**12], string_data=[b"a"])]),
        "initializer_int4": model(add, [TensorProto(name="w", data_type=TensorProto.INT4, dims=[10**12], int32_data=[1])]),
        "constant_attribute": model([
            helper.make_node("Constant", [], ["w"], value=TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[10**12], raw_data=b"\0" * 4)),
            *add,
        ]),
        "subgraph_constant": model([
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
            helper.make_node("If", ["c"], ["w"], then_branch=helper.make_graph(
                [helper.make_node("Constant", [], ["t"], value=TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[10**12]))],
                "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [10**12])]),
                else_branch=helper.make_graph(
                [helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.zeros(2, np.float32)))],
                "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])),
            *add,
        ]),
        "sparse_initializer": model(add, sparse=[helper.make_sparse_tensor(
            numpy_helper.from_array(np.ones(1, np.float32), "w"), numpy_helper.from_array(np.zeros(1, np.int64), "i"), [10**12])]),
    }
    for name, (offset, length) in {"external_length": ("0", str(4 * 10**12)), "external_offset": (str(10**15), "8")}.items():
        t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**12], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "w.bin"), ("offset", offset), ("length", length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        cases[name] = model(add, [t])
    return cases


_CHILD = r"""
import json, resource, sys, time
from graphc.core import io
from graphc.core.errors import GraphcError
io.load_model(sys.argv[2])  # warm up imports and caches before the limit
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]) * 2**20, hard))
out = {}
for path in sys.argv[3:]:
    start = time.perf_counter()
    try:
        if path == "ALLOCATE-1GiB":  # negative control: the limit is real
            bytearray(1 << 30)
        else:
            io.load_model(path)
        result = "loaded"
    except GraphcError as e:
        result = type(e).__name__ + ": " + str(e)
    except BaseException as e:
        result = "CRASH " + type(e).__name__ + ": " + str(e)
    out[path] = [result, time.perf_counter() - start]
print(json.dumps(out))
"""


def test_huge_declared_tensors_are_refused_without_allocating(tmp_path):
    cases = _huge_cases()
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    paths = []
    for name, proto in cases.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(proto.SerializeToString())
        assert path.stat().st_size < 1000
        paths.append(str(path))
    good = tmp_path / "good.onnx"
    good.write_bytes(_BASES[0])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "512", str(good), *paths, "ALLOCATE-1GiB"],  # 512 MiB over the warm process
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("ALLOCATE-1GiB")[0].startswith("CRASH MemoryError")
    assert len(results) == len(cases)
    for path, (result, seconds) in results.items():
        name = Path(path).stem
        assert not result.startswith("CRASH"), f"{name}: {result}"
        assert result != "loaded", f"{name}: a model declaring 10^12 elements was accepted"
        assert result.split(":")[0] in ("ModelLoadError", "InvalidModelError", "ExternalDataError"), result
        assert any(k in result for k in ("declares shape", "truncated", "too small", "sparse initializer")), result
        assert seconds < LOAD_SECONDS, f"{name}: {seconds:.2f} s"


# --------------------------------------------------------------------------- test_bad_input's inputs, timed

from tests.test_bad_input import _inputs as _bad_input_bytes  # noqa: E402 - its random bytes and byte edits


@settings(derandomize=True, max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bad_input_bytes)
def test_bad_input_fuzz_inputs_load_within_the_time_bound(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "bad_input_fuzz.onnx"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        io.load_model(path)
    except ModelLoadError:
        pass
    assert time.perf_counter() - start < LOAD_SECONDS

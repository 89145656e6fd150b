"""Unbounded time and memory, and untidy failure: synthesized inputs have a byte budget,
validation a time budget, Ctrl-C and SIGTERM end a run in one line at any point, fold-constants
is linear on long chains, mistyped recipes fail before any work, and nothing but graphc's own
lines reaches the terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.front.cli import main
from tests.conftest import GRAPHC_BIN, Snapshot, tiny_model_proto


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _relu(dims, path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRAPHC_DEBUG"}


# ------------------------------------------------------------------ synthesized inputs: a byte budget


@pytest.mark.parametrize("dims, shown", [([60000, 60000], "[60000, 60000]"),
                                         ([f"d{i}" for i in range(8)], "[2, 16, 16, 16, 16, 16, 16, 16]")])
def test_synthesized_inputs_have_a_byte_budget(dims, shown, tmp_path, capsys):
    src = _relu(dims, tmp_path / "m.onnx")
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "cleanup"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"graphc: error: {src}: cannot synthesize validation input 'x' of shape {shown}"), err
    assert "limited to 256 MiB" in err
    before.assert_unchanged()
    assert _files(tmp_path) == files


# ------------------------------------------------------------------ a Loop that never ends


def _endless_loop(path: Path) -> Path:
    body = helper.make_graph(
        [helper.make_node("Add", ["x_in", "one"], ["x_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "c", "x"], ["y"], body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array(10**12, np.int64), "n"), numpy_helper.from_array(np.array(True), "c")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize("command", ["compress", "validate"])
def test_validation_time_budget_stops_an_endless_loop(command, tmp_path, capsys):
    src = _endless_loop(tmp_path / "m.onnx")
    before, files = Snapshot(tmp_path), _files(tmp_path)
    argv = (["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "cleanup"] if command == "compress"
            else ["validate", str(src), str(src)])
    start = time.monotonic()
    code = main([*argv, "--validate-timeout", "1.5"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "ran past its time limit of 1.5 s (ONNX Runtime stopped)" in err
    assert elapsed < 30
    before.assert_unchanged()
    assert _files(tmp_path) == files


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_validate_timeout_must_be_positive_seconds(value, tmp_path, capsys):
    code = main(["compress", "m.onnx", "-o", str(tmp_path / "o.onnx"), "--validate-timeout", value])
    assert code == 2  # a usage error: one line, exit 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_default_time_limit_grows_with_the_model():
    from graphc.core.interrupt import default_time_limit

    assert default_time_limit(0) == 300 and default_time_limit(10**9) == 300 + 600


SIGNAL_IN_ORT = textwrap.dedent("""
    import sys
    from graphc.core import interrupt
    from graphc.front.cli import main

    real = interrupt.run_session

    def announced(*args, **kwargs):
        print("RUNNING", flush=True)
        return real(*args, **kwargs)

    interrupt.run_session = announced
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_onnx_runtime_runs_ends_cleanly(sig, code, tmp_path):
    src = _endless_loop(tmp_path / "m.onnx")
    before, files = Snapshot(tmp_path), _files(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_IN_ORT, "compress", str(src), "-o", str(tmp_path / "o.onnx"),
                             "--recipe", "cleanup", "--validate-timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "RUNNING"
        time.sleep(0.5)  # inside session.run, in the Loop
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert took < 30
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_early_ctrl_c_prints_one_line(tmp_path):
    """SIGINT while graphc is still importing its dependencies."""
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(), src)
    proc = subprocess.Popen([str(GRAPHC_BIN), "compress", str(src), "-o", str(tmp_path / "o.onnx")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    # graphc's heavy imports (numpy, onnx, ONNX Runtime) happen inside main(): wait for numpy's
    # library to be mapped (Linux), then interrupt while the rest is still loading
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "numpy" in maps.read_text():
                break
        except OSError:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "graphc: interrupted\n", err
    assert _files(tmp_path) == {"m.onnx"}


# ------------------------------------------------------------------ fold-constants is linear


def _chain(n: int, start: str):
    import onnx_ir as ir

    nodes, prev = [], start
    for i in range(n):
        nodes.append(helper.make_node("Add", [prev, "one"], [f"v{i}"]))
        prev = f"v{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "one")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _fold(model) -> None:
    from graphc.core.pass_base import PassContext
    from graphc.core.registry import get_pass

    get_pass("fold-constants").from_dict({}, PassContext())(model)


def test_fold_constants_looks_at_each_node_a_bounded_number_of_times(monkeypatch):
    """Node.op_identifier calls grow linearly with the chain (the multi-output rewrite rule used
    to index the whole graph on every node: quadratic)."""
    import onnx_ir as ir

    calls = {"n": 0}
    real = ir.Node.op_identifier

    def counted(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(ir.Node, "op_identifier", counted)
    counts = []
    for n in (300, 1200):
        calls["n"] = 0
        _fold(_chain(n, "x"))
        counts.append(calls["n"])
    assert counts[1] < 5 * counts[0], counts  # 4x the nodes: ~4x the work (quadratic: ~16x)


def test_folded_chain_metadata_stays_small():
    """Each folded value records its direct inputs, not the whole chain behind it."""
    model = _chain(400, "one")
    _fold(model)
    from onnxscript.optimizer import FOLDED_FROM_KEY

    sizes = [len(v.metadata_props.get(FOLDED_FROM_KEY, "")) for v in model.graph.initializers.values()]
    assert max(sizes, default=0) < 100, max(sizes)


# ------------------------------------------------------------------ recipes: typed options, before any work


RECIPES = {
    "bool-as-string": ('name = "x"\n[[passes]]\nname = "quantize-int8"\noptions = { per_channel = "no" }\n',
                       "option per_channel must be a boolean (true or false), not a string ('no')"),
    "table-for-number": ('name = "x"\n[[passes]]\nname = "quantize-int8"\noptions = { min_elements = { a = 1 } }\n',
                         "option min_elements must be an integer, not a table"),
    "bool-for-number": ('name = "x"\n[[passes]]\nname = "fp16-constants"\noptions = { max_rel_error = true }\n',
                        "option max_rel_error must be a number, not a boolean"),
    "string-for-array": ('name = "x"\n[[passes]]\nname = "quantize-int8"\noptions = { exclude = "head" }\n',
                         "option exclude must be an array of strings, not a string"),
    "extends-list": ('name = "x"\nextends = ["int8"]\n', "'extends' must be a string"),
    "tolerance-string": ('name = "x"\nextends = "int8"\n[tolerance]\nmin_cosine = "high"\n',
                         "tolerance min_cosine must be a number"),
    "pass-name-number": ('name = "x"\n[[passes]]\nname = 3\n', "passes[0].name must be a string"),
    "deep-toml": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deep"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_mistyped_recipe_fails_before_any_work(case, tmp_path, capsys):
    text, fragment = RECIPES[case]
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(), src)
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"graphc: error: {recipe}: ") and fragment in err, err
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_well_typed_options_still_load():
    from graphc.core.recipes import recipe_from_dict

    recipe = recipe_from_dict({"passes": [{"name": "quantize-int8", "options": {"per_channel": False, "exclude": ["a"]}},
                                          {"name": "fp16-constants", "options": {"max_rel_error": 1}}]})
    assert [s.pass_name for s in recipe.steps] == ["quantize-int8", "fp16-constants"]


# ------------------------------------------------------------------ terminal hygiene


def _nan_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _initializer_output_model(path: Path) -> Path:
    """An output that is an initializer: onnx_ir's deduplication logs a warning about it."""
    k = numpy_helper.from_array(np.ones(4, np.float32), "k")
    k2 = numpy_helper.from_array(np.ones(4, np.float32), "k2")
    graph = helper.make_graph([helper.make_node("Add", ["x", "k2"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, [4])], [k, k2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize("builder", [_nan_model, _initializer_output_model])
def test_nothing_but_graphc_lines_on_stderr(builder, tmp_path):
    src = builder(tmp_path / "m.onnx")
    proc = subprocess.run([str(GRAPHC_BIN), "compress", str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "cleanup"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_inspect_escapes_control_characters(tmp_path, capsys):
    evil = "x\x1b]0;pwned\x07"
    graph = helper.make_graph([helper.make_node("Relu", [evil], ["y"], name="n\x1b[2J")], "g",
                              [helper.make_tensor_value_info(evil, TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, {"evil\x1b[31m": "red\x9b2J\nfake line"})
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b")
    assert "x\\x1b]0;pwned\\x07" in out and "red\\x9b2J\\nfake line" in out
    assert not any(line.startswith("fake line") for line in out.splitlines())


def test_library_warnings_and_log_lines_stay_off_the_terminal(monkeypatch, capsys):
    """What numpy and onnx_ir emit on odd models (RuntimeWarnings on NaN/overflow, onnx_ir's
    'Skipped deduplication' WARNING with no logging configured) does not reach stderr."""
    import logging
    import warnings

    from graphc.front import cli

    def noisy(args):
        warnings.warn("invalid value encountered in divide", RuntimeWarning)
        np.float32(3e38) * np.float32(10)  # overflow: numpy's own RuntimeWarning
        logging.getLogger("onnx_ir.passes.common.initializer_deduplication").warning(
            "Skipped deduplication of initializer 'k' as it is a graph input or output")
        return 0

    monkeypatch.delenv("GRAPHC_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_passes", noisy)
    assert main(["passes"]) == 0
    assert capsys.readouterr().err == ""
    # and GRAPHC_DEBUG lets them through
    monkeypatch.setenv("GRAPHC_DEBUG", "1")
    with pytest.warns(RuntimeWarning):
        main(["passes"])

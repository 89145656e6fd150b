"""Hostile paths: graphc never replaces a file it did not write in this run, never writes
into a pipe or a device, and never reads external data from outside the model's folder,
wherever in the model the tensor sits. Each case: the hostile setup is built here, the
outcome is one line (or the documented success), the inputs are byte-identical afterwards,
and no file appears besides the named outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphc.front.cli import main
from tests.conftest import GRAPHC_BIN, Snapshot, save_external, temp_leftovers, tiny_model_proto


def _one_line(err: str, path, fragment: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"graphc: error: {path}: "), err
    assert fragment in lines[0], err


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(), path)
    return path


# ------------------------------------------------------------------ report, -o, dump-dir vs inputs


def test_compress_report_onto_the_input_is_refused(model, tmp_path, capsys):
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, out, err = _run(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--report", str(model),
                           "--recipe", "cleanup"], capsys)
    assert code == 1 and out == ""
    _one_line(err, model, "report would overwrite the input")
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_compress_report_onto_the_input_data_file_is_refused(tmp_path, capsys):
    src = save_external(tiny_model_proto(), tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(data),
                         "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, data, "report would overwrite the input")
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_compress_report_same_as_output_is_refused(model, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(model), "-o", str(out), "--report", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, out, "would be the same file")
    before.assert_unchanged()
    assert _files(tmp_path) == files


@pytest.mark.parametrize("which", ["original", "rewritten", "rewritten-data"])
def test_report_command_onto_an_input_is_refused(which, model, tmp_path, capsys):
    rewritten = save_external(tiny_model_proto(seed=1), tmp_path / "r.onnx")
    target = {"original": model, "rewritten": rewritten, "rewritten-data": tmp_path / "r.onnx.data"}[which]
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, out, err = _run(["report", str(model), str(rewritten), "-o", str(target), "--no-latency"], capsys)
    assert code == 1 and out == ""
    _one_line(err, target, "report would overwrite the input")
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_output_onto_a_symlink_to_the_input_data_is_refused(tmp_path, capsys):
    src = save_external(tiny_model_proto(), tmp_path / "in" / "m.onnx")
    (tmp_path / "o.onnx.data").symlink_to(src.parent / "m.onnx.data")
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, out, "would overwrite the input")
    before.assert_unchanged()
    assert _files(tmp_path) == files


# dump files are named NN-<pass>.onnx by the step's position among the enabled passes: in the
# cleanup recipe, 02-fold-constants.onnx and 06-shape-inference.onnx
@pytest.mark.parametrize("case", ["input-named-like-dump", "input-data-named-like-dump", "unrelated-existing-file"])
def test_dump_dir_never_replaces_a_file(case, tmp_path, capsys):
    dump = tmp_path / "dump"
    dump.mkdir()
    if case == "input-named-like-dump":
        src = dump / "02-fold-constants.onnx"
        onnx.save(tiny_model_proto(), src)
        clash = src
    elif case == "input-data-named-like-dump":
        src = save_external(tiny_model_proto(), dump / "m.onnx", location="02-fold-constants.onnx")
        clash = dump / "02-fold-constants.onnx"
    else:
        src = tmp_path / "m.onnx"
        onnx.save(tiny_model_proto(), src)
        clash = dump / "06-shape-inference.onnx.data"
        clash.write_bytes(b"someone else's file")
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--dump-dir", str(dump), "--recipe", "cleanup"], capsys)
    assert code == 1
    fragment = "exists already" if case == "unrelated-existing-file" else "would overwrite the input"
    _one_line(err, clash, fragment)
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_dump_dir_with_other_files_is_used_and_they_stay(model, tmp_path, capsys):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "notes.txt").write_bytes(b"mine")
    before = Snapshot(model, dump / "notes.txt")
    code, _, err = _run(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--dump-dir", str(dump),
                         "--recipe", "cleanup", "--no-validate"], capsys)
    assert code == 0, err
    before.assert_unchanged()
    assert all(p.name == "notes.txt" or p.name[:3].rstrip("-").isdigit() for p in dump.iterdir())


def test_dump_save_refuses_a_file_that_appeared_during_the_run(model, tmp_path):
    """The up-front check cannot see a file created later; the save itself links into place."""
    from graphc.core import io
    from graphc.core.errors import SaveError

    target = tmp_path / "late.onnx"
    target.write_bytes(b"appeared")
    with pytest.raises(SaveError, match="exists already"):
        io.save_model(io.load_model(model), target, must_be_new=True)
    assert target.read_bytes() == b"appeared" and temp_leftovers(tmp_path) == []


# ------------------------------------------------------------------ pipes, devices, folders


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "char-device":
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a /dev/null twin
    else:
        path.mkdir()
        (path / "keep").write_bytes(b"x")
    return path


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
@pytest.mark.parametrize("where", ["output", "sidecar", "report"])
def test_output_onto_a_special_file_is_refused(kind, where, model, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    special = {"output": out, "sidecar": tmp_path / "o.onnx.data", "report": tmp_path / "r.html"}[where]
    _special(kind, special)
    argv = ["compress", str(model), "-o", str(out), "--recipe", "cleanup"]
    if where == "report":
        argv += ["--report", str(special)]
    before, files = Snapshot(model), _files(tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 1
    what = {"fifo": "a named pipe (fifo)", "char-device": "a character device"}[kind]
    _one_line(err, out if where != "report" else special, f"is {what}, not a regular file")
    mode = os.stat(special).st_mode
    assert (os.path.stat.S_ISFIFO(mode) if kind == "fifo" else os.path.stat.S_ISCHR(mode))
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_output_into_an_existing_folder_is_named_after_the_input(model, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    before = Snapshot(model)
    code, out, err = _run(["compress", str(model), "-o", str(folder), "--recipe", "cleanup"], capsys)
    assert code == 0, err
    assert _files(folder) == {"m.onnx"} and f"→ {folder / 'm.onnx'}" in out
    before.assert_unchanged()


def test_output_with_a_trailing_slash_creates_the_folder(model, tmp_path, capsys):
    before = Snapshot(model)
    code, _, err = _run(["compress", str(model), "-o", str(tmp_path / "new" / "sub") + "/", "--recipe", "cleanup"],
                        capsys)
    assert code == 0, err
    assert _files(tmp_path / "new") == {"sub", "sub/m.onnx"}
    before.assert_unchanged()


def test_output_folder_of_the_input_is_refused(model, tmp_path, capsys):
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(model), "-o", str(tmp_path) + "/", "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, tmp_path / "m.onnx", "would overwrite the input")
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_missing_output_folder_is_not_left_behind_on_failure(tmp_path, capsys):
    """The folder -o creates appears only with a written model: a run that misses its
    tolerance leaves nothing."""
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(hidden=64), src)
    out = tmp_path / "new" / "o.onnx"
    recipe = tmp_path / "strict.toml"
    recipe.write_text('name = "strict"\nextends = "int8"\n[tolerance]\nmax_abs = 0.0\n')
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", str(recipe)], capsys)
    assert code == 3, err
    assert _files(tmp_path) == files
    before.assert_unchanged()


# ------------------------------------------------------------------ report and output folders, names


def _readonly_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes into a chmod 555 folder; /proc/self takes no new files
        return Path("/proc/self")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("case", ["missing-folder", "read-only-folder", "long-name", "output-long-name"])
def test_unwritable_outputs_fail_before_any_work(case, model, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.html"
    fragment = {"missing-folder": "report folder does not exist", "read-only-folder": "report folder is not writable",
                "long-name": "report file name is 300 bytes", "output-long-name": "output file name is 300 bytes"}[case]
    if case == "missing-folder":
        report = tmp_path / "nope" / "r.html"
    elif case == "read-only-folder":
        report = _readonly_folder(tmp_path) / "r.html"
    elif case == "long-name":
        report = tmp_path / ("r" * 295 + ".html")
    else:
        out = tmp_path / ("o" * 295 + ".onnx")
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(model), "-o", str(out), "--report", str(report), "--recipe", "cleanup"],
                        capsys)
    assert code == 1
    _one_line(err, out if case == "output-long-name" else report, fragment)
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_output_name_without_room_for_the_data_sidecar_is_refused(model, tmp_path, capsys):
    out = tmp_path / ("o" * 247 + ".onnx")  # 252 bytes: the name fits, "<name>.data" would not
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(model), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, out, "with the '.data' sidecar suffix")
    before.assert_unchanged()
    assert _files(tmp_path) == files


# ------------------------------------------------------------------ signals during save


SAVE_THEN_WAIT = textwrap.dedent("""
    import sys, time
    import onnx_ir
    from graphc.core import io
    from graphc.front.cli import main

    real_save, real_single = onnx_ir.save, io.write_single_file

    def slow(real):
        def save(*args, **kwargs):
            real(*args, **kwargs)           # a complete model sits in the temporary folder
            print("SAVING", flush=True)
            time.sleep(60)                   # ... when the signal arrives
        return save

    io.ir.save, io.write_single_file = slow(real_save), slow(real_single)
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_save_removes_the_temporary_folder(sig, model, tmp_path):
    out = tmp_path / "o" / "o.onnx"
    before, files = Snapshot(model), _files(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GRAPHC_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-c", SAVE_THEN_WAIT, "compress", str(model), "-o", str(out),
                             "--recipe", "cleanup", "--no-validate"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        assert temp_leftovers(tmp_path), "the save should be under way in a temporary folder"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert temp_leftovers(tmp_path) == []
    assert _files(tmp_path) == files  # not even the folder -o created
    before.assert_unchanged()


# ------------------------------------------------------------------ external data everywhere in the model


def _function_model(location: str, folder: Path) -> Path:
    """y = x + f(x), the local function's Constant holding external data at ``location``."""
    const = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    const.ClearField("raw_data")
    const.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        entry = const.external_data.add()
        entry.key, entry.value = k, v
    fn = helper.make_function(
        "local", "addc", ["a"], ["b"],
        [helper.make_node("Constant", [], ["k"], value=const), helper.make_node("Add", ["a", "k"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("addc", ["x"], ["t"], domain="local"), helper.make_node("Add", ["x", "t"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(graph, functions=[fn], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fn.onnx"
    onnx.save(proto, path)
    return path


SECRET = np.array([1e6, 2e6, 3e6, 4e6], np.float32).tobytes()


def test_function_constant_is_not_read_from_the_working_directory(tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(cwd)
    src = _function_model("secret.txt", tmp_path / "models")
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, src, "external data file 'secret.txt' is missing")
    before.assert_unchanged()
    assert _files(tmp_path) == files


@pytest.mark.parametrize("location", ["../secret.txt", "ABSOLUTE", "link.bin"])
def test_function_constant_cannot_escape_the_model_folder(location, tmp_path, capsys):
    (tmp_path / "secret.txt").write_bytes(SECRET)
    folder = tmp_path / "models"
    folder.mkdir()
    if location == "ABSOLUTE":
        location = str(tmp_path / "secret.txt")
    if location == "link.bin":
        (folder / "link.bin").symlink_to(tmp_path / "secret.txt")
    src = _function_model(location, folder)
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, src, "resolves outside the model's folder")
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_function_constant_beside_the_model_is_read_from_there(tmp_path, capsys, monkeypatch):
    """The legitimate case: the bytes come from the model's folder, whatever the working directory."""
    folder = tmp_path / "models"
    src = _function_model("const.bin", folder)
    (folder / "const.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "const.bin").write_bytes(SECRET)
    monkeypatch.chdir(decoy)
    out = tmp_path / "o.onnx"
    before = Snapshot(folder, decoy)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 0, err
    before.assert_unchanged()
    import onnxruntime as ort

    x = np.ones(4, np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x + x + np.arange(4, dtype=np.float32))
    assert SECRET not in out.read_bytes()


def _external_entry(tensor: onnx.TensorProto, location: str, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def _if_model(folder: Path, location: str) -> Path:
    """An If whose then-branch initializer is external at ``location``."""
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    _external_entry(c, location, 16)
    then = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])], [c])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, folder / "if.onnx")
    return folder / "if.onnx"


def _attr_model(folder: Path, location: str) -> Path:
    """A main-graph Constant whose tensor attribute is external at ``location``."""
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    _external_entry(c, location, 16)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=c), helper.make_node("Add", ["x", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, folder / "attr.onnx")
    return folder / "attr.onnx"


def _sparse_model(folder: Path, location: str, where: str) -> Path:
    """A sparse tensor (initializer, or Constant attribute) whose values are external."""
    values = numpy_helper.from_array(np.ones(2, dtype=np.float32), "s")
    _external_entry(values, location, 8)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 3], np.int64), "s_idx"), [4])
    nodes = [helper.make_node("Add", ["x", "s"], ["y"])]
    if where == "attribute":
        nodes.insert(0, helper.make_node("Constant", [], ["s"], sparse_value=sparse))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        sparse_initializer=[sparse] if where == "initializer" else None,
    )
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, folder / "sparse.onnx")
    return folder / "sparse.onnx"


@pytest.mark.parametrize("builder", ["if-subgraph", "tensor-attribute"])
@pytest.mark.parametrize("location", ["../secret.txt", "ABSOLUTE", "missing-here"])
def test_every_reachable_tensor_gets_the_path_checks(builder, location, tmp_path, capsys, monkeypatch):
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)  # "missing-here": secret.txt in the working directory only
    loc = {"ABSOLUTE": str(tmp_path / "secret.txt"), "missing-here": "secret.txt"}.get(location, location)
    src = {"if-subgraph": _if_model, "tensor-attribute": _attr_model}[builder](tmp_path / "models", loc)
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, src, "is missing" if location == "missing-here" else "resolves outside the model's folder")
    before.assert_unchanged()
    assert _files(tmp_path) == files


@pytest.mark.parametrize("where", ["initializer", "attribute"])
def test_sparse_tensors_with_escaping_data_are_refused_unread(where, tmp_path, capsys):
    (tmp_path / "secret.txt").write_bytes(SECRET)
    src = _sparse_model(tmp_path / "models", "../secret.txt", where)
    out = tmp_path / "o.onnx"
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(out), "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, src, "sparse")
    before.assert_unchanged()
    assert _files(tmp_path) == files


def test_function_external_data_is_an_input_file(tmp_path, capsys):
    """model_files (what -o and --report must never replace) includes a function's data file."""
    from graphc.core import io

    folder = tmp_path / "models"
    src = _function_model("const.bin", folder)
    (folder / "const.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    assert (folder / "const.bin").resolve() in io.model_files(src)
    before, files = Snapshot(tmp_path), _files(tmp_path)
    code, _, err = _run(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(folder / "const.bin"),
                         "--recipe", "cleanup"], capsys)
    assert code == 1
    _one_line(err, folder / "const.bin", "would overwrite the input")
    before.assert_unchanged()
    assert _files(tmp_path) == files

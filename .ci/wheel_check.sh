#!/usr/bin/env bash
# Builds graphc's wheel, installs it into a fresh venv outside the source tree and runs the
# installed `graphc` from a temporary folder: --version, passes (a packaged file recipe by name
# included) and compress on a small generated model. Dependencies come from the main venv
# (PYTHON, default .venv/bin/python), made visible to the fresh venv by a .pth file, so the
# check needs no download except the build backend (setuptools, from PyPI or pip's cache).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
PY=${PYTHON:-$SRC/.venv/bin/python}
TMP=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$TMP"' EXIT

"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$TMP/dist" . >/dev/null
WHEEL=$(ls "$TMP"/dist/graphc-*.whl)
"$PY" -m venv --without-pip "$TMP/venv"
SITE=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# the main venv's packages (onnx, onnxruntime, ...) after the fresh venv's own; graphc itself
# is the wheel's (the main venv's editable finder is a .pth file there, which is not run)
"$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' > "$SITE/zz-main-venv.pth"
"$PY" -m pip --python "$TMP/venv/bin/python" install -q --disable-pip-version-check --no-deps "$WHEEL"

cd "$TMP"
G="$TMP/venv/bin/graphc"
"$G" --version
WHERE=$("$TMP/venv/bin/python" -c 'import graphc.passes._fusion_rules as m; print(m.__file__)')
case "$WHERE" in "$SRC"*) echo "wheel check: graphc imported from the source tree ($WHERE)"; exit 1;; esac
"$G" passes --json > passes.json
"$TMP/venv/bin/python" - <<'PY'
import json
names = {r["name"] for r in json.load(open("passes.json"))["recipes"]}
missing = {"int8", "smollm2-int4", "remove-padding"} - names
assert not missing, f"recipes missing from the installed wheel: {missing}"
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
rng = np.random.default_rng(0)
w1 = numpy_helper.from_array((rng.standard_normal((32, 48)) * 0.2).astype(np.float32), "W1")
w2 = numpy_helper.from_array((rng.standard_normal((48, 32)) * 0.2).astype(np.float32), "W2")
nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])]
graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])], [w1, w2])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "mlp.onnx")
PY
"$G" compress mlp.onnx -o mlp.int8.onnx --recipe int8 
"$G" compress mlp.onnx -o mlp.rp.onnx --recipe remove-padding 
test -s mlp.int8.onnx && test -s mlp.rp.onnx
echo "wheel check: OK ($(basename "$WHEEL"))"

"""int8 on a real AVX2 code path, whatever CPU runs the suite: ONNX Runtime under qemu-user
emulating an AVX2-only EPYC (no AVX-512, no VNNI), so MLAS dispatches its AVX2 kernels, whose
u8×s8 GEMM saturates. `.ci/run` installs qemu-user; without it (or off x86) this is skipped."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

QEMU = shutil.which("qemu-x86_64")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(QEMU is None or os.uname().machine != "x86_64", reason="needs qemu-user on x86_64"),
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnx_ir as ir
    sys.path.insert(0, sys.argv[1])
    from tests.test_target import saturation_prone, saturation_feed
    from tests.passes.graphs import cosine, run
    from graphc.core import target as tg
    from graphc.front.api import compress

    out = {"host": tg.host().name, "probe_saturates": tg.u8s8_saturates_here()}
    src, folder = sys.argv[2], sys.argv[3]
    ir.save(saturation_prone(), src)
    feeds = [saturation_feed(s) for s in range(2)]
    ref = run(ir.load(src), feeds[0])[0]
    here = compress(src, folder + "/auto.onnx", recipe="int8", feeds=feeds)
    out["auto_form"] = json.loads(here.model.metadata_props["graphc.target"])["int8_forms"]
    out["auto_cosine"] = cosine(ref, run(ir.load(folder + "/auto.onnx"), feeds[0])[0])
    vnni = compress(src, folder + "/vnni.onnx", recipe="int8", feeds=feeds, target="x86-avx512-vnni")
    out["vnni_validated"] = vnni.validation.output_cosine
    out["vnni_notices"] = vnni.notices
    out["vnni_cosine_here"] = cosine(ref, run(ir.load(folder + "/vnni.onnx"), feeds[0])[0])
    print(json.dumps(out))
    """
)


def test_int8_is_exact_on_an_emulated_avx2_cpu(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [QEMU, "-cpu", "EPYC-Rome", sys.executable, str(script), repo, str(tmp_path / "m.onnx"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # the probe sees the saturating kernel, so auto picks an AVX2-class target and its exact form
    assert got["probe_saturates"] and got["host"] == "x86-avx2"
    assert got["auto_form"] == ["u8s8p"]
    assert got["auto_cosine"] >= 0.999
    # a model compiled for VNNI is validated in the target's (exact) arithmetic, and said so...
    assert got["vnni_validated"] >= 0.999
    assert any("saturates" in n for n in got["vnni_notices"])
    # ...while running it as it is on AVX2 really is wrong: the check above can fail
    assert got["vnni_cosine_here"] < 0.999

"""int8 compiled for ``--target arm64``, run by ONNX Runtime's own ARM64 kernels on an x86 machine.

    python bench/arm64_emulated.py [--setup | --setup-only] [--cpu CPU ...] [--sentences 32] [--json OUT]

qemu-user (``qemu-aarch64``) runs an aarch64 Python with ONNX Runtime's aarch64 wheel (the
version this machine has), so MLAS dispatches its ARM64 kernels: on ``cortex-a72`` the NEON
widening multiplies (no dot product), on ``neoverse-n1`` the ``udot``/``sdot`` kernels, on ``max``
the ``i8mm`` ones (``usmmla``/``smmla``); the hardware capabilities the emulated process sees are
printed. graphc compiles on this machine; the emulated process only runs the files (it has
numpy and onnxruntime, nothing else). Emulated timings mean nothing, so none are taken.

Checked, each on every emulated CPU:

- the saturation-prone layer of tests/test_target.py (activation codes near 255, weights near
  ±127: every adjacent product pair overflows an int16) compiled with ``--recipe int8 --target
  arm64``: its output against the exact int32 arithmetic (``graphc.core.target.emulate_gemm``)
  and against float;
- MiniLM (real weights, real tweets the calibration never saw) compiled with ``int8`` and
  ``int8-static`` for ``arm64``: mean cosine of the pooled sentence embeddings to this machine's
  fp32 run of the original.

``--setup`` (or a missing sysroot) fills ``.graphc-cache/arm64/``: Debian's arm64 packages of
Python 3.11 and the C libraries it and ONNX Runtime load (``apt-get download`` after ``dpkg
--add-architecture arm64``, which needs root), and the aarch64 wheels of numpy and onnxruntime
(``pip download``). A ``proc/cpuinfo`` in the sysroot stands in for the host's x86 one, which
ONNX Runtime's CPU detection cannot parse (qemu-user reads files under ``-L`` first).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # graphc and the tests' model builders, from the tree
SYSROOT = ROOT / ".graphc-cache" / "arm64"
PYTHON = "usr/bin/python3.11"
CPUS = {
    "cortex-a72": "NEON, no dot product",
    "neoverse-n1": "dot product (udot/sdot)",
    "max,sme=off": "SVE2, dot product and i8mm",
    "max": "SVE2, i8mm and SME",
}
# each emulated CPU's MIDR part number (Arm Ltd. parts) for the sysroot's /proc/cpuinfo: ONNX
# Runtime's CPU detection (pytorch/cpuinfo) also enables features by part (the dot product on an
# N1 or A76 whatever the capability bits say), so the part must be the emulated one. `max` is
# not a real part: it is given an A57's, and its features come from the capability bits
PARTS = {"cortex-a53": 0xD03, "cortex-a57": 0xD07, "cortex-a72": 0xD08, "cortex-a76": 0xD0B, "neoverse-n1": 0xD0C,
         "max": 0xD07}
# Debian bookworm (this image's release) arm64 packages: Python 3.11 and what it and ONNX Runtime link
DEBS = (
    "libc6", "libgcc-s1", "libstdc++6", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal",
    "libexpat1", "zlib1g", "libffi8", "libbz2-1.0", "liblzma5", "libssl3", "libsqlite3-0", "libuuid1",
    "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1", "libtirpc3", "libnsl2", "libgssapi-krb5-2",
    "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1",
)
# Linux's arm64 hardware-capability bits (AT_HWCAP, AT_HWCAP2), as /proc/cpuinfo names them
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop"
         " sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16"
          " i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32"
          " smef32f32 smefa64").split()
CAPS = "import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; print(f(16), f(26))"
MIN_COSINE = 0.99  # MiniLM's int8 tolerance (the recipe's gate)

CHILD = r"""
import ctypes, json, sys
import numpy as np, onnxruntime as ort
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)
caps = {"asimddp": bool(hwcap >> 20 & 1), "sve": bool(hwcap >> 22 & 1), "i8mm": bool(hwcap2 >> 13 & 1),
        "sme": bool(hwcap2 >> 23 & 1)}
jobs = json.loads(sys.argv[1])
for job in jobs:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
    feeds = np.load(job["feeds"])
    count = int(feeds["count"])
    names = [i.name for i in session.get_inputs()]
    outs = {}
    for i in range(count):
        feed = {n: feeds[f"{i}/{n}"] for n in names}
        outs[str(i)] = session.run(None, feed)[0]
    np.savez(job["out"], **outs)
print(json.dumps({"ort": ort.__version__, "caps": caps}))
"""


def setup(folder: Path = SYSROOT) -> None:
    """The aarch64 sysroot (see the module doc); raises SystemExit with one line on failure."""
    if shutil.which("qemu-aarch64") is None:
        raise SystemExit("qemu-aarch64 not found: install qemu-user (apt-get install qemu-user)")
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in arches:
        for cmd in (["dpkg", "--add-architecture", "arm64"], ["apt-get", "update", "-qq"]):
            if subprocess.run(cmd, capture_output=True).returncode:
                raise SystemExit(f"`{' '.join(cmd)}` failed (needs root): cannot fetch the arm64 packages")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "debs").mkdir(parents=True)
    got = subprocess.run(["apt-get", "download", *[f"{p}:arm64" for p in DEBS]], cwd=tmp / "debs",
                         capture_output=True, text=True)
    if got.returncode:
        raise SystemExit(f"apt-get download of the arm64 packages failed: {got.stderr.strip().splitlines()[-1:]}")
    for deb in sorted((tmp / "debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True)
    wheels = [f"{name}=={importlib.metadata.version(name)}" for name in ("onnxruntime", "numpy")]
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                          "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
                          "--python-version", "3.11", "--implementation", "cp", "-d", str(tmp / "wheels"), *wheels],
                         capture_output=True, text=True)
    if got.returncode:
        raise SystemExit(f"pip download of {' '.join(wheels)} for aarch64 failed: {got.stderr.strip().splitlines()[-1:]}")
    for wheel in (tmp / "wheels").glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp / "site")
    (tmp / "root" / "proc").mkdir(exist_ok=True)
    shutil.rmtree(tmp / "debs")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def ready(folder: Path = SYSROOT) -> bool:
    return (folder / "root" / PYTHON).exists() and (folder / "site" / "onnxruntime").is_dir()


def _python(cpu: str, folder: Path, code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-aarch64", "-cpu", cpu, "-L", str(folder / "root"), str(folder / "root" / PYTHON), "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, env={"PYTHONPATH": str(folder / "site"), "PATH": "/usr/bin:/bin"},
    )


def write_cpuinfo(cpu: str, folder: Path = SYSROOT) -> list[str]:
    """The sysroot's /proc/cpuinfo for the emulated CPU: its features as the kernel would list
    them, from the capability bits qemu gives the process (a CPU claiming more than it has
    would have ONNX Runtime run instructions it lacks)."""
    proc = _python(cpu, folder, CAPS, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"qemu-aarch64 -cpu {cpu} cannot run the sysroot's Python: {proc.stderr.strip()[-300:]}")
    hwcap, hwcap2 = (int(v) for v in proc.stdout.split())
    part = PARTS.get(cpu.split(",")[0], 0xD07)
    features = [n for i, n in enumerate(HWCAP) if hwcap >> i & 1] + [n for i, n in enumerate(HWCAP2) if hwcap2 >> i & 1]
    text = "".join(f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: 0x41\n"
                   f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part:#x}\nCPU revision\t: 0\n\n"
                   for i in range(2))
    (folder / "root" / "proc" / "cpuinfo").write_text(text)
    return features


def run_emulated(cpu: str, jobs: list[dict], folder: Path = SYSROOT, timeout: float = 1800) -> dict:
    """Run each job's model on its feeds under ``qemu-aarch64 -cpu CPU``; outputs land in job["out"]."""
    write_cpuinfo(cpu, folder)
    proc = _python(cpu, folder, CHILD, json.dumps(jobs), timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"emulated run on {cpu} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_feeds(path: Path, feeds: list[dict]) -> None:
    np.savez(path, count=np.array(len(feeds)), **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})


def outputs(path: Path, count: int) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[str(i)] for i in range(count)]


def saturation_case(work: Path) -> dict:
    """The saturation-prone layer compiled for arm64, with its float and exact-int32 references."""
    import onnx_ir as ir

    from graphc.front.api import compress
    from tests.passes.graphs import run
    from tests.test_target import emulated_output, saturation_feed, saturation_prone

    src, dst = work / "sat.onnx", work / "sat-arm64.onnx"
    ir.save(saturation_prone(), src)
    feeds = [saturation_feed(s) for s in range(2)]
    result = compress(str(src), str(dst), recipe="int8", feeds=feeds, target="arm64")
    compiled = ir.load(dst)
    form = json.loads(compiled.metadata_props["graphc.target"])["int8_forms"]
    float_ref = [run(ir.load(src), f)[0] for f in feeds]
    exact = [emulated_output(compiled, f, "arm64") for f in feeds]
    save_feeds(work / "sat-feeds.npz", feeds)
    return {"model": str(dst), "feeds": str(work / "sat-feeds.npz"), "count": len(feeds), "form": form,
            "float": float_ref, "exact": exact, "validated_cosine": result.validation.output_cosine}


def minilm_cases(work: Path, sentences: int) -> tuple[dict, list[dict]]:
    """MiniLM fp32 and its int8 / int8-static files for arm64, and eval feeds (tweets calibration never saw)."""
    import onnxruntime as ort

    from graphc.front.api import compress
    from graphc.front.demo import cached_export
    from graphc.models import get_model_spec

    spec = get_model_spec("minilm")
    fp32, _ = cached_export("minilm", ROOT / ".graphc-cache" / "bench", fresh=False)
    feeds = spec.feeds(spec.eval_texts(sentences), batch=8, max_length=128)
    save_feeds(work / "minilm-feeds.npz", feeds)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ref = [session.run(None, {n: f[n] for n in names})[0] for f in feeds]
    cases = []
    for recipe in ("int8", "int8-static"):
        out = work / f"minilm-{recipe}-arm64.onnx"
        result = compress(str(fp32), str(out), recipe=recipe, target="arm64", attribution=False)
        cases.append({"name": f"MiniLM {recipe}", "model": str(out), "validated_cosine": result.validation.output_cosine})
    return {"feeds": feeds, "ref": ref, "path": str(work / "minilm-feeds.npz")}, cases


def pooled_cosine(ref: list[np.ndarray], got: list[np.ndarray], feeds: list[dict]) -> float:
    """Mean cosine of the pooled sentence embeddings (graphc.checks.measure, as the other MiniLM benches)."""
    from graphc.checks.measure import cosine_stats
    from graphc.models.minilm import embed

    a = np.concatenate([embed(r, f["attention_mask"]) for r, f in zip(ref, feeds)])
    b = np.concatenate([embed(g, f["attention_mask"]) for g, f in zip(got, feeds)])
    return cosine_stats(b, a).mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="(re)build the aarch64 sysroot first")
    parser.add_argument("--setup-only", action="store_true", help="build the sysroot when missing, run nothing")
    parser.add_argument("--cpu", action="append", help="a qemu -cpu model to run on (repeatable; default: "
                        + "; ".join(CPUS) + ")")
    parser.add_argument("--sentences", type=int, default=32, help="MiniLM eval tweets (0: the layer only)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.setup or not ready():
        setup()
    if args.setup_only:
        return 0
    from graphc.core import target as tg
    from tests.passes.graphs import cosine

    results: dict = {"host": tg.cpu_summary(), "emulated": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sat = saturation_case(work)
        results["layer_form"] = sat["form"]
        jobs = [{"model": sat["model"], "feeds": sat["feeds"], "out": str(work / "sat-{cpu}.npz")}]
        mini = None
        if args.sentences:
            mini, cases = minilm_cases(work, args.sentences)
            jobs += [{"model": c["model"], "feeds": mini["path"], "out": str(work / f"m{i}-{{cpu}}.npz")}
                     for i, c in enumerate(cases)]
        for cpu in args.cpu or list(CPUS):
            mine = [{**j, "out": j["out"].format(cpu=cpu)} for j in jobs]
            info = run_emulated(cpu, mine)
            row: dict = {"what": CPUS.get(cpu, cpu), **info}
            got = outputs(Path(mine[0]["out"]), sat["count"])
            row["layer"] = {
                "max_abs_vs_exact": float(max(np.max(np.abs(g - e)) for g, e in zip(got, sat["exact"]))),
                "scale": float(max(np.max(np.abs(e)) for e in sat["exact"])),
                "cosine_vs_float": min(cosine(g, f) for g, f in zip(got, sat["float"])),
            }
            if mini is not None:
                for job, case in zip(mine[1:], cases):
                    got = outputs(Path(job["out"]), len(mini["feeds"]))
                    row[case["name"]] = {"pooled_cosine_vs_fp32": pooled_cosine(mini["ref"], got, mini["feeds"]),
                                         "validated_on_host": case["validated_cosine"]}
            results["emulated"][cpu] = row
            print(json.dumps({cpu: row}), file=sys.stderr)
    print(tg.cpu_line())
    print(f"layer compiled for arm64 in form {results['layer_form']}")
    for cpu, row in results["emulated"].items():
        lay = row["layer"]
        caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in row["caps"].items())
        line = (f"{cpu:12s} ({row['what']}; the process sees {caps}):"
                f" layer max |out - exact int32| {lay['max_abs_vs_exact']:.3g} of {lay['scale']:.3g},"
                f" cosine to float {lay['cosine_vs_float']:.5f}")
        for name in ("MiniLM int8", "MiniLM int8-static"):
            if name in row:
                line += f"; {name} pooled cosine {row[name]['pooled_cosine_vs_fp32']:.5f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The deployment target: which CPU the compressed model will run on, and what that means for int8.

ONNX Runtime's integer GEMM (MLAS) multiplies uint8 activations by int8 weights differently on
each instruction set:

- AVX2 and AVX-512 without VNNI use ``vpmaddubsw``: two adjacent u8×s8 products are summed into
  a *saturating* int16. With activations near 255 and weights near ±127 the pair sum reaches
  2·255·127 = 64,770 and is clipped to 32,767: the result is wrong, silently (measured: 25% of
  the output range on a 64-deep product).
- VNNI (``vpdpbusd``, AVX-512 VNNI or AVX-VNNI) sums four products straight into int32: exact.
- ARM64 widens to 16 then 32 bits (``umull``/``sdot``): exact.

So the int8 *formulation* depends on the target. Each one below is exact on its target:

- ``u8s8``: uint8 activations × int8 weights on [-127, 127] (the fast kernel where it is exact).
- ``u8u8``: the same int8 codes stored as uint8 around a zero point of 128. MLAS's u8u8 kernel
  widens both operands to int16 (``vpmaddwd``), so nothing saturates; the arithmetic, and so
  every output, is identical to ``u8s8`` on a VNNI machine, but that kernel is slower (on an
  AMD EPYC with AVX2, MiniLM int8 1.2× the u8s8 kernel's time). Default on AVX2/AVX-512 (no
  VNNI) for Conv and recurrent weights.
- ``u8s7``: 7-bit weights on [-63, 63] (ONNX Runtime's ``reduce_range``): 2·255·63 = 32,130 fits
  in int16, so the fast u8s8 kernel is exact, at half the weight levels.
- ``u8s8p``: int8 weights on [-127, 127] whose adjacent pairs along the reduction axis K (the
  pairs ``vpmaddubsw`` adds: k = 2i, 2i+1) are bounded, |q[2i]| + |q[2i+1]| <= 128, so that
  255·128 = 32,640 fits in int16: the fast kernel stays exact with most of the 8-bit grid (the
  scale is set by the largest pair, not the largest weight; on MiniLM's weights 1.4× coarser
  than ``u8s8`` at the median, 2.3× less squared error than ``u8s7``). MatMul/Gemm weights
  only (their K axis is known); their default on AVX2/AVX-512 without VNNI (``matmul_form``).

``auto`` reads the CPU's flags, then confirms with a 4×64 probe run through ONNX Runtime on this
machine (a few milliseconds): a probe that saturates wins over flags that claim VNNI (emulators
and hypervisors can hide or fake flags).
"""

from __future__ import annotations

import enum
import functools
import platform
from dataclasses import dataclass

import numpy as np

from graphc.core.errors import UnsupportedError


class Target(str, enum.Enum):
    X86_AVX2 = "x86-avx2"
    X86_AVX512 = "x86-avx512"  # AVX-512 BW without VNNI (Skylake-SP, Cascade Lake without VNNI)
    X86_AVX512_VNNI = "x86-avx512-vnni"
    X86_AVX_VNNI = "x86-avx-vnni"  # AVX-VNNI on 256-bit registers (Alder Lake and later, Zen 5)
    ARM64 = "arm64"


class Int8Form(str, enum.Enum):
    U8S8 = "u8s8"
    U8U8 = "u8u8"
    U8S7 = "u8s7"
    U8S8P = "u8s8p"  # int8 weights bounded in adjacent K pairs (MatMul/Gemm weights only)


@dataclass(frozen=True)
class TargetInfo:
    target: Target
    saturates: bool  # ORT's u8×s8 kernel sums product pairs into a saturating int16
    int8_form: Int8Form  # the default formulation of any int8 weight: exact there, the faster such
    arch: str  # "x86_64" or "arm64": the machine kind that can execute it
    matmul_form: Int8Form  # the default for [K, N] MatMul/Gemm weights (quantize-int8, quantize-activations)

    @property
    def name(self) -> str:
        return self.target.value


TABLE: dict[Target, TargetInfo] = {
    Target.X86_AVX2: TargetInfo(Target.X86_AVX2, True, Int8Form.U8U8, "x86_64", Int8Form.U8S8P),
    Target.X86_AVX512: TargetInfo(Target.X86_AVX512, True, Int8Form.U8U8, "x86_64", Int8Form.U8S8P),
    Target.X86_AVX512_VNNI: TargetInfo(Target.X86_AVX512_VNNI, False, Int8Form.U8S8, "x86_64", Int8Form.U8S8),
    Target.X86_AVX_VNNI: TargetInfo(Target.X86_AVX_VNNI, False, Int8Form.U8S8, "x86_64", Int8Form.U8S8),
    Target.ARM64: TargetInfo(Target.ARM64, False, Int8Form.U8S8, "arm64", Int8Form.U8S8),
}

# Forms that are exact on a target (the u8s8 kernel on a saturating target is not).
def exact_forms(info: TargetInfo) -> tuple[Int8Form, ...]:
    if info.saturates:
        return (Int8Form.U8U8, Int8Form.U8S7, Int8Form.U8S8P)
    return (Int8Form.U8S8, Int8Form.U8U8, Int8Form.U8S7, Int8Form.U8S8P)


# Forms defined on a [K, N] GEMM weight only (the pair bound is along K)
GEMM_ONLY_FORMS = (Int8Form.U8S8P,)


def supported() -> str:
    return ", ".join(["auto", *(t.value for t in Target)])


def _machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "aarch64": "arm64"}.get(m, m)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where that cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU's model name (for benchmark output), or the machine architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or _machine()


def from_flags(flags: set[str], machine: str | None = None) -> Target:
    machine = machine or _machine()
    if machine == "arm64":
        return Target.ARM64
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return Target.X86_AVX512_VNNI
    if "avx_vnni" in flags:
        return Target.X86_AVX_VNNI
    if "avx512bw" in flags:
        return Target.X86_AVX512
    return Target.X86_AVX2


@functools.lru_cache(maxsize=1)
def u8s8_saturates_here() -> bool:
    """Run one u8×s8 MatMulInteger through ONNX Runtime on this machine with operands that
    saturate an int16 pair sum (255·127·2 > 32,767) and compare with the exact product."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 16
    a = np.full((4, k), 255, np.uint8)
    b = np.full((k, n), 127, np.int8)
    b[:, 1::2] = -127
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [4, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [4, n])],
        [numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"A": a})[0]
    return not np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


@functools.lru_cache(maxsize=1)
def host() -> TargetInfo:
    """The target of the machine graphc runs on (flags, confirmed by the ORT probe on x86)."""
    target = from_flags(cpu_flags())
    info = TABLE[target]
    if info.arch == "x86_64" and not info.saturates and u8s8_saturates_here():
        # flags claim VNNI, the kernel says otherwise (an emulator, a hypervisor masking CPUID):
        # the flags cannot be trusted, so name the baseline that the kernel's behaviour implies
        target = Target.X86_AVX2
    return TABLE[target]


def resolve(name: str | Target | TargetInfo | None) -> TargetInfo:
    """``auto``/None → this machine's target; a name → its entry; unknown → one-line error."""
    if isinstance(name, TargetInfo):
        return name
    if name is None or name == "auto":
        return host()
    try:
        return TABLE[Target(name)]
    except ValueError:
        raise UnsupportedError(f"unknown target {name!r}; supported: {supported()}") from None


def runs_here(info: TargetInfo) -> bool:
    """Whether this machine executes the target's kernels (same architecture and int8 behaviour),
    so that validation and timings here say something about the target."""
    here = host()
    return here.arch == info.arch and here.saturates == info.saturates


# --------------------------------------------------------------------------- emulation


def emulate_gemm(a: np.ndarray, b: np.ndarray, a_zero: int, b_zero: int, target: TargetInfo | str) -> np.ndarray:
    """The int32 result of ORT's integer GEMM ``(a - a_zero) @ (b - b_zero)`` as the target's
    kernel computes it, in numpy (any machine). ``a`` uint8 [M, K]; ``b`` int8 or uint8 [K, N].

    On a saturating target the u8×s8 kernel adds each adjacent product pair (k, k+1) of the raw
    codes into an int16 with saturation (``vpmaddubsw``), then the pairs into int32; it removes
    the zero-point terms exactly afterwards. Every other combination is exact."""
    info = resolve(target) if not isinstance(target, TargetInfo) else target
    a64 = a.astype(np.int64)
    b64 = b.astype(np.int64)
    if info.saturates and b.dtype == np.int8:
        k = a64.shape[1]
        if k % 2:
            a64 = np.pad(a64, ((0, 0), (0, 1)))
            b64 = np.pad(b64, ((0, 1), (0, 0)))
        pairs = a64[:, 0::2, None] * b64[None, 0::2, :] + a64[:, 1::2, None] * b64[None, 1::2, :]
        raw = np.clip(pairs, -32768, 32767).sum(axis=1)
    else:
        raw = a64 @ b64
    # (a - za)(b - zb) = ab - za·colsum(b) - zb·rowsum(a) + K·za·zb, the terms MLAS adds exactly
    k = a.shape[1]
    out = raw - a_zero * b.astype(np.int64).sum(0)[None, :] - b_zero * a.astype(np.int64).sum(1)[:, None] + k * a_zero * b_zero
    return out.astype(np.int64)


def cpu_summary() -> dict:
    """The running CPU for benchmark output: model name, graphc target, flags that matter."""
    flags = cpu_flags()
    shown = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
    return {"name": cpu_name(), "target": host().name, "flags": [f for f in shown if f in flags]}


def cpu_line() -> str:
    c = cpu_summary()
    return f"CPU: {c['name']} (graphc target {c['target']}; flags: {', '.join(c['flags']) or 'none of note'})"

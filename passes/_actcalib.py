"""Static activation ranges from calibration data: collectors and range methods.

A :class:`Collector` watches named tensors over the calibration feeds in two sweeps: the
first finds each tensor's min and max, the second fills a histogram of ``2 * bins`` bins over
``[-A, A]`` (A = max |x|, edges symmetric around 0 so that the histogram of |x| is the two
halves folded). Range methods (:class:`Method`) turn these into ``(lo, hi)``:

- ``minmax``: the observed extremes (no clipping; one outlier stretches the grid).
- ``percentile``: the ``percentile``-th and ``100 - percentile``-th percentiles.
- ``entropy``: the |x| threshold whose quantized histogram is closest in KL divergence to
  the reference one (TensorRT's calibration), then ``[max(min, -t), min(max, t)]``.
- ``mse``: the clipping of ``[min, max]`` by a common factor that minimizes the expected
  squared error of quantize-dequantize over the histogram.

:func:`qparams` turns a range into a scale and zero point on the uint8 or int8 grid; the
``mse`` search uses the same function, so it optimizes what is emitted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Method(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class ActType(str, enum.Enum):
    UINT8 = "uint8"
    INT8 = "int8"

    @property
    def bounds(self) -> tuple[int, int]:
        return (0, 255) if self is ActType.UINT8 else (-128, 127)

    @property
    def numpy(self) -> type:
        return np.uint8 if self is ActType.UINT8 else np.int8


def qparams(lo: float, hi: float, act: ActType, symmetric: bool) -> tuple[np.float32, np.integer]:
    """Scale and zero point that map ``[lo, hi]`` (widened to hold 0) onto ``act``'s grid."""
    qmin, qmax = act.bounds
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(-lo, hi)
        scale = amax / 127.0
        zp = 0 if act is ActType.INT8 else 128
    else:
        scale = (hi - lo) / float(qmax - qmin)
        zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax)) if scale > 0 else (0 if act is ActType.INT8 else 128)
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    return np.float32(scale), act.numpy(zp)


def fake_quant(x: np.ndarray, scale: float, zp: int, act: ActType) -> np.ndarray:
    qmin, qmax = act.bounds
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


@dataclass
class _Tensor:
    lo: float = np.inf
    hi: float = -np.inf
    hist: np.ndarray | None = None
    count: int = 0

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi), 1e-30)


@dataclass
class Collector:
    """Min/max (sweep 1) and a symmetric histogram (sweep 2) of each named tensor."""

    bins: int = 2048  # per side of zero
    tensors: dict[str, _Tensor] = field(default_factory=dict)

    def observe_range(self, name: str, x: np.ndarray) -> None:
        if x.size == 0:
            return
        t = self.tensors.setdefault(name, _Tensor())
        t.lo = min(t.lo, float(x.min()))
        t.hi = max(t.hi, float(x.max()))
        t.count += x.size

    def observe_hist(self, name: str, x: np.ndarray) -> None:
        t = self.tensors.get(name)
        if t is None or x.size == 0:
            return
        width = t.amax / self.bins
        idx = np.clip(np.floor(x.astype(np.float64).ravel() / width).astype(np.int64) + self.bins, 0, 2 * self.bins - 1)
        h = np.bincount(idx, minlength=2 * self.bins)
        t.hist = h if t.hist is None else t.hist + h

    def range(self, name: str, method: Method, act: ActType, symmetric: bool, percentile: float) -> tuple[float, float]:
        t = self.tensors[name]
        if method is Method.MINMAX or t.hist is None or t.lo == t.hi:
            return t.lo, t.hi
        edges = np.linspace(-t.amax, t.amax, 2 * self.bins + 1)
        if method is Method.PERCENTILE:
            return _percentile_range(t, edges, percentile)
        if method is Method.ENTROPY:
            nonneg = t.lo >= 0 and not symmetric
            thr = _kl_threshold(t.hist[self.bins :] + t.hist[: self.bins][::-1], t.amax / self.bins, 255 if nonneg else 128)
            return max(t.lo, -thr), min(t.hi, thr)
        return _mse_range(t, edges, act, symmetric)


def _percentile_range(t: _Tensor, edges: np.ndarray, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(t.hist) / max(float(t.hist.sum()), 1.0)
    tail = (100.0 - percentile) / 100.0
    lo_i = int(np.searchsorted(cdf, tail, side="left"))
    hi_i = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return max(t.lo, float(edges[lo_i])), min(t.hi, float(edges[min(hi_i + 1, len(edges) - 1)]))


def _mse_range(t: _Tensor, edges: np.ndarray, act: ActType, symmetric: bool, steps: int = 100) -> tuple[float, float]:
    centers = (edges[:-1] + edges[1:]) / 2
    used = t.hist > 0
    c, n = centers[used], t.hist[used].astype(np.float64)
    best, best_err = (t.lo, t.hi), np.inf
    for alpha in np.linspace(1.0, 0.05, steps):
        lo, hi = t.lo * alpha, t.hi * alpha
        scale, zp = qparams(lo, hi, act, symmetric)
        err = float(np.sum(n * (c - fake_quant(c, float(scale), int(zp), act)) ** 2))
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def _kl_threshold(hist: np.ndarray, width: float, levels: int, stride: int = 8) -> float:
    """|x| threshold minimizing KL(reference || quantized) over a histogram of |x|."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels:
        return n * width
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        group = (np.arange(i) * levels) // i
        sums = np.bincount(group, weights=hist[:i], minlength=levels)
        counts = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1.0), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * width

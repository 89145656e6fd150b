"""Low-rank factorization math shared by ``svd-linear`` and ``lowrank-embedding``.

A weight W [K, N] (y = x W) is replaced by A [K, r] · B [r, N]. The factorization minimises
``||S^T (W - A B)||_F`` for a left metric S [K, K] that depends on the method:

- ``plain``: S = I, the truncated SVD of W (Eckart-Young): the best rank-r weight.
- ``whitened`` (SVD-LLM): S = L, the Cholesky factor of the input's second moment
  E[x x^T] = L L^T from calibration activations, so ``||S^T (W - A B)||_F^2`` is the mean
  squared error of the layer's *output* on those activations: truncating the SVD of L^T W
  is the best rank-r layer for that data, and its dropped singular values are exactly the
  output error.
- ``asvd`` (ASVD): S = diag(mean |x|^alpha), a per-channel scaling by activation magnitude.

The truncated SVD of M = S^T W = U Σ V^T is unwhitened: A = S^-T U_r Σ_r^½, B = Σ_r^½ V_r^T
(Σ split evenly, so both factors have similar ranges: it helps the int8 quantizer that may
run afterwards). Rank rules: the smallest rank whose relative error ``||S^T (W - AB)|| /
||S^T W||`` is at most ``max_error``, or the rank that keeps a fixed fraction of the layer's
parameters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Method(str, enum.Enum):
    PLAIN = "plain"  # truncated SVD of the weight
    WHITENED = "whitened"  # SVD-LLM: SVD of L^T W, L L^T = E[x x^T] (calibration)
    ASVD = "asvd"  # SVD of diag(mean|x|^alpha) W (calibration)


class RankRule(str, enum.Enum):
    ERROR = "error"  # smallest rank with relative error <= max_error
    RATIO = "ratio"  # rank keeping param_ratio of the layer's parameters


@dataclass
class Factors:
    a: np.ndarray  # [K, r] float32
    b: np.ndarray  # [r, N] float32
    error: float  # relative Frobenius error in the method's metric (output error for whitened)

    @property
    def rank(self) -> int:
        return self.a.shape[1]


def break_even_rank(k: int, n: int) -> int:
    """The largest rank whose factors hold fewer parameters than the [k, n] weight."""
    return max((k * n - 1) // (k + n), 0)


def ratio_rank(k: int, n: int, param_ratio: float) -> int:
    """The rank whose factors hold ``param_ratio`` of the weight's parameters (rounded down)."""
    return int(np.floor(param_ratio * k * n / (k + n)))


def error_rank(singular: np.ndarray, max_error: float) -> int:
    """Smallest r with sqrt(sum_{i>=r} s_i^2 / sum s_i^2) <= max_error (0 for a zero matrix)."""
    energy = np.asarray(singular, np.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    # tail[r] = energy dropped when keeping r values
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    ok = np.nonzero(tail <= (max_error**2) * total)[0]
    return int(ok[0])


def relative_error(singular: np.ndarray, rank: int) -> float:
    energy = np.asarray(singular, np.float64) ** 2
    total = energy.sum()
    return float(np.sqrt(energy[rank:].sum() / total)) if total > 0 else 0.0


class Metric:
    """The left metric S of one method: ``apply(W)`` = S^T W, ``undo(U)`` = S^-T U."""

    def __init__(self, kind: Method, chol: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
        self.kind, self.chol, self.scale = kind, chol, scale

    @classmethod
    def plain(cls) -> Metric:
        return cls(Method.PLAIN)

    @classmethod
    def whitened(cls, gram: np.ndarray, damp: float) -> Metric:
        """L with L L^T = gram + damp * mean(diag) * I (damping keeps directions the
        calibration data never visited from costing nothing)."""
        g = np.asarray(gram, np.float64)
        g = 0.5 * (g + g.T)
        mean_diag = float(np.mean(np.diag(g))) if g.size else 0.0
        base = mean_diag if mean_diag > 0 else 1.0
        for factor in (damp, damp * 10, damp * 100, 1.0):
            try:
                chol = np.linalg.cholesky(g + max(factor, 1e-8) * base * np.eye(len(g)))
                return cls(Method.WHITENED, chol=chol)
            except np.linalg.LinAlgError:
                continue
        raise np.linalg.LinAlgError("input second moment is not positive definite even after damping")

    @classmethod
    def asvd(cls, abs_mean: np.ndarray, alpha: float) -> Metric:
        s = np.asarray(abs_mean, np.float64) ** alpha
        floor = max(float(s.max(initial=0.0)) * 1e-6, 1e-12)
        return cls(Method.ASVD, scale=np.maximum(s, floor))

    def apply(self, w: np.ndarray) -> np.ndarray:
        if self.kind is Method.WHITENED:
            return self.chol.T @ w
        if self.kind is Method.ASVD:
            return self.scale[:, None] * w
        return w

    def undo(self, u: np.ndarray) -> np.ndarray:
        if self.kind is Method.WHITENED:
            return np.linalg.solve(self.chol.T, u)  # L^-T u (L is small: K <= a few thousand)
        if self.kind is Method.ASVD:
            return u / self.scale[:, None]
        return u


def svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64 (deterministic: LAPACK gesdd on the same input)."""
    return np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)


def factorize(w: np.ndarray, metric: Metric, rank: int | None = None, max_error: float | None = None,
              decomposition: tuple | None = None) -> Factors:
    """Factors of W at ``rank`` (or the smallest rank meeting ``max_error``) in ``metric``."""
    u, s, vt = decomposition if decomposition is not None else svd(metric.apply(w))
    if rank is None:
        rank = error_rank(s, max_error if max_error is not None else 0.0)
    rank = int(min(max(rank, 0), len(s)))
    root = np.sqrt(s[:rank])
    a = metric.undo(u[:, :rank] * root[None, :])
    b = root[:, None] * vt[:rank]
    return Factors(a.astype(np.float32), b.astype(np.float32), relative_error(s, rank))


def check_budget(rule: RankRule, max_error: float, param_ratio: float, min_saving: float, pass_name: str) -> None:
    """UnsupportedError for a rank budget no factorization can honour."""
    from graphc.core.errors import UnsupportedError

    if rule is RankRule.ERROR and not 0.0 < max_error < 1.0:
        raise UnsupportedError(f"max_error={max_error}: a relative error budget must lie in (0, 1)", pass_name=pass_name)
    if rule is RankRule.RATIO and not 0.0 < param_ratio < 1.0:
        raise UnsupportedError(f"param_ratio={param_ratio}: the fraction of parameters kept must lie in (0, 1) "
                               "(1 or more would not lower cost)", pass_name=pass_name)
    if not 0.0 <= min_saving < 1.0:
        raise UnsupportedError(f"min_saving={min_saving}: must lie in [0, 1)", pass_name=pass_name)

"""A thin factor of a calibration Gram matrix, for the quadratic forms the weight searches take.

``awq-scale`` compares tr(D^T G D) over its alpha grid, and ``mixed-precision`` each candidate's
tr(D H D^T), with G (or H) the K x K second moments of a layer's input and D a K x N weight
difference: K²N multiply-adds per form. A Gram matrix summed over T tokens has rank at most T, so
when T is well below K, G = F^T F with F of r <= T rows (a pivoted Cholesky factor
stopped after T steps), and the form is ||F D||²: rKN multiply-adds.
On a model calibrated on a few hundred tokens (a bare .onnx without a tokenizer gets 128
synthesized ones) with 4096-11008-wide layers that is 30-90x less work for the same number up to
float rounding. Where T is near K or above (real calibration text: tens of thousands of tokens)
nothing changes: :func:`thin_factor` returns None and the callers keep the K x K product.
"""

from __future__ import annotations

import numpy as np

# a factor is used when its rank bound (the tokens) is at most this fraction of the width: below
# it r K N beats K² N by enough to pay for the factorization (~r² K)
MAX_RANK_FRACTION = 0.25


def thin_factor(gram: np.ndarray, tokens: int) -> np.ndarray | None:
    """F [r, K] float64 with F^T F = ``gram`` (symmetric positive semi-definite, summed or
    averaged over ``tokens`` rows) up to rounding, r <= ``tokens``; None when ``tokens`` is not
    below MAX_RANK_FRACTION of K.

    Pivoted Cholesky, one row of F a step (the largest remaining diagonal first), stopped after
    ``tokens`` rows or when what remains is zero: a Gram summed over T rows has rank at most T
    in exact arithmetic, and what a sweep that sums float32 products leaves after T steps is
    their rounding (LAPACK's ``pstrf``, whose tolerance is K·eps, took that for rank and went on towards K)."""
    k = gram.shape[0]
    if tokens <= 0 or tokens > MAX_RANK_FRACTION * k:
        return None
    g = np.asarray(gram, np.float64)
    residual = np.diagonal(g).copy()  # the diagonal of G - F^T F so far
    floor = 1e-12 * float(residual.max(initial=0.0))
    factor = np.empty((tokens, k), np.float64)
    rank = 0
    for j in range(tokens):
        p = int(np.argmax(residual))
        if residual[p] <= floor:
            break
        row = g[p] - factor[:j, p] @ factor[:j]
        row /= np.sqrt(residual[p])
        factor[j] = row
        residual -= row * row
        residual[p] = 0.0  # exactly factored (rounding could leave it a hair above zero)
        rank = j + 1
    return factor[:rank]

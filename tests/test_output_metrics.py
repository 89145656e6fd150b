"""Validation's per-output metrics (graphc.checks.validate.output_metrics), summed feed by feed,
against the definitions computed plainly on the joined outputs."""

import numpy as np
import pytest

from graphc.checks.validate import NEGLIGIBLE_ROW, output_metrics


def _plain(refs, gots, masks):
    r = np.concatenate([np.asarray(a, np.float64)[m] for a, m in zip(refs, masks)])
    g = np.concatenate([np.asarray(a, np.float64)[m] for a, m in zip(gots, masks)])
    d = np.abs(r - g)
    cos = float(np.dot(r.ravel(), g.ravel()) / (np.linalg.norm(r) * np.linalg.norm(g)))
    rows = []
    for a, b in zip(refs, gots):  # the negligible-row floor is per feed
        ra, rb = np.asarray(a, np.float64).reshape(-1, a.shape[-1]), np.asarray(b, np.float64).reshape(-1, b.shape[-1])
        floor = NEGLIGIBLE_ROW * np.linalg.norm(ra, axis=1).max()
        for x, y in zip(ra, rb):
            nx, ny, nd = np.linalg.norm(x), np.linalg.norm(y), np.linalg.norm(x - y)
            if nx <= floor and nd <= floor:
                continue
            rows.append(1.0 if nx == ny == 0 else 0.0 if nx == 0 or ny == 0 else float(x @ y / (nx * ny)))
    return d.max(), d.mean(), cos, min(rows)


def test_sums_by_feed_equal_the_joined_definitions():
    rng = np.random.default_rng(0)
    refs = [rng.standard_normal((2, 5, 33)).astype(np.float32) for _ in range(3)]
    gots = [r + 0.05 * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
    refs[1][0, 1] = 1e-9  # a negligible row on both sides: left out of the row cosines
    gots[1][0, 1] = 0.0
    refs[2][1, 0] = 0.0  # a zero reference row against a real one: cosine 0
    masks = [np.ones((2, 5), bool), np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool), np.ones((2, 5), bool)]
    m = output_metrics("y", refs, gots, masks)
    max_abs, mean_abs, cos, min_row = _plain(refs, gots, [np.ones((2, 5), bool)] * 3)
    assert m.min_row_cosine == pytest.approx(min_row, abs=1e-12) and min_row == 0.0
    masked = _plain(refs, gots, masks)
    assert (m.max_abs, m.mean_abs) == pytest.approx(masked[:2], rel=1e-12)
    assert m.cosine == pytest.approx(masked[2], abs=1e-12) and m.nonfinite == 0


def test_nan_facing_a_number_fails_and_matching_nans_do_not():
    r = np.ones((1, 2, 4), np.float32)
    g = r.copy()
    r[0, 0, 0] = g[0, 0, 0] = np.nan
    assert output_metrics("y", [r], [g]).nonfinite == 0
    g[0, 1, 1] = np.inf
    bad = output_metrics("y", [r], [g])
    assert bad.nonfinite == 1 and bad.max_abs == float("inf")

"""Which rows of an embedding table new text will read: for giving the rest fewer bits.

A table row is *used* if the calibration feeds read it. New text also reads rows calibration
never did; the share of its reads that land on unseen rows is estimated by Good-Turing (the
share of calibration reads whose id was read exactly once).

Unseen rows are not all alike: in a trained table the rows of rare tokens tend to keep a small
norm. A split may therefore also promote the largest-norm fraction of the unseen rows to the
used rows' precision. What share of the unseen reads the remaining (cold) rows would still get
is estimated inside the calibration data, by cross-validation: the rows unseen in the first half
of the calibration reads are ranked by norm, and the second half's reads of them are counted.
If norm says nothing on a model, the estimate shows it (the share falls only in proportion to
the rows promoted) and a planner buys nothing from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROMOTE = (0.0, 0.25, 0.5, 0.75)  # fractions of the unseen rows promoted by norm


@dataclass(frozen=True)
class RowSplit:
    hot: np.ndarray  # row ids kept at the higher precision (sorted)
    cold_share: float  # expected share of new text's reads that land on the other rows
    promoted: float  # fraction of the calibration-unseen rows promoted by norm


def calibration_ids(feeds: Sequence[dict], name: str) -> np.ndarray | None:
    """The ids the feeds give input ``name``, in order, padding (attention_mask 0) left out."""
    parts = []
    for feed in feeds:
        if name not in feed:
            return None
        ids = np.asarray(feed[name])
        mask = feed.get("attention_mask")
        if mask is not None and np.shape(mask) == ids.shape:
            ids = ids[np.asarray(mask) != 0]
        parts.append(ids.reshape(-1).astype(np.int64))
    return np.concatenate(parts) if parts else None


def row_splits(table: np.ndarray, ids: np.ndarray, promote: Sequence[float] = PROMOTE) -> list[RowSplit]:
    """Candidate splits of ``table`` [rows, cols] given the calibration reads ``ids``."""
    rows = table.shape[0]
    ids = ids[(ids >= 0) & (ids < rows)]
    if ids.size < 2:
        return []
    counts = np.bincount(ids, minlength=rows)
    seen = counts > 0
    if seen.all():
        return []
    p_unseen = max(int((counts == 1).sum()), 1) / ids.size  # Good-Turing
    norm = np.linalg.norm(table, axis=1)
    half = ids.size // 2
    first = np.bincount(ids[:half], minlength=rows) > 0
    later = np.bincount(ids[half:], minlength=rows)
    unseen_first = np.flatnonzero(~first)
    ranked_first = unseen_first[np.argsort(-norm[unseen_first], kind="stable")]
    unseen = np.flatnonzero(~seen)
    ranked = unseen[np.argsort(-norm[unseen], kind="stable")]
    out = []
    for f in promote:
        k_first = int(round(f * len(ranked_first)))
        reads = int(later[ranked_first].sum())
        cold_reads = int(later[ranked_first[k_first:]].sum())
        share = (cold_reads + 1) / (reads + 1) if f > 0 else 1.0
        k = int(round(f * len(ranked)))
        hot = np.sort(np.concatenate([np.flatnonzero(seen), ranked[:k]]))
        out.append(RowSplit(hot, p_unseen * min(share, 1.0), f))
    return out

"""_prune.group_energy: the one-channel shortcut (FFN neurons) equals the per-group definition."""

import numpy as np

from graphc.passes import _prune


def _by_definition(x, w, groups):
    return np.array([float(np.sum((x[:, g].astype(np.float64) @ w[g].astype(np.float64)) ** 2)) for g in groups])


def test_one_channel_groups_match_the_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 12)).astype(np.float32) * rng.uniform(0.1, 3, 12).astype(np.float32)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    groups = [np.array([j]) for j in (3, 0, 11, 7)]  # any subset, any order
    got = _prune.group_energy(x, w, groups)
    np.testing.assert_allclose(got, _by_definition(x, w, groups), rtol=1e-5)
    assert list(np.argsort(got)) == list(np.argsort(_by_definition(x, w, groups)))


def test_wider_groups_keep_the_definition():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    groups = [np.arange(0, 4), np.arange(4, 8)]
    np.testing.assert_allclose(_prune.group_energy(x, w, groups), _by_definition(x, w, groups), rtol=1e-5)

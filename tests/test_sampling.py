"""How generation picks the next token: greedy, temperature, top-k, top-p, min-p, seeds."""

import numpy as np
import pytest

from graphc.core.errors import GraphcError
from graphc.front.sampling import Sampling, greedy

LOGITS = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]))


def _draws(sampling: Sampling, n: int = 20000) -> np.ndarray:
    pick = sampling.picker()
    return np.stack([pick(LOGITS) for _ in range(n)])


def test_temperature_one_draws_the_models_distribution():
    draws = _draws(Sampling(seed=0))
    for row, want in ((0, [0.5, 0.3, 0.2]), (1, [0.1, 0.2, 0.7])):
        freq = np.bincount(draws[:, row], minlength=3) / len(draws)
        np.testing.assert_allclose(freq, want, atol=0.015)


def test_temperature_sharpens_and_flattens():
    p = Sampling(temperature=0.5).probabilities(LOGITS[:1])[0]
    np.testing.assert_allclose(p, np.array([0.25, 0.09, 0.04]) / 0.38)
    flat = Sampling(temperature=100.0).probabilities(LOGITS[:1])[0]
    assert flat.max() - flat.min() < 0.01


def test_top_k_and_top_p_cut_the_tail():
    draws = _draws(Sampling(top_k=2, seed=1), 5000)
    assert set(np.unique(draws[:, 0])) == {0, 1} and set(np.unique(draws[:, 1])) == {1, 2}
    np.testing.assert_allclose(Sampling(top_p=0.75).probabilities(LOGITS)[0], [0.625, 0.375, 0.0])
    np.testing.assert_allclose(Sampling(top_p=0.7).probabilities(LOGITS)[1], [0.0, 0.0, 1.0])  # the first kept alone
    np.testing.assert_allclose(Sampling(top_p=0.8).probabilities(LOGITS)[1], [0.0, 2 / 9, 7 / 9])


def test_min_p_keeps_the_tokens_near_the_likeliest():
    # row 0: 0.5, 0.3, 0.2 -> min_p 0.5 keeps p >= 0.25; row 1: 0.1, 0.2, 0.7 -> keeps p >= 0.35
    np.testing.assert_allclose(Sampling(min_p=0.5).probabilities(LOGITS), [[0.625, 0.375, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(Sampling(min_p=0.25).probabilities(LOGITS)[1], [0.0, 2 / 9, 7 / 9])
    np.testing.assert_allclose(Sampling(min_p=1.0).probabilities(LOGITS), [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # after the temperature, as Hugging Face orders its warpers: at T = 0.5 row 0 is 0.66, 0.24, 0.11
    np.testing.assert_allclose(Sampling(temperature=0.5, min_p=0.3).probabilities(LOGITS[:1])[0],
                               np.array([0.25, 0.09, 0.0]) / 0.34)
    draws = _draws(Sampling(min_p=0.5, seed=3), 3000)
    assert set(np.unique(draws[:, 0])) == {0, 1} and set(np.unique(draws[:, 1])) == {2}


def test_min_p_asks_for_sampling():
    from graphc.front.generate import _sampling

    assert _sampling(None, 0, 1.0, None) is None
    s = _sampling(None, 0, 1.0, 5, min_p=0.1)
    assert s == Sampling(temperature=1.0, seed=5, min_p=0.1)
    assert _sampling(0, 0, 1.0, None, min_p=0.1) is None  # temperature 0 is greedy whatever the filters
    with pytest.raises(GraphcError, match="min_p"):
        _sampling(None, 0, 1.0, None, min_p=2.0)


def test_greedy_cases_and_seeds():
    assert greedy(LOGITS).tolist() == [0, 2]
    assert Sampling(temperature=0).picker() is greedy
    assert (_draws(Sampling(top_k=1, temperature=3.0, seed=2), 200) == [0, 2]).all()
    a, b, c = (_draws(Sampling(seed=s), 300) for s in (7, 7, 8))
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"temperature": float("nan")}, {"top_k": -2}, {"top_k": 1.5},
                                 {"top_p": 0}, {"top_p": 1.5}, {"seed": -1}, {"temperature": True},
                                 {"min_p": -0.1}, {"min_p": 1.5}, {"min_p": True}])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(GraphcError) as e:
        Sampling(**bad)
    assert "\n" not in str(e.value) and next(iter(bad)) in str(e.value)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once():
    from graphc.front.sampling import check_repetition_penalty, penalize_repeats

    logits = np.array([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    seen = np.array([[0, 1, 0], [3, 3, 3]])  # a token seen twice is penalized once
    np.testing.assert_allclose(penalize_repeats(logits, seen, 2.0), [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.25]])
    assert greedy(penalize_repeats(logits, seen, 4.0)).tolist() == [2, 0]
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(GraphcError, match="repetition_penalty"):
            check_repetition_penalty(bad)

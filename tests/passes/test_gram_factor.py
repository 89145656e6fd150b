"""The thin factor of a Gram matrix that the weight searches use when calibration tokens are few."""

import numpy as np
import pytest

from graphc.passes import _gram_factor
from graphc.passes._gram_factor import thin_factor


@pytest.mark.parametrize("k, tokens", [(256, 16), (300, 40), (96, 24)])
def test_the_factor_gives_the_grams_quadratic_forms(k, tokens):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((tokens, k)) * np.exp(rng.standard_normal(k))  # channels of very different sizes
    gram = x.T @ x
    f = thin_factor(gram, tokens)
    assert f is not None and f.shape == (tokens, k)  # the rank is the tokens'
    np.testing.assert_allclose(f.T @ f, gram, rtol=0, atol=1e-12 * np.abs(gram).max())
    d = rng.standard_normal((k, 7))
    np.testing.assert_allclose(np.square(f @ d).sum(), ((gram @ d) * d).sum(), rtol=1e-12)


def test_repeated_rows_give_a_lower_rank():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 128))
    x = np.concatenate([x, x[:3] * 2.0])  # 8 rows, rank 5
    f = thin_factor(x.T @ x, len(x))
    assert f is not None and f.shape[0] == 5
    np.testing.assert_allclose(f.T @ f, x.T @ x, atol=1e-10)


def test_many_tokens_keep_the_full_matrix():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 128))
    assert thin_factor(x.T @ x, 64) is None  # half the width: the K x K product is as cheap
    assert thin_factor(x.T @ x, 0) is None
    assert thin_factor(x[:32].T @ x[:32], 32) is not None
    assert _gram_factor.MAX_RANK_FRACTION * 128 == 32


@pytest.mark.parametrize("chunked", [False, True])
def test_candidate_errors_through_the_factor_equal_the_full_hessians(monkeypatch, chunked):
    from graphc.passes import _sensitivity as sens

    rng = np.random.default_rng(2)
    view = rng.standard_normal((48, 256)).astype(np.float32)
    x = rng.standard_normal((20, 256)) * np.exp(rng.standard_normal(256))
    hessian = x.T @ x / 20
    configs = [sens.QuantConfig(4, 32), sens.QuantConfig(8, 64), sens.QuantConfig(2, 128)]
    if chunked:
        monkeypatch.setattr(sens, "CHUNKED_ABOVE", 1000)
    used = []
    real = sens.thin_factor
    monkeypatch.setattr(sens, "thin_factor", lambda h, t: used.append(f := real(h, t)) or f)
    kw = {"symmetric": False, "scale_dtype": "float16"}
    full = sens.candidate_errors(view, configs, hessian, **kw)
    thin = sens.candidate_errors(view, configs, hessian, tokens=20, **kw)
    assert used and used[-1] is not None and used[-1].shape[0] == 20
    assert list(thin) == configs
    np.testing.assert_allclose([thin[c] for c in configs], [full[c] for c in configs], rtol=1e-9)
    assert thin[configs[2]] > thin[configs[0]] > thin[configs[1]] > 0

import numpy as np
import pytest

from graphc.passes import _blockquant as bq


def _heavy(rows=64, cols=256, seed=0):
    return np.random.default_rng(seed).standard_t(3, (rows, cols)).astype(np.float32) * 0.05


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [1, 7, 16, 33])
def test_pack_round_trip(bits, length):
    q = np.random.default_rng(bits + length).integers(0, 1 << bits, (3, 5, length)).astype(np.uint8)
    packed = bq.pack(q, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, -(-length * bits // 8))
    np.testing.assert_array_equal(bq.unpack(packed, bits, length), q)


def test_pack_layout_low_bits_first():
    assert bq.pack(np.array([1, 2], np.uint8), 4).tolist() == [0x21]
    assert bq.pack(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert bq.pack(np.array([7, 200], np.uint8), 8).tolist() == [7, 200]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_and_error_bound(bits, symmetric):
    x = _heavy(cols=100)  # 100 = 3 blocks of 32 + a padded one
    q = bq.quantize(x, bits, 32, symmetric=symmetric, method="rtn")
    assert q.q.shape == (64, 4, 32) and q.scale.shape == (64, 4) and q.q.max() < (1 << bits)
    if symmetric:
        assert np.all(q.zero == 1 << (bits - 1))
    deq = q.dequantize()
    assert deq.shape == x.shape
    # round to nearest on a grid that covers the block: at most half a step off; symmetric maps
    # the signed extreme to level -2^(bits-1), so the other side may clip by up to one step
    step = np.repeat(np.abs(q.scale.astype(np.float32)), 32, axis=1)[:, :100]
    assert np.all(np.abs(deq - x) <= step * (1.0 if symmetric else 0.5) + 1e-6)


def test_float16_scales_are_the_ones_the_codes_fit():
    x = _heavy()
    q = bq.quantize(x, 4, 32, symmetric=False, method="rtn", scale_dtype=np.float16)
    assert q.scale.dtype == np.float16
    s = q.scale.astype(np.float32)[:, :, None]
    expect = np.clip(np.rint(x.reshape(64, 8, 32) / s) + q.zero[:, :, None], 0, 15)
    np.testing.assert_array_equal(q.q, expect)


def _block_sq_error(x, q):
    d = (q.dequantize() - x).reshape(x.shape[0], -1, q.block_size)
    return (d.astype(np.float64) ** 2).sum(axis=-1)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_never_worse_than_rtn_per_block(bits, block, symmetric):
    x = _heavy()
    rtn = bq.quantize(x, bits, block, symmetric=symmetric, method="rtn")
    mse = bq.quantize(x, bits, block, symmetric=symmetric, method="mse")
    e_rtn, e_mse = _block_sq_error(x, rtn), _block_sq_error(x, mse)
    assert np.all(e_mse <= e_rtn + 1e-9)
    assert e_mse.sum() < 0.97 * e_rtn.sum()  # and clearly better on heavy tails


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_hqq_never_worse_than_rtn_asymmetric(bits):
    x = _heavy(seed=1)
    rtn = bq.quantize(x, bits, 64, symmetric=False, method="rtn")
    hqq = bq.quantize(x, bits, 64, symmetric=False, method="hqq")
    e_rtn, e_hqq = _block_sq_error(x, rtn), _block_sq_error(x, hqq)
    assert np.all(e_hqq <= e_rtn + 1e-9)
    assert hqq.relative_error(x) < rtn.relative_error(x)


def test_hqq_is_asymmetric_only_and_gptq_needs_hessian():
    with pytest.raises(ValueError, match="asymmetric"):
        bq.quantize(_heavy(), 4, 32, symmetric=True, method="hqq")
    with pytest.raises(ValueError, match="Hessian"):
        bq.quantize(_heavy(), 4, 32, symmetric=True, method="gptq")


def test_per_channel_and_constant_blocks():
    x = _heavy(cols=48)
    x[0] = 0.0  # an all-zero row: exact, no division by zero
    q = bq.quantize(x, 4, 0, symmetric=True, method="mse")
    assert q.n_blocks == 1 and q.block_size == 48
    assert np.all(q.dequantize()[0] == 0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_preserves_outputs_better_than_rtn(symmetric):
    rng = np.random.default_rng(0)
    k, n = 96, 40
    # correlated inputs with a few large channels, like a transformer's LayerNorm output
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    xs = rng.standard_normal((2000, k)) @ mix
    xs[:, :4] *= 8
    w_t = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    h = xs.T @ xs / len(xs)
    test = (rng.standard_normal((500, k)) @ mix) * np.r_[np.full(4, 8.0), np.ones(k - 4)]

    def out_err(q):
        return np.linalg.norm(test @ (w_t - q.dequantize()).T) / np.linalg.norm(test @ w_t.T)

    rtn = bq.quantize(w_t, 4, 32, symmetric=symmetric, method="rtn")
    g = bq.gptq(w_t, h, 4, 32, symmetric=symmetric)
    g_ao = bq.gptq(w_t, h, 4, 32, symmetric=symmetric, act_order=True)
    assert g.q.shape == rtn.q.shape and g.q.max() <= 15
    assert out_err(g) < 0.8 * out_err(rtn)
    assert out_err(g_ao) < 0.8 * out_err(rtn)


@pytest.mark.parametrize("symmetric, cols", [(False, 96), (True, 80)])  # 80: a partial last block
def test_refit_scales_lowers_the_output_error_and_keeps_codes(symmetric, cols):
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    x = rng.standard_normal((2000, cols)) @ mix  # correlated input channels
    h = x.T @ x / len(x)
    w_t = rng.standard_normal((48, cols)).astype(np.float32)

    def loss(q):
        d = w_t.astype(np.float64) - q.dequantize()
        return float(np.einsum("ij,jk,ik->", d, h, d))

    for quant in (bq.gptq(w_t, h, 4, 32, symmetric=symmetric, scale_dtype=np.float16),
                  bq.quantize(w_t, 4, 32, symmetric=symmetric, method="rtn", scale_dtype=np.float16)):
        refit = bq.refit_scales(w_t, h, quant)
        np.testing.assert_array_equal(refit.q, quant.q)
        np.testing.assert_array_equal(refit.zero, quant.zero)
        assert refit.scale.dtype == np.float16
        assert loss(refit) < 0.99 * loss(quant)
        again = bq.refit_scales(w_t, h, refit)
        assert loss(again) <= loss(refit) * (1 + 1e-9)  # never rises


def _damped_loss(w_t, h, quant, damp):
    hd = np.array(h, dtype=np.float64)
    hd[np.diag_indices_from(hd)] += damp * float(np.mean(np.diagonal(h)))
    d = w_t.astype(np.float64) - quant.dequantize()
    return float(np.einsum("ij,jk,ik->", d, hd, d))


@pytest.mark.parametrize("symmetric, cols, bits", [(False, 96, 4), (True, 80, 4), (False, 96, 8), (False, 72, 2)])
def test_refine_codes_lowers_gptqs_objective_and_keeps_scales(symmetric, cols, bits):
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    x = rng.standard_normal((3000, cols)) @ mix  # correlated input channels
    x[:, :3] *= 6
    h = x.T @ x / len(x)
    w_t = rng.standard_normal((40, cols)).astype(np.float32)
    quant = bq.gptq(w_t, h, bits, 32, symmetric=symmetric, damp=0.1, act_order=True)
    scale, zero, codes = quant.scale.copy(), quant.zero.copy(), quant.q.copy()
    before = _damped_loss(w_t, h, quant, 0.1)
    assert bq.refine_codes(w_t, h, quant, damp=0.1, sweeps=0).q.tolist() == codes.tolist()
    one = _damped_loss(w_t, h, bq.refine_codes(w_t, h, quant, damp=0.1, sweeps=1), 0.1)
    two = _damped_loss(w_t, h, bq.refine_codes(w_t, h, quant, damp=0.1, sweeps=1), 0.1)
    assert one < 0.995 * before and two <= one * (1 + 1e-9)  # never rises: each step is a 1-D optimum
    np.testing.assert_array_equal(quant.scale, scale)
    np.testing.assert_array_equal(quant.zero, zero)
    assert quant.q.max() <= (1 << bits) - 1
    if cols % 32:  # the padding of the last block is left as gptq wrote it
        np.testing.assert_array_equal(quant.q.reshape(40, -1)[:, cols:], codes.reshape(40, -1)[:, cols:])


def test_refine_codes_matches_a_dense_coordinate_descent():
    """The lazy, sparse updates give the codes of the plain algorithm: for each column in turn,
    every row's code moved to the grid point nearest the minimizer, the residual's product with H
    recomputed from scratch."""
    rng = np.random.default_rng(6)
    k, n, damp = 64, 12, 0.1
    x = rng.standard_normal((500, k)) @ (rng.standard_normal((k, k)) * 0.4 + np.eye(k))
    h = x.T @ x / len(x)
    w_t = rng.standard_normal((n, k)).astype(np.float32)
    quant = bq.gptq(w_t, h, 4, 16, symmetric=False, damp=damp)
    hd = h.copy()
    hd[np.diag_indices(k)] += damp * float(np.mean(np.diagonal(h)))
    s = np.repeat(quant.scale.astype(np.float64), 16, axis=1)
    z = np.repeat(quant.zero.astype(np.float64), 16, axis=1)
    q = quant.q.reshape(n, -1).astype(np.float64)
    for _ in range(2):
        for j in range(k):
            g = (w_t - (q - z) * s) @ hd
            target = (q[:, j] - z[:, j]) * s[:, j] + g[:, j] / hd[j, j]
            q[:, j] = np.clip(np.rint(target / s[:, j] + z[:, j]), 0, 15)
    got = bq.refine_codes(w_t, h, quant, damp=damp, sweeps=2, lazy_block=32)
    assert np.mean(got.q.reshape(n, -1) != q) < 0.01  # float32 against float64 sums: a tie may round apart


def test_gptq_on_wide_inputs_inverts_in_float32_with_the_same_quality(monkeypatch):
    """Past LARGE_HESSIAN input channels the Hessian's inverse and factor are float32 (a
    11008-wide float64 inverse alone takes ~3.6 GB); the fit is as good."""
    rng = np.random.default_rng(1)
    k, n = 96, 40
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    xs = rng.standard_normal((2000, k)) @ mix
    w_t = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    h = xs.T @ xs / len(xs)

    def out_err(q):
        return np.linalg.norm(xs @ (w_t - q.dequantize()).T) / np.linalg.norm(xs @ w_t.T)

    wide64 = bq.gptq(w_t, h, 4, 32, symmetric=False, act_order=True)
    monkeypatch.setattr(bq, "LARGE_HESSIAN", 16)
    wide32 = bq.gptq(w_t, h, 4, 32, symmetric=False, act_order=True)
    assert np.mean(wide32.q != wide64.q) < 0.02
    assert out_err(wide32) == pytest.approx(out_err(wide64), rel=0.02)


def test_relative_error_of_large_weights_is_summed_by_rows(monkeypatch):
    from graphc.passes import _sensitivity as sens

    rng = np.random.default_rng(2)
    view = rng.standard_normal((300, 64)).astype(np.float32)
    deq = view + rng.standard_normal((300, 64)) * 0.01
    h = np.cov(rng.standard_normal((64, 500)))
    whole = [sens.relative_error(view, deq), sens.relative_error(view, deq, h)]
    monkeypatch.setattr(sens, "CHUNKED_ABOVE", 1000)
    chunked = [sens.relative_error(view, deq), sens.relative_error(view, deq, h)]
    assert chunked == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_a_large_weights_rtn_error_is_the_same_quantized_by_row_blocks(monkeypatch, scale_dtype):
    """A candidate's weight error on a weight past CHUNKED_ABOVE is computed from row blocks
    quantized on their own (never the whole dequantized copy): the same number as quantizing
    the whole weight, bit for bit (block quantization is row by row, and the sums run over the
    same row blocks)."""
    from graphc.passes import _sensitivity as sens
    from graphc.passes._probes import Oriented

    rng = np.random.default_rng(3)
    view = rng.standard_normal((300, 96)).astype(np.float32)
    h = np.cov(rng.standard_normal((96, 500)))
    config = sens.QuantConfig(4, 32)
    monkeypatch.setattr(sens, "CHUNKED_ABOVE", 1000)
    for hessian in (None, h):
        deq = sens.quantize_view(Oriented(False), view, config, method=bq.Method.RTN, symmetric=False,
                                 scale_dtype=scale_dtype)[1]
        want = sens.relative_error(view, deq, hessian)
        got = sens.candidate_errors(view, [config], hessian, symmetric=False, scale_dtype=scale_dtype)[config]
        assert got == want


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse_computed_in_place():
    rng = np.random.default_rng(5)
    for k in (40, 300, 700):
        x = rng.standard_normal((2 * k, k))
        h = x.T @ x / (2 * k) + 0.01 * np.eye(k)
        work = h.copy()
        f = bq._inverse_factor_in_place(work)
        assert np.shares_memory(f, work) and f.flags.c_contiguous  # no K x K copy made
        assert np.array_equal(np.tril(f, -1), np.zeros_like(f)) and (np.diag(f) > 0).all()
        np.testing.assert_allclose(f.T @ f, np.linalg.inv(h), rtol=1e-8, atol=1e-10)
        # the numpy form narrower inputs take gives the same factor
        np.testing.assert_allclose(bq._upper_inverse_factor(h.copy()), f, rtol=1e-7, atol=1e-9 * float(np.abs(f).max()))
        # float32 (inputs wider than LARGE_HESSIAN) in place too, to float32 precision
        f32 = bq._inverse_factor_in_place(h.astype(np.float32))
        assert f32.dtype == np.float32
        np.testing.assert_allclose(f32, f, rtol=2e-3, atol=2e-3 * float(np.abs(f).max()))


def test_inverse_factor_from_the_reversed_cholesky_factor_is_numpy_inv_then_cholesky():
    """U = J L^-1 J (J H J = L L^T): the upper factor numpy.linalg.inv then cholesky give, for
    sizes split unevenly into halves, float64 and float32; and the triangular inverse by halves
    is the inverse."""
    rng = np.random.default_rng(11)
    for k in (5, 97, 193, 577):
        x = rng.standard_normal((2 * k, k)) * np.exp(rng.standard_normal(k))
        h = x.T @ x / (2 * k) + 0.01 * np.eye(k)
        want = np.linalg.cholesky(np.linalg.inv(h)).T
        got = bq._reversed_inverse_factor(h)
        assert np.array_equal(np.tril(got, -1), np.zeros_like(got)) and (np.diag(got) > 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * float(np.abs(want).max()))
        got32 = bq._reversed_inverse_factor(h.astype(np.float32))
        assert got32.dtype == np.float32
        np.testing.assert_allclose(got32, want, rtol=2e-3, atol=2e-3 * float(np.abs(want).max()))
        low = np.tril(rng.standard_normal((k, k))) + k * np.eye(k)
        np.testing.assert_allclose(bq._lower_inverse(low), np.linalg.inv(low), rtol=1e-10, atol=1e-14)


def test_inverse_factor_refuses_a_hessian_that_is_not_positive_definite():
    for factor in (bq._upper_inverse_factor, bq._inverse_factor_in_place):
        with pytest.raises(np.linalg.LinAlgError):
            factor(np.diag([1.0, -1.0, 2.0]))


def test_gptq_in_place_form_gives_the_same_codes(monkeypatch):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    x = rng.standard_normal((1024, 256))
    h = x.T @ x / 1024
    before = bq.gptq(w, h, 4, 64, symmetric=False, act_order=True, damp=0.1)
    monkeypatch.setattr(bq, "IN_PLACE_ABOVE", 64)
    after = bq.gptq(w, h, 4, 64, symmetric=False, act_order=True, damp=0.1)
    assert np.array_equal(before.q, after.q) and np.allclose(before.scale, after.scale)


@pytest.mark.parametrize("act_order,rows", [(True, 100), (False, 333), (True, 1000)])
def test_gptq_fits_rows_a_few_at_a_time_with_the_same_codes(monkeypatch, act_order, rows):
    """The rows of W^T go through GPTQ in chunks (bounded working copies for tall layers such as
    an LM head); each row's fit is its own, so chunked or not the result is the same up to how
    BLAS rounds a matrix product's rows: bit for bit with the AVX-512 kernels of an AMD Zen 4,
    within float32 rounding of a scale with the AVX2 ones (emulated EPYC-Rome), whose sums for a
    row depend on where it falls in the product (a dead input channel included; 1000 rows = 3 x
    333 + 1: the chunks are made equal, no 1-row chunk, which went through matrix-vector kernels
    and rounded differently on every CPU)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((1000, 192)).astype(np.float32)
    x = rng.standard_normal((2048, 192)) * rng.uniform(0.1, 3.0, 192)
    h = x.T @ x / 2048
    h[7, :] = h[:, 7] = 0.0
    whole = bq.gptq(w, h, 4, 32, symmetric=False, act_order=act_order, damp=0.1, search="mse")
    monkeypatch.setattr(bq, "GPTQ_ROW_BYTES", 4 * 192 * rows)
    chunked = bq.gptq(w, h, 4, 32, symmetric=False, act_order=act_order, damp=0.1, search="mse")
    assert np.mean(whole.q != chunked.q) <= 1e-3
    np.testing.assert_allclose(chunked.scale, whole.scale, rtol=1e-5)
    assert np.mean(whole.zero != chunked.zero) <= 1e-3


def test_gptq_damps_more_where_the_hessian_is_not_positive_definite():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = rng.standard_normal((16, 64))
    h = x.T @ x / 16  # rank 16 of 64: singular
    h -= 0.02 * np.eye(64) * float(np.mean(np.diag(h)))  # and now indefinite even after damp 0.01
    q = bq.gptq(w, h, 4, 32, symmetric=False)
    assert np.isfinite(q.dequantize()).all() and q.relative_error(w) < 0.2


def _gptq_reference(w_t, h, bits, block, damp):
    """GPTQ as the paper writes it (every column's error onto all later columns at once, no
    lazy blocks, no act order, round-to-nearest block parameters): what gptq's lazy updates
    must reproduce."""
    w = np.array(w_t, dtype=np.float64)
    n, k = w.shape
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, k))
    qmax = (1 << bits) - 1
    for i in range(k):
        if i % block == 0:
            ref = bq.quantize(w[:, i:i + block].astype(np.float32), bits, block, symmetric=False, method="rtn")
            s, z = ref.scale[:, 0].astype(np.float64), ref.zero[:, 0].astype(np.float64)
        q = np.clip(np.rint(w[:, i] / s) + z, 0, qmax)
        codes[:, i] = q
        e = (w[:, i] - (q - z) * s) / u[i, i]
        w[:, i:] -= np.outer(e, u[i, i:])
    return codes


def test_gptq_lazy_updates_give_the_papers_codes():
    rng = np.random.default_rng(6)
    k, n = 256, 48  # 256 inputs: two lazy blocks of 128, eight sub-blocks each
    mix = rng.standard_normal((k, k)) * 0.2 + np.eye(k)
    xs = rng.standard_normal((3000, k)) @ mix
    h = xs.T @ xs / len(xs)
    w_t = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    got = bq.gptq(w_t, h, 4, 32, symmetric=False, search="rtn", damp=0.01)
    want = _gptq_reference(w_t, h, 4, 32, 0.01)
    assert np.mean(got.q.reshape(n, -1)[:, :k] != want) < 1e-3  # float32 vs float64 sums: rare ties


def test_blockquant_relative_error_by_row_blocks_equals_the_whole_array(monkeypatch):
    """BlockQuant.relative_error sums its row blocks (a wide LM head is never dequantized whole):
    the same figure as the Frobenius norms of the whole arrays, whatever the block height, and
    dequantize_rows is dequantize's rows."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((257, 100)).astype(np.float32)
    q = bq.quantize(x, 4, 32, symmetric=False)
    whole = float(np.linalg.norm(x - q.dequantize()) / np.linalg.norm(x))
    assert np.array_equal(q.dequantize_rows(30, 90), q.dequantize()[30:90])
    assert q.relative_error(x) == pytest.approx(whole, rel=1e-6)
    monkeypatch.setattr(bq, "_CHUNK_ELEMENTS", 300)  # 3 rows a block: 86 blocks
    assert q.relative_error(x) == pytest.approx(whole, rel=1e-6)
    assert q.relative_error(np.zeros_like(x)) == 0.0

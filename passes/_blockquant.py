"""Block-wise low-bit quantization math shared by ``quantize-nbits`` and ``quantize-gather-block``.

Everything works on a 2-D float array ``x`` of shape [rows, cols], quantized along ``cols`` in
blocks of ``block_size`` consecutive values (the last block padded), each block with its own
scale ``s`` and integer zero point ``z``:

    x ≈ (q - z) * s,  q ∈ [0, 2^bits - 1]  (uint8 codes)

This is ONNX Runtime's ``MatMulNBits``/``GatherBlockQuantized`` (uint8 data) convention. A
symmetric quantizer fixes ``z = 2^(bits-1)`` (the kernels' default, so no zero points are
stored), i.e. signed levels -2^(bits-1) .. 2^(bits-1)-1; its scale may be negative: the
value of largest magnitude is mapped to the extra negative level, as MLAS and llama.cpp's
Q4_0 do, so all 2^bits levels are used. An asymmetric range is widened to contain 0: an
integer zero point in [0, 2^bits - 1] can express no other.

Quantizers (``Method``):

- ``rtn``: round to nearest on the block's min/max (signed extreme when symmetric).
- ``mse``: a clipping search: the range is shrunk by each factor of a grid (1.0 down to 0.7,
  lower for 2 bits), the factor with the least squared error kept per block, then the scale
  refitted by least squares to the chosen codes (a Lloyd step) where that helps. Vectorised
  over blocks.
- ``gptq``: see :func:`gptq` (needs the layer's input Hessian from calibration data).
- ``hqq``: half-quadratic quantization (idea from Badri & Shaji, "Half-Quadratic Quantization
  of Large Machine Learning Models", 2023): the zero point is optimised by alternating (1) the
  codes for the current zero point, (2) a sparsity-promoting shrinkage of the error (the
  proximal operator of the l_p norm, p < 1, so a few outliers may keep a large error while
  the bulk is fitted), (3) the zero point that best explains the weights minus the shrunk
  error. The zero point is then rounded to an integer (the kernels' packed zero points are
  integers), the scale refitted, and each block keeps the better of this and round-to-nearest
  in squared error. Asymmetric only.

Scales are rounded to ``scale_dtype`` (float16 halves their bytes) before the codes are
computed, so the stored scale is the one the codes were fitted to.

Packing (``pack``/``unpack``): ``8 // bits`` codes per byte along the last axis, the first in
the lowest bits ("low nibble first" for 4 bits), as both ORT kernels read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

MATMUL_NBITS_BITS = (2, 4, 8)  # what ORT's CPU MatMulNBits kernel runs
GATHER_BITS = (2, 4, 8)  # GatherBlockQuantized with uint8 data
QDQ_BITS = (4, 8)  # ONNX has int4/uint4 and int8/uint8 tensors; no 2-bit type
BLOCK_SIZES = (16, 32, 64, 128, 256)  # powers of two the ORT kernels accept
# calibration texts a GPTQ fit asks for (a model spec caps them: MiniLM 256, SmolLM2 1024). Its
# Hessians are K x K (1536 for an FFN): on MiniLM the output cosine went 0.988 -> 0.991 from 32
# to 256 tweets; SmolLM2's held-out error kept falling up to 64k tokens (models/smollm2.py)
GPTQ_CALIBRATION_TEXTS = 1024

_CHUNK_ELEMENTS = 1 << 21  # rows are processed in chunks of about this many values


class Method(str, enum.Enum):
    RTN = "rtn"
    MSE = "mse"
    HQQ = "hqq"
    GPTQ = "gptq"  # needs a Hessian X^T X of the layer's inputs (calibration): see gptq()


def shrink_grid(bits: int) -> np.ndarray:
    """Range-shrink factors the ``mse`` quantizer tries (coarser grids clip more)."""
    low = 0.5 if bits <= 2 else 0.7
    return np.linspace(1.0, low, int(round((1.0 - low) / 0.02)) + 1, dtype=np.float32)


@dataclass
class BlockQuant:
    """Codes, scales and zero points of a [rows, cols] array quantized along cols."""

    q: np.ndarray  # uint8 [rows, n_blocks, block] (padding included)
    scale: np.ndarray  # [rows, n_blocks] in the stored scale dtype (float32 or float16)
    zero: np.ndarray  # uint8 [rows, n_blocks]
    bits: int
    block_size: int
    cols: int  # valid columns (the rest of the last block is padding)
    symmetric: bool

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols]."""
        x = self.q.astype(np.float32)  # in place from here: one float32 copy of the layer, not three
        x -= self.zero.astype(np.float32)[:, :, None]
        x *= self.scale.astype(np.float32)[:, :, None]
        return x.reshape(self.rows, -1)[:, : self.cols]

    def signed_codes(self) -> np.ndarray:
        """int8 [rows, cols] codes minus the symmetric zero point (for int4/int8 tensors)."""
        q = self.q.astype(np.int16).reshape(self.rows, -1)[:, : self.cols]
        return (q - (1 << (self.bits - 1))).astype(np.int8)

    def codes(self) -> np.ndarray:
        """uint8 [rows, cols]."""
        return self.q.reshape(self.rows, -1)[:, : self.cols]

    def dequantize_rows(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, cols]: :meth:`dequantize` of those rows only."""
        x = self.q[start:stop].astype(np.float32)
        x -= self.zero[start:stop].astype(np.float32)[:, :, None]
        x *= self.scale[start:stop].astype(np.float32)[:, :, None]
        return x.reshape(stop - start, -1)[:, : self.cols]

    def relative_error(self, x: np.ndarray) -> float:
        """||x - dequantized|| / ||x|| (Frobenius), by row blocks: a 32000 x 4096 LM head is
        never dequantized whole (that and the difference were two more copies of the layer)."""
        rows = max(1, _CHUNK_ELEMENTS // max(1, self.cols))
        num = den = 0.0
        for i in range(0, self.rows, rows):
            xi = np.asarray(x[i:i + rows], dtype=np.float32)
            d = xi - self.dequantize_rows(i, min(i + rows, self.rows))
            num += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
            den += float(np.einsum("ij,ij->", xi, xi, dtype=np.float64))
        return float(np.sqrt(num / den)) if den > 0 else 0.0

    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales and (asymmetric) packed zero points."""
        codes = self.rows * self.n_blocks * self.block_size * self.bits // 8
        zeros = 0 if self.symmetric else self.rows * -(-self.n_blocks * self.bits // 8)
        return int(codes + self.scale.nbytes + zeros)


# --------------------------------------------------------------------------- packing


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., L] → uint8 [..., ceil(L * bits / 8)], ``8 // bits`` per byte, low bits first."""
    if bits not in (2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes; supported: 2, 4, 8")
    q = np.asarray(q, dtype=np.uint8)
    per = 8 // bits
    if per == 1:
        return np.ascontiguousarray(q)
    length = q.shape[-1]
    pad = (-length) % per
    if pad:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], pad), np.uint8)], axis=-1)
    q = q.reshape(*q.shape[:-1], -1, per)
    out = np.zeros(q.shape[:-1], np.uint8)
    mask = (1 << bits) - 1
    for j in range(per):
        out |= (q[..., j] & mask) << (bits * j)
    return out


def unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 [..., n] → uint8 codes [..., length]."""
    packed = np.asarray(packed, dtype=np.uint8)
    per = 8 // bits
    if per == 1:
        return packed[..., :length].copy()
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    out = np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)
    return np.ascontiguousarray(out[..., :length])


# --------------------------------------------------------------------------- quantizers


def quantize(
    x: np.ndarray,
    bits: int,
    block_size: int,
    *,
    symmetric: bool,
    method: Method | str = Method.RTN,
    scale_dtype: type = np.float32,
) -> BlockQuant:
    """Quantize [rows, cols] along cols; ``block_size`` 0 means one block per row (per-channel)."""
    method = Method(method)
    if method is Method.GPTQ:
        raise ValueError("gptq needs the layer's input Hessian: call gptq()")
    if method is Method.HQQ and symmetric:
        raise ValueError("hqq optimises the zero point: asymmetric only")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got {x.ndim}-D")
    rows, cols = x.shape
    block = block_size or cols
    n_blocks = -(-cols // block)
    pad = n_blocks * block - cols
    if pad:  # edge padding: repeating the last value leaves min/max (and the fit) unchanged
        x = np.concatenate([x, np.repeat(x[:, -1:], pad, axis=1)], axis=1)
    blocks = x.reshape(rows * n_blocks, block)
    q = np.empty(blocks.shape, np.uint8)
    scale = np.empty(rows * n_blocks, scale_dtype)
    zero = np.empty(rows * n_blocks, np.uint8)
    step = max(1, _CHUNK_ELEMENTS // block)
    for start in range(0, blocks.shape[0], step):
        part = slice(start, start + step)
        q[part], scale[part], zero[part] = _quantize_blocks(blocks[part], bits, symmetric, method, scale_dtype)
    return BlockQuant(
        q.reshape(rows, n_blocks, block), scale.reshape(rows, n_blocks), zero.reshape(rows, n_blocks),
        bits, block, cols, symmetric,
    )


def _quantize_blocks(x, bits, symmetric, method, scale_dtype):
    qmax = (1 << bits) - 1
    if symmetric:
        mid = float(1 << (bits - 1))
        idx = np.abs(x).argmax(axis=1)
        extreme = x[np.arange(len(x)), idx]
        base = extreme / -mid  # the signed extreme lands on level -2^(bits-1)
        z = np.full(len(x), mid, np.float32)
        s, z = _fix_scale(base, scale_dtype), z
        if method is Method.MSE:
            s = _search_symmetric(x, base, z, qmax, scale_dtype, bits)
    else:
        lo, hi = x.min(axis=1), x.max(axis=1)
        s, z = _asym_params(lo, hi, qmax, scale_dtype)
        if method is Method.MSE:
            s, z = _search_asymmetric(x, lo, hi, qmax, scale_dtype, bits)
        elif method is Method.HQQ:
            s, z = _hqq(x, s, z, qmax, scale_dtype)
    if method is not Method.RTN:
        s = _refit_scale(x, s, z, qmax, scale_dtype)
    q = _codes(x, s, z, qmax)
    return q.astype(np.uint8), s.astype(scale_dtype), z.astype(np.uint8)


def _fix_scale(s, scale_dtype):
    """Round to the stored dtype; a zero scale (constant block) becomes 1 (codes = zero point)."""
    s = np.asarray(s, dtype=np.float32).astype(scale_dtype).astype(np.float32)
    return np.where(s == 0, np.float32(1.0), s)


def _asym_params(lo, hi, qmax, scale_dtype):
    # an integer zero point in [0, qmax] can only express ranges that contain 0
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = _fix_scale((hi - lo) / qmax, scale_dtype)
    z = np.clip(np.rint(-lo / s), 0, qmax).astype(np.float32)
    return s, z


def _codes(x, s, z, qmax):
    return np.clip(np.rint(x / s[:, None]) + z[:, None], 0, qmax)


def _sq_error(x, s, z, qmax):
    q = _codes(x, s, z, qmax)
    d = (q - z[:, None]) * s[:, None] - x
    return np.einsum("ij,ij->i", d, d)


def _search_symmetric(x, base, z, qmax, scale_dtype, bits):
    best_s = _fix_scale(base, scale_dtype)
    best_e = _sq_error(x, best_s, z, qmax)
    for factor in shrink_grid(bits)[1:]:
        s = _fix_scale(base * factor, scale_dtype)
        e = _sq_error(x, s, z, qmax)
        better = e < best_e
        best_s = np.where(better, s, best_s)
        best_e = np.where(better, e, best_e)
    return best_s


def _search_asymmetric(x, lo, hi, qmax, scale_dtype, bits):
    best_s, best_z = _asym_params(lo, hi, qmax, scale_dtype)
    best_e = _sq_error(x, best_s, best_z, qmax)
    for factor in shrink_grid(bits)[1:]:
        s, z = _asym_params(lo * factor, hi * factor, qmax, scale_dtype)
        e = _sq_error(x, s, z, qmax)
        better = e < best_e
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
        best_e = np.where(better, e, best_e)
    return best_s, best_z


def _refit_scale(x, s, z, qmax, scale_dtype, iters: int = 2):
    """Lloyd steps with the zero point fixed: the least-squares scale for the current codes,
    then new codes; a block keeps a new scale only where it lowers the squared error."""
    best_e = _sq_error(x, s, z, qmax)
    for _ in range(iters):
        c = _codes(x, s, z, qmax) - z[:, None]
        den = np.einsum("ij,ij->i", c, c)
        num = np.einsum("ij,ij->i", c, x)
        cand = _fix_scale(np.where(den > 0, num / np.where(den > 0, den, 1), s), scale_dtype)
        e = _sq_error(x, cand, z, qmax)
        better = e < best_e
        if not better.any():
            break
        s = np.where(better, cand, s)
        best_e = np.where(better, e, best_e)
    return s


def _hqq(x, s, z0, qmax, scale_dtype, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20):
    """Half-quadratic zero-point optimisation (see the module docstring), then integer zero
    points; blocks where it does not beat round-to-nearest in squared error keep RTN."""
    z = z0.astype(np.float32).copy()
    best_z = z.copy()
    best_e = np.full(len(x), np.inf, np.float32)
    sc = s[:, None]
    for _ in range(iters):
        q = np.clip(np.rint(x / sc + z[:, None]), 0, qmax)
        err = x - (q - z[:, None]) * sc
        mean_abs = np.abs(err).mean(axis=1)
        better = mean_abs < best_e
        best_z = np.where(better, z, best_z)
        best_e = np.where(better, mean_abs, best_e)
        # proximal step of the l_p (p < 1) norm: shrink small errors to 0, keep large ones
        a = np.abs(err)
        shrunk = np.sign(err) * np.maximum(a - (1.0 / beta) * np.power(a + 1e-8, p - 1.0), 0.0)
        z = (q - (x - shrunk) / sc).mean(axis=1)
        beta *= kappa
    z_int = np.clip(np.rint(best_z), 0, qmax).astype(np.float32)
    s_new = _refit_scale(x, s, z_int, qmax, scale_dtype)
    e_new = _sq_error(x, s_new, z_int, qmax)
    e_rtn = _sq_error(x, s, z0, qmax)
    keep = e_new < e_rtn
    return np.where(keep, s_new, s), np.where(keep, z_int, z0)


LARGE_HESSIAN = 4096  # inputs wider than this invert their Hessian in float32 (see gptq)


def gptq(
    w_t: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    *,
    symmetric: bool,
    scale_dtype: type = np.float32,
    damp: float = 0.01,
    search: Method | str = Method.MSE,
    lazy_block: int = 128,
    act_order: bool = False,
) -> BlockQuant:
    """GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", 2022), own numpy code: the columns of W^T [N, K] are quantized
    one input channel at a time, and each one's rounding error, weighted by the inverse
    Hessian H = X^T X of the layer's inputs (from calibration), is pushed onto the columns not
    yet quantized, so that X W^T rather than W is preserved. A block's scale and zero point are
    chosen (``search``: rtn or mse) when its first column is reached, on the weights as updated
    so far. ``damp`` × mean(diag H) is added to the diagonal (few calibration tokens, dead
    channels). Updates are applied lazily per ``lazy_block`` columns (a multiple of the block).
    """
    search = Method(search)
    n, k = np.shape(w_t)
    block = block_size or k
    # the Hessian's algebra in float64, or float32 past LARGE_HESSIAN inputs (the reference
    # implementation's precision), in one K x K working copy (see _upper_inverse_factor)
    dtype = np.float32 if k > LARGE_HESSIAN else np.float64
    if np.shape(hessian) != (k, k):
        raise ValueError(f"hessian is {np.shape(hessian)}, expected {(k, k)}")
    diag, dead = _damped_diagonal(hessian, damp, dtype)
    n_blocks = -(-k // block)
    codes = np.zeros((n, n_blocks * block), np.uint8)
    scales = np.zeros((n, n_blocks), np.float32)
    zeros = np.zeros((n, n_blocks), np.float32)
    # "static groups" (act_order): the columns in order of decreasing Hessian diagonal, the
    # blocks' parameters from the original weights (the blocks stay contiguous: no g_idx needed)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    # upper Cholesky factor of H^-1 (as in the reference implementation)
    try:
        hinv = _upper_inverse_factor(_working_hessian(hessian, perm, diag[perm], dtype))
    except np.linalg.LinAlgError:
        more = diag[perm] + 0.1 * float(np.mean(diag[perm]))
        hinv = _upper_inverse_factor(_working_hessian(hessian, perm, more, dtype))
    # the column loop in float32 (the reference implementation's precision; the Hessian work
    # above may be float64): half the memory traffic of the per-column rank-1 updates
    hinv = hinv.astype(np.float32, copy=False)
    # each row of W^T is fitted on its own (the Hessian is shared): the rows go a few thousand at
    # a time, so that the working copies follow GPTQ_ROW_BYTES, not the layer (a 32000-row LM
    # head held three float32 copies of itself, ~0.8 GB at hidden 2048)
    # (chunks of equal size: one of a few rows would go through BLAS's matrix-vector kernels,
    # whose sums round differently from the matrix-matrix ones)
    chunks = -(-n // max(1, GPTQ_ROW_BYTES // (4 * k)))
    step = -(-n // chunks)
    for r0 in range(0, n, step):
        rows = slice(r0, min(r0 + step, n))
        _gptq_rows(np.asarray(w_t[rows]), hinv, perm, dead, bits, block, codes[rows], scales[rows], zeros[rows],
                   symmetric=symmetric, scale_dtype=scale_dtype, search=search, lazy_block=lazy_block,
                   act_order=act_order)
    if n_blocks * block > k:  # padding codes: the zero point (dequantize to 0)
        codes[:, k:] = np.repeat(zeros[:, -1:], n_blocks * block - k, axis=1).astype(np.uint8)
    return BlockQuant(
        codes.reshape(n, n_blocks, block), scales.astype(scale_dtype), zeros.astype(np.uint8), bits, block, k, symmetric
    )


GPTQ_ROW_BYTES = 64 << 20  # float32 bytes of W^T rows fitted at a time (gptq)


def _damped_diagonal(hessian: np.ndarray, damp: float, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's Hessian diagonal as it fits with it: dead channels (a zero or negative diagonal) set
    to 1, then ``damp`` x the mean added to every entry; and the dead channels' mask."""
    diag = np.array(np.diagonal(hessian), dtype=dtype)
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * float(np.mean(diag))
    return diag, dead


def refine_codes(w_t: np.ndarray, hessian: np.ndarray, quant: BlockQuant, *, damp: float = 0.01,
                 sweeps: int = 1, lazy_block: int = 128) -> BlockQuant:
    """Coordinate descent on ``quant``'s codes for the layer objective GPTQ minimizes,
    (W - Q) H (W - Q)^T per row of W^T [N, K], with H damped as :func:`gptq` damps it and the
    scales and zero points kept (the update of QuantEase, Behdin et al. 2023, started from
    GPTQ's codes). Each column in turn moves every row's code to the grid point nearest the
    minimizer along that column, which never raises the objective; ``sweeps`` passes over the
    columns. The residual's product with H is kept per row and updated lazily per
    ``lazy_block`` columns (a GEMM), as GPTQ's error updates are. Changes ``quant.q`` in place
    and returns ``quant``."""
    n, k = np.shape(w_t)
    if np.shape(hessian) != (k, k):
        raise ValueError(f"hessian is {np.shape(hessian)}, expected {(k, k)}")
    diag, dead = _damped_diagonal(hessian, damp, np.float64)
    h = np.array(hessian, dtype=np.float32)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[np.diag_indices(k)] = diag
    hdiag = diag.astype(np.float32)
    qmax = (1 << quant.bits) - 1
    codes = quant.q.reshape(n, -1)
    step = max(1, GPTQ_ROW_BYTES // (4 * k))
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        w = np.array(w_t[rows], dtype=np.float32)
        w[:, dead] = 0.0
        s = np.repeat(quant.scale[rows].astype(np.float32), quant.block_size, axis=1)[:, :k]
        z = np.repeat(quant.zero[rows].astype(np.float32), quant.block_size, axis=1)[:, :k]
        q = codes[rows, :k].astype(np.float32)
        wq = (q - z) * s
        g = (w - wq) @ h  # the objective's half-gradient per column, kept current
        del w
        live = s != 0
        inv = np.where(live, 1.0 / np.where(live, s, 1.0), 0.0).astype(np.float32)
        for _ in range(sweeps):
            for b0 in range(0, k, lazy_block):
                b1 = min(k, b0 + lazy_block)
                moved = np.zeros((q.shape[0], b1 - b0), np.float32)
                for j in range(b0, b1):
                    target = wq[:, j] + g[:, j] / hdiag[j]
                    new = np.clip(np.rint(target * inv[:, j] + z[:, j]), 0, qmax)
                    new = np.where(live[:, j], new, q[:, j])
                    d = (new - q[:, j]) * s[:, j]
                    changed = np.flatnonzero(d)  # few rows a column: GPTQ's codes are near the optimum
                    if not len(changed):
                        continue
                    d = d[changed]
                    q[changed, j] = new[changed]
                    wq[changed, j] += d
                    moved[changed, j - b0] = d
                    g[changed, b0:b1] -= np.outer(d, h[j, b0:b1])
                if moved.any():
                    if b0:
                        g[:, :b0] -= moved @ h[b0:b1, :b0]
                    if b1 < k:
                        g[:, b1:] -= moved @ h[b0:b1, b1:]
        codes[rows, :k] = q.astype(np.uint8)
    return quant


def _gptq_rows(w_t, hinv, perm, dead, bits, block, codes, scales, zeros, *, symmetric, scale_dtype, search,
               lazy_block, act_order, record=None) -> None:
    """GPTQ's column loop on rows of W^T [n, K], writing their codes, scales and zero points
    (views of the whole layer's arrays); ``record`` ([n, K] float32, original column order), if
    given, receives the value each column had, after the error updates, when it was quantized."""
    # working copy, float32: before the column loop it is only zeroed and permuted (a float64
    # copy gave the same bits at twice the memory)
    w = np.array(w_t, dtype=np.float32)
    k = w.shape[1]
    w[:, dead] = 0.0
    qmax = (1 << bits) - 1
    if act_order:
        start = quantize(w, bits, block, symmetric=symmetric, method=search, scale_dtype=scale_dtype)
        scales[:], zeros[:] = start.scale, start.zero
        del start
        w = w[:, perm]
    lazy = max(block, (lazy_block // block) * block) if block < k else k
    s = z = None
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block
            if act_order:
                s, z = scales[:, g], zeros[:, g]
            elif col % block == 0:
                grp = w1[:, i : i + block].astype(np.float32)
                if grp.shape[1] < block:  # last, partial block: edge-pad like quantize()
                    grp = np.concatenate([grp, np.repeat(grp[:, -1:], block - grp.shape[1], axis=1)], axis=1)
                _, s16, z8 = _quantize_blocks(grp, bits, symmetric, search, scale_dtype)
                s = s16.astype(np.float32)
                z = z8.astype(np.float32)
                scales[:, g], zeros[:, g] = s16, z8
            x = w1[:, i]
            if record is not None:
                record[:, col] = x
            q = np.clip(np.rint(x / s) + z, 0, qmax)
            codes[:, col] = q
            e = (x - (q - z) * s) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


ROWS_AT_ONCE = 256  # rows of the Hessian permuted and cast at a time (_working_hessian)


def _working_hessian(hessian: np.ndarray, perm: np.ndarray, diag: np.ndarray, dtype: type) -> np.ndarray:
    """H[perm][:, perm] as a new C-contiguous ``dtype`` array with ``diag`` on its diagonal,
    built a few rows at a time (no second K x K copy: a permuted copy of an 11008-wide float64
    Hessian alone is ~1 GB)."""
    k = len(perm)
    h = np.empty((k, k), dtype)
    src = np.asarray(hessian)
    ordered = bool(np.all(perm[1:] > perm[:-1])) if k > 1 else True
    for i in range(0, k, ROWS_AT_ONCE):
        rows = perm[i : i + ROWS_AT_ONCE]
        h[i : i + len(rows)] = src[i : i + len(rows)] if ordered else src[rows][:, perm]
    h[np.diag_indices(k)] = diag
    return h


IN_PLACE_ABOVE = 2048  # wider Hessians are factored in place (_inverse_factor_in_place)


def _upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U, GPTQ's ``hinv``); ``h`` may be
    overwritten. Up to :data:`IN_PLACE_ABOVE` inputs from the Cholesky factor of H with its
    rows and columns reversed (:func:`_reversed_inverse_factor`, ~3 K x K copies at once, at most
    ~100 MB there); wider, in place. Raises LinAlgError where H is not positive definite."""
    if h.shape[0] > IN_PLACE_ABOVE:
        return _inverse_factor_in_place(h)
    return _reversed_inverse_factor(h)


def _reversed_inverse_factor(h: np.ndarray) -> np.ndarray:
    """:func:`_upper_inverse_factor` with numpy alone. With J the reversal of the K indices and
    J H J = L L^T (L lower), H^-1 = J L^-T L^-1 J = U^T U for U = J L^-1 J, which is upper
    triangular with a positive diagonal: the factor itself. L^-1 comes from
    :func:`_lower_inverse`, so the whole costs ~K^3 / 1.5 multiplications where
    ``numpy.linalg.inv`` then ``cholesky`` cost ~2.3 K^3: 2.6x faster at K = 576 and 1,536 (AMD
    EPYC, 2 cores), factors equal to ~5e-16 relative in float64."""
    return _lower_inverse(np.linalg.cholesky(h[::-1, ::-1]))[::-1, ::-1]


TRIANGLE_DIRECT = 96  # lower-triangular blocks up to this size are inverted directly


def _lower_inverse(l: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix (nonzero diagonal), by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]], the off-diagonal block as two GEMMs
    (numpy's BLAS: no second thread pool), blocks of :data:`TRIANGLE_DIRECT` or fewer by
    ``numpy.linalg.inv`` (its upper triangle, zero in exact arithmetic, cleared)."""
    n = l.shape[0]
    if n <= TRIANGLE_DIRECT:
        return np.tril(np.linalg.inv(l))
    half = n // 2
    a = _lower_inverse(l[:half, :half])
    c = _lower_inverse(l[half:, half:])
    out = np.zeros_like(l)
    out[:half, :half] = a
    out[half:, half:] = c
    out[half:, :half] = -(c @ (l[half:, :half] @ a))
    return out


def _inverse_factor_in_place(h: np.ndarray) -> np.ndarray:
    """:func:`_upper_inverse_factor` in ``h``'s memory (which it overwrites; C-contiguous):
    LAPACK's Cholesky factorization, the inverse from it, and the factorization of that inverse,
    each in place on the one K x K array (``potrf``, ``potri``, ``potrf``, through SciPy), where
    ``numpy.linalg.inv`` then ``cholesky`` (the narrower inputs' path before
    :func:`_reversed_inverse_factor`) held ~4 copies of H and did ~2x the arithmetic
    (bench/bench_gptq_memory.py: a 2048 x 5632 layer's whole GPTQ call peaked 282 MB above its
    inputs against 1,186 MB, 2.4x faster; factors equal to ~1e-6 relative in float32, ~1e-15 in
    float64). Not used on narrower inputs, where the copies are small: SciPy's BLAS threads are a
    second pool beside numpy's and ONNX Runtime's, not worth waking for a few milliseconds."""
    from scipy.linalg import lapack

    a = h.T  # the same memory, Fortran-ordered: LAPACK works on it in place (H is symmetric)
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (a,))
    factor, info = potrf(a, lower=True, clean=False, overwrite_a=True)
    if info == 0:
        inverse, info = potri(factor, lower=True, overwrite_c=True)  # its lower triangle
        if info == 0:
            factor, info = potrf(inverse, lower=True, clean=True, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Hessian not positive definite (LAPACK info {info})")
    return factor.T  # H^-1 = L L^T with L lower (Fortran view); U = L^T is C-contiguous


def refit_scales(w_t: np.ndarray, hessian: np.ndarray, quant: BlockQuant, *, passes: int = 2) -> BlockQuant:
    """The block scales re-chosen, codes and zero points kept, to lower the output error
    tr(D H D^T) (D = W^T - dequantized, H the layer's input second moments: the loss GPTQ
    minimizes). One block at a time, for all rows at once, the scale is the exact minimizer
    with the other blocks fixed (a 1-D least squares: s = c^T [H r] / c^T H c over the block,
    r the row's residual without this block), rounded to the stored scale dtype and kept only
    where it lowers the error; ``passes`` sweeps over the blocks. The error never rises."""
    w = np.asarray(w_t, dtype=np.float64)
    n, k = w.shape
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise ValueError(f"hessian is {h.shape}, expected {(k, k)}")
    b = quant.block_size
    codes = (quant.q.reshape(n, -1)[:, :k].astype(np.float64)
             - np.repeat(quant.zero.astype(np.float64), b, axis=1)[:, :k])
    scale = quant.scale.astype(np.float64)
    err = w - codes * np.repeat(scale, b, axis=1)[:, :k]
    err_h = err @ h
    for _ in range(passes):
        for g in range(quant.n_blocks):
            cols = slice(g * b, min((g + 1) * b, k))
            c, hgg = codes[:, cols], h[cols, cols]
            c_h = c @ hgg
            den = np.einsum("ij,ij->i", c_h, c)
            # err_h over this block with this block's own term taken out: [H r]_g
            num = np.einsum("ij,ij->i", c, err_h[:, cols]) + scale[:, g] * den
            new = np.where(den > 0, num / np.where(den > 0, den, 1.0), scale[:, g])
            new = new.astype(quant.scale.dtype).astype(np.float64)
            delta = new - scale[:, g]
            # error change: -delta c on the block; its H-norm change, exactly
            gain = 2 * delta * np.einsum("ij,ij->i", c, err_h[:, cols]) - delta ** 2 * den
            delta = np.where((gain > 0) & np.isfinite(new) & (new != 0), delta, 0.0)
            if not delta.any():
                continue
            step = delta[:, None] * c
            err[:, cols] -= step
            err_h -= step @ h[cols, :]
            scale[:, g] += delta
    return BlockQuant(quant.q, scale.astype(quant.scale.dtype), quant.zero, quant.bits, b, quant.cols, quant.symmetric)



def matmul_nbits_arrays(bq: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, n_blocks, blob], scales [N * n_blocks], packed zero points
    [N, ceil(n_blocks * bits / 8)] or None when symmetric) for com.microsoft MatMulNBits,
    where ``bq`` quantized W^T ([N, K]) along K."""
    b = pack(bq.q, bq.bits)  # [N, n_blocks, block * bits / 8]
    zp = None if bq.symmetric else pack(bq.zero, bq.bits)
    return b, bq.scale.reshape(-1), zp


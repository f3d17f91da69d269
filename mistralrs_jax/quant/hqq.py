"""Half-quadratic quantization (HQQ; Badri & Shaji, 2023), held in the int8 affine form.

HQQ is calibration-free affine quantization: per group of `group_size` consecutive values
of a row, w ~ (q - zero) / inv_scale with q in [0, 2^bits - 1]. Plain round-to-nearest
(RTN) takes inv_scale and zero from the group's min and max. HQQ keeps that scale and
improves the zero point by minimising a sparsity-promoting lp loss (p < 1) of the error,
||w - dequant(q(w))||_p^p, with half-quadratic splitting: an auxiliary error variable W_e
lets both sub-problems have closed forms, solved alternately for a few iterations:

    W_e  <- shrink_p(w - dequant(q))             (generalized soft-thresholding)
    zero <- mean over the group of (q - (w - W_e) * inv_scale)
    beta <- beta * kappa                          (tighten the splitting)

With lp shrinkage large errors (outliers) are left in W_e instead of dragging the zero
point; small errors shrink to zero, and then the update is the least-squares zero for the
current codes. Defaults follow the reference implementation and mistral.rs' ISQ:
p = 0.7, beta = 10, kappa = 1.01, 10 iterations, groups of 64.

Two deliberate differences from the reference code, both for quality:
- groups are 64 consecutive values along a row (the input axis), the layout a matmul
  kernel reads (`Linear`'s int8 form); mistral.rs' ISQ reshapes the flat tensor to
  (64, -1) and groups along axis 0, i.e. strided values;
- the best zero point seen is kept per group (the reference stops the whole tensor when
  its mean error stops falling), so every group ends no worse than RTN in mean absolute
  error, which is the quantity the iterations are judged by.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .formats import AffineInt8

F32 = np.float32

HQQ_GROUP_SIZE = 64  # mistral.rs' ISQ_HQQ_GROUP_SIZE
# The packed layout (what `Linear` holds): per group of 64 weights of a row, an f16 scale
# (1 / inv_scale), an f16 zero point (in code units) and the codes: 32 bytes of nibbles for
# 4 bits (byte j holds code j low and code j + 32 high), 64 bytes for 8 bits.
# w = (q - zero) * scale, so HQQ4 is 4.5 bits per weight and HQQ8 8.5, like Q4_0 and Q8_0.
HQQ_BLOCK_BYTES = {4: 4 + HQQ_GROUP_SIZE // 2, 8: 4 + HQQ_GROUP_SIZE}
HQQ_ITERS = 10  # mistral.rs' ISQ_HQQ_DEFAULT_OPT_STEPS
HQQ_LP_NORM = 0.7
HQQ_BETA = 10.0
HQQ_KAPPA = 1.01
# Rows per pass: temporaries stay cache-sized and memory stays flat on big tensors.
_CHUNK_ELEMENTS = 1 << 18


class HQQWeights(NamedTuple):
    """w[r, c] ~ (q[r, c] - zero[r, c // g]) / inv_scale[r, c // g]."""

    q: np.ndarray  # uint8 (rows, cols), values 0 .. 2^bits - 1
    inv_scale: np.ndarray  # f32 (rows, cols // g)
    zero: np.ndarray  # f32 (rows, cols // g)
    bits: int
    group_size: int


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalized soft-thresholding, the proximal step of beta/2 ||.||^2 + ||.||_p^p.

    It returns exactly 0 wherever |x|^(2-p) <= 1/beta; LLM weights' rounding errors are
    nearly always that small, so the costly power is skipped when a whole chunk is.
    """
    magnitude = np.abs(x)
    if float(magnitude.max(initial=0.0)) < 0.99 * (1.0 / beta) ** (1.0 / (2.0 - p)):
        return np.zeros_like(x)
    with np.errstate(divide="ignore"):  # |0|^(p-1) = inf shrinks 0 to 0, as it should
        threshold = np.power(magnitude, F32(p - 1.0)) / F32(beta)
    return np.sign(x) * np.maximum(magnitude - threshold, F32(0.0))


def _optimize_groups(w: np.ndarray, bits: int, iters: int, lp_norm: float, beta: float,
                     kappa: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w: f32 (n_groups, g) -> (codes f32, inv_scale (n, 1), zero (n, 1)).

    Works in the code domain (w * inv_scale) where the error of a group is
    (scaled - q + zero) / inv_scale; its shrinkage is taken in the weights' own units.
    """
    max_q = F32(2**bits - 1)
    low = w.min(axis=1, keepdims=True)
    high = w.max(axis=1, keepdims=True)
    spread = high - low
    # A constant group has no range: any scale represents it exactly with zero = -low * scale.
    has_range = spread > 0
    inv_scale = np.where(has_range, max_q / np.where(has_range, spread, F32(1.0)), F32(1.0)).astype(F32)
    scale = (F32(1.0) / inv_scale).astype(F32)
    zero = (-low * inv_scale).astype(F32)
    scaled = w * inv_scale

    def codes(z):
        return np.clip(np.rint(scaled + z), F32(0.0), max_q)

    q = codes(zero)
    residual = scaled - q  # error of the group in code units is residual + zero
    best_zero = zero.copy()
    best_error = np.mean(np.abs(residual + zero), axis=1, keepdims=True)
    for _ in range(iters):
        w_e = _shrink_lp((residual + zero) * scale, beta, lp_norm)
        zero = -np.mean(residual - w_e * inv_scale, axis=1, keepdims=True, dtype=F32)
        beta *= kappa
        q = codes(zero)
        residual = scaled - q
        error = np.mean(np.abs(residual + zero), axis=1, keepdims=True)
        better = error < best_error
        np.copyto(best_zero, zero, where=better)
        np.copyto(best_error, error, where=better)
    return codes(best_zero), inv_scale, best_zero


def hqq_quantize(w: np.ndarray, bits: int, group_size: int = HQQ_GROUP_SIZE, *, iters: int = HQQ_ITERS,
                 lp_norm: float = HQQ_LP_NORM, beta: float = HQQ_BETA, kappa: float = HQQ_KAPPA) -> HQQWeights:
    """HQQ-quantize a 2-D weight (rows, cols) in groups of `group_size` along each row.

    `iters=0` gives plain min-max round-to-nearest (the starting point HQQ improves on).
    """
    values = np.asarray(w, dtype=F32)
    if values.ndim != 2:
        raise ValueError(f"hqq_quantize takes a 2-D weight, got shape {values.shape}")
    if not 1 <= bits <= 8:
        raise ValueError(f"HQQ bits must be 1..8 to fit the int8 form, got {bits}")
    rows, cols = values.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of the HQQ group size {group_size}")
    n_groups = cols // group_size
    q = np.empty((rows, cols), dtype=np.uint8)
    inv_scale = np.empty((rows, n_groups), dtype=F32)
    zero = np.empty((rows, n_groups), dtype=F32)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        groups = values[start:stop].reshape(-1, group_size)
        codes, s, z = _optimize_groups(groups, bits, iters, lp_norm, beta, kappa)
        q[start:stop] = codes.reshape(stop - start, cols)
        inv_scale[start:stop] = s.reshape(stop - start, n_groups)
        zero[start:stop] = z.reshape(stop - start, n_groups)
    return HQQWeights(q, inv_scale, zero, bits, group_size)


def hqq_dequantize(weights: HQQWeights) -> np.ndarray:
    rows, cols = weights.q.shape
    g = weights.group_size
    codes = weights.q.reshape(rows, cols // g, g).astype(F32)
    return ((codes - weights.zero[..., None]) / weights.inv_scale[..., None]).reshape(rows, cols)


def hqq_to_affine_int8(weights: HQQWeights) -> AffineInt8:
    """The same weights as w = q8 * scale + offset with int8 q8.

    Codes are centred (q8 = q - 2^(bits-1)) so 8-bit codes fit int8:
    (q - zero) / inv_scale = q8 * scale + (2^(bits-1) - zero) * scale, scale = 1 / inv_scale.
    """
    centre = 2 ** (weights.bits - 1)
    q8 = (weights.q.astype(np.int16) - centre).astype(np.int8)
    scale = (F32(1.0) / weights.inv_scale).astype(F32)
    offset = ((F32(centre) - weights.zero) * scale).astype(F32)
    return AffineInt8(q8, scale, offset, weights.group_size)


def hqq_pack(weights: HQQWeights) -> np.ndarray:
    """HQQWeights (4 or 8 bits, groups of 64) -> the packed layout, uint8 [rows, cols / 64 * block bytes].

    Scale and zero point are rounded to f16 (as HQQ keeps its meta in the model's half dtype):
    at most 2^-11 relative on the scale and 2^-8 of a code step on the zero point.
    """
    if weights.bits not in HQQ_BLOCK_BYTES or weights.group_size != HQQ_GROUP_SIZE:
        raise ValueError(f"the packed HQQ layout holds 4 or 8 bits in groups of {HQQ_GROUP_SIZE}, "
                         f"not {weights.bits} bits in groups of {weights.group_size}")
    rows, cols = weights.q.shape
    n_groups = cols // HQQ_GROUP_SIZE
    out = np.empty((rows, n_groups, HQQ_BLOCK_BYTES[weights.bits]), dtype=np.uint8)
    with np.errstate(over="ignore", divide="ignore"):
        scale = (F32(1.0) / weights.inv_scale).astype(np.float16)
    out[:, :, 0:2] = scale.reshape(rows, n_groups, 1).view(np.uint8)
    out[:, :, 2:4] = weights.zero.astype(np.float16).reshape(rows, n_groups, 1).view(np.uint8)
    codes = weights.q.reshape(rows, n_groups, HQQ_GROUP_SIZE)
    if weights.bits == 4:
        out[:, :, 4:] = (codes[:, :, :32] & 15) | (codes[:, :, 32:] << 4)
    else:
        out[:, :, 4:] = codes
    return out.reshape(rows, -1)


def hqq_unpack(blocks: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """The packed layout -> f32 [rows, cols], w = (q - zero) * scale evaluated in f32."""
    rows = blocks.shape[0]
    n_groups = cols // HQQ_GROUP_SIZE
    raw = np.ascontiguousarray(blocks).reshape(rows, n_groups, HQQ_BLOCK_BYTES[bits])
    scale = np.ascontiguousarray(raw[:, :, 0:2]).view(np.float16).astype(F32)
    zero = np.ascontiguousarray(raw[:, :, 2:4]).view(np.float16).astype(F32)
    payload = raw[:, :, 4:]
    codes = np.concatenate([payload & 15, payload >> 4], axis=-1) if bits == 4 else payload
    return ((codes.astype(F32) - zero) * scale).reshape(rows, cols)

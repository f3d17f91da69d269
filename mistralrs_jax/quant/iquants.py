"""Non-linear 4-bit formats: IQ4_NL, IQ4_XS and MXFP4.

Each stores 4-bit indices into a fixed table of small integers (a codebook), so a
value is table[index] * scale: still exactly int8 * f32 per group of 32. Layouts
follow ggml-common.h; the IQ4 quantizers follow ggml-quants.c's
`quantize_row_iq4_nl_impl` as `quantize_iq4_nl`/`quantize_iq4_xs` call it without an
importance matrix (what llama-quantize does), MXFP4 follows `quantize_row_mxfp4_ref`.
"""

from __future__ import annotations

import numpy as np

from .packing import (
    F32,
    GROUP_MAX_EPS,
    BlockFormat,
    Unpacked,
    bit_planes,
    elements_major,
    f16_bytes,
    f16_field,
    first_absmax,
    join_nibbles,
    nearest_int,
    pack_bit_planes,
    seq_sum,
    split_nibbles,
    u16_field,
)

# kvalues_iq4nl from ggml-common.h: a non-uniform grid, denser near zero.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
# kvalues_mxfp4: the FP4 (E2M1) values, doubled so that they are integers.
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)

# best_index_int8 picks level i once x reaches the midpoint of levels i-1 and i. The
# midpoints of integers are multiples of 1/2, so `midpoint <= x` depends on floor(2x)
# only (2x is exact): a table over floor(2x) gives the same index without a search.
_IQ4NL_FLOAT = IQ4NL_VALUES.astype(F32)
_TWICE_MIDPOINTS = IQ4NL_VALUES[:-1].astype(np.int32) + IQ4NL_VALUES[1:].astype(np.int32)
_LUT_LOW, _LUT_HIGH = int(_TWICE_MIDPOINTS[0]) - 1, int(_TWICE_MIDPOINTS[-1])
_INDEX_BY_FLOOR_2X = np.searchsorted(
    _TWICE_MIDPOINTS, np.arange(_LUT_LOW, _LUT_HIGH + 1), side="right"
).astype(np.uint8)


def _best_index(x: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL level to x (ties to the upper level), as in ggml."""
    twice = np.floor(np.clip(x, F32(_LUT_LOW / 2), F32(_LUT_HIGH / 2)) * F32(2))
    return _INDEX_BY_FLOOR_2X[twice.astype(np.int32) - _LUT_LOW]


def _codebook_nibbles(packed: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(n, 16k) bytes -> (n, 32k) int8 table values, 32-element groups, low nibbles first."""
    n = packed.shape[0]
    idx = split_nibbles(packed.reshape(-1, 16)).reshape(n, -1)
    return table[idx]


def _pack_codebook_nibbles(idx: np.ndarray) -> np.ndarray:
    """(n, 32k) indices -> (n, 16k) bytes: inverse of _codebook_nibbles."""
    groups = idx.reshape(-1, 2, 16)
    return join_nibbles(groups[:, 0], groups[:, 1]).reshape(idx.shape[0], -1)


# ---------------------------------------------------------------- unpackers


def _unpack_iq4_nl(blocks: np.ndarray) -> Unpacked:
    # block_iq4_nl = {f16 d, u8 qs[16]}
    return Unpacked(_codebook_nibbles(blocks[:, 2:18], IQ4NL_VALUES), f16_field(blocks, 0)[:, None], None)


def _iq4_xs_scales(blocks: np.ndarray) -> np.ndarray:
    """8 six-bit sub-block scales (biased by +32): low nibbles in scales_l, top bits in scales_h."""
    n = blocks.shape[0]
    low = bit_planes(blocks[:, 4:8], (0, 4), 0x0F).transpose(0, 2, 1).reshape(n, 8)
    high = (u16_field(blocks, 2)[:, None] >> (2 * np.arange(8, dtype=np.uint16))) & 3
    return low | (high.astype(np.uint8) << 4)


def _unpack_iq4_xs(blocks: np.ndarray) -> Unpacked:
    # block_iq4_xs = {f16 d, u16 scales_h, u8 scales_l[4], u8 qs[128]}
    scale = f16_field(blocks, 0)[:, None] * (_iq4_xs_scales(blocks).astype(F32) - F32(32))
    return Unpacked(_codebook_nibbles(blocks[:, 8:136], IQ4NL_VALUES), scale, None)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: the E8M0 exponent byte as 2**(e - 128), built from bits
    (e < 2 lands in the f32 subnormals)."""
    e32 = e.astype(np.uint32)
    bits = np.where(e32 < 2, np.uint32(0x00200000) << e32, (e32 - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


def _unpack_mxfp4(blocks: np.ndarray) -> Unpacked:
    # block_mxfp4 = {u8 e, u8 qs[16]}
    return Unpacked(_codebook_nibbles(blocks[:, 1:17], MXFP4_VALUES), e8m0_half(blocks[:, 0])[:, None], None)


# ---------------------------------------------------------------- quantizers


def _search_iq4_scale(xt: np.ndarray, ntry: int = 7) -> np.ndarray:
    """Best scale per 32-group (columns of xt) for the IQ4_NL grid, weights x^2.

    Starts from d = max/127, fits d by weighted least squares for the rounded
    indices, then tries 2*ntry+1 other inverse scales (itry - 127) / max and keeps
    the fit that maximizes sumqx^2 / sumq2.
    """
    weights = xt * xt
    amax, signed_max = first_absmax(xt)
    zero = amax < GROUP_MAX_EPS
    signed_max = np.where(zero, F32(1), signed_max)

    def fit(inv_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _IQ4NL_FLOAT[_best_index(inv_scale * xt)]
        wq = weights * q
        return seq_sum(wq * xt), seq_sum(wq * q)

    d0 = (-signed_max / F32(IQ4NL_VALUES[0])).astype(F32)
    sumqx, sumq2 = fit((F32(1) / d0).astype(F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            inv_scale = (F32(itry + int(IQ4NL_VALUES[0])) / signed_max).astype(F32)
            sumqx, sumq2 = fit(inv_scale)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(F32)
            best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d).astype(F32)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    d = _search_iq4_scale(elements_major(x, 32))
    idx = _best_index(_safe_inverse(d)[:, None] * x)
    return np.concatenate([f16_bytes(d), _pack_codebook_nibbles(idx)], axis=1)


def _quantize_iq4_xs(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub_scales = _search_iq4_scale(elements_major(x, 32)).reshape(n, 8)
    _, max_scale = first_absmax(sub_scales.T)
    d = (-max_scale / F32(32)).astype(F32)
    levels = np.clip(nearest_int(_safe_inverse(d)[:, None] * sub_scales), -32, 31)
    step = (d[:, None] * levels).astype(F32)
    idx = _best_index(_safe_inverse(step)[:, :, None] * x.reshape(n, 8, 32)).reshape(n, 256)
    biased = (levels + 32).astype(np.uint8)
    scales_l = pack_bit_planes((biased & 0x0F).reshape(n, 4, 2).transpose(0, 2, 1), 4)
    scales_h = np.zeros(n, dtype=np.uint16)
    for ib in range(8):
        scales_h |= (biased[:, ib] >> 4).astype(np.uint16) << np.uint16(2 * ib)
    return np.concatenate(
        [f16_bytes(d), scales_h.view(np.uint8).reshape(n, 2), scales_l, _pack_codebook_nibbles(idx)], axis=1
    )


def _quantize_mxfp4(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)
    d = e8m0_half(e)
    # Nearest table entry; the first of equally near entries wins (strict `<` in C).
    err = np.abs(d[:, None, None] * MXFP4_VALUES.astype(F32) - x[:, :, None])
    idx = np.argmin(err, axis=2).astype(np.uint8)
    return np.concatenate([e[:, None], _pack_codebook_nibbles(idx)], axis=1)


FORMATS = [
    BlockFormat("IQ4_NL", 32, 18, 32, unpack=_unpack_iq4_nl, encode=_quantize_iq4_nl),
    BlockFormat("IQ4_XS", 256, 136, 32, unpack=_unpack_iq4_xs, encode=_quantize_iq4_xs),
    BlockFormat("MXFP4", 32, 17, 32, unpack=_unpack_mxfp4, encode=_quantize_mxfp4),
]

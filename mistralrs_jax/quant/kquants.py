"""GGML's K-quants: 256-element super-blocks with quantized per-sub-block scales.

Layouts follow ggml-common.h (`block_q2_K` ... `block_q8_K`); the quantizers follow
llama.cpp's reference quantizers (`quantize_row_q2_K_ref` ...), which is what
llama-quantize runs when no importance matrix is given. The scale searches live in
kquant_search.py.

Element order inside a super-block, which every unpacker here reproduces:
- Q2_K/Q3_K: element 128*h + 32*j + l takes bits 2j..2j+1 of qs[32*h + l];
  Q3_K's third bit is bit (element // 32) of hmask[l]. Sub-blocks of 16.
- Q4_K/Q5_K: element 64*c + 32*k + l is nibble k of qs[32*c + l]; Q5_K's fifth bit is
  bit (element // 32) of qh[l]. Sub-blocks of 32.
- Q6_K: element 128*h + 32*k + l is nibble k // 2 of ql[64*h + 32*(k % 2) + l] plus
  bits 2k..2k+1 of qh[32*h + l] as bits 4..5. Sub-blocks of 16.
"""

from __future__ import annotations

import numpy as np

from .kquant_search import make_q3_quants, make_qkx2_quants, make_qx_quants
from .packing import (
    F32,
    GROUP_MAX_EPS,
    BlockFormat,
    Unpacked,
    bit_planes,
    blocks_major,
    elements_major,
    f16_bytes,
    f16_field,
    f16_round,
    f32_field,
    first_absmax,
    nearest_int,
    pack_bit_planes,
    seq_sum,
)

QK_K = 256
_TWO_BIT_SHIFTS = (0, 2, 4, 6)
_BIT_SHIFTS = tuple(range(8))


def _as_int8(q: np.ndarray, n_blocks: int) -> np.ndarray:
    return q.reshape(n_blocks, QK_K).astype(np.int8)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """qs (n, 64) -> (n, 256) 2-bit values in element order (Q2_K, Q3_K)."""
    n = qs.shape[0]
    return bit_planes(qs.reshape(n * 2, 32), _TWO_BIT_SHIFTS, 3).reshape(n, QK_K)


def _pack_two_bit_planes(levels: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..3 -> qs (n, 64); inverse of _two_bit_planes."""
    n = levels.shape[0]
    return pack_bit_planes(levels.reshape(n * 2, 4, 32), 2).reshape(n, 64)


def _high_bits(hmask: np.ndarray) -> np.ndarray:
    """(n, 32) -> (n, 256): bit (e // 32) of hmask[e % 32] for element e."""
    n = hmask.shape[0]
    return bit_planes(hmask, _BIT_SHIFTS, 1).reshape(n, QK_K)


def _pack_high_bits(bits: np.ndarray) -> np.ndarray:
    n = bits.shape[0]
    return pack_bit_planes(bits.reshape(n, 8, 32), 1)


def _nibble_planes(qs: np.ndarray) -> np.ndarray:
    """qs (n, 128) -> (n, 256) nibbles in Q4_K/Q5_K element order."""
    n = qs.shape[0]
    return bit_planes(qs.reshape(n * 4, 32), (0, 4), 0x0F).reshape(n, QK_K)


def _pack_nibble_planes(levels: np.ndarray) -> np.ndarray:
    n = levels.shape[0]
    return pack_bit_planes(levels.reshape(n * 4, 2, 32) & 0x0F, 4).reshape(n, 128)


# ---------------------------------------------------------------- 6-bit scale packing


def unpack_scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4).

    Sub-blocks 0..3 use the low 6 bits of bytes 0..3 (scales) and 4..7 (mins);
    sub-blocks 4..7 put their low nibbles in bytes 8..11 and their top 2 bits in the
    spare top bits of bytes 0..7.
    """
    head, mid, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([head & 63, (tail & 0x0F) | ((head >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (tail >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def pack_scale_min_k4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    scales = scales.astype(np.uint8)
    mins = mins.astype(np.uint8)
    out = np.empty((scales.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    out[:, 4:8] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    out[:, 8:12] = (scales[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)
    return out


def _unpack_q3_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K: 12 bytes -> 16 six-bit scales (still biased by +32).

    Low nibbles: bytes 0..7 (scale j < 8 in the low nibble of byte j, scale j >= 8 in
    the high nibble of byte j - 8). Top 2 bits: bits 2*(j // 4) of byte 8 + j % 4.
    """
    n = packed.shape[0]
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)
    high = bit_planes(packed[:, 8:12], _TWO_BIT_SHIFTS, 3).reshape(n, 16)
    return low | (high << 4)


def _pack_q3_scales(biased: np.ndarray) -> np.ndarray:
    biased = biased.astype(np.uint8)
    n = biased.shape[0]
    out = np.empty((n, 12), dtype=np.uint8)
    out[:, :8] = (biased[:, :8] & 0x0F) | ((biased[:, 8:] & 0x0F) << 4)
    out[:, 8:] = pack_bit_planes((biased >> 4).reshape(n, 4, 4), 2)
    return out


# ---------------------------------------------------------------- unpackers


def _unpack_q2_k(blocks: np.ndarray) -> Unpacked:
    # block_q2_K = {u8 scales[16] (low nibble scale, high nibble min), u8 qs[64], f16 d, f16 dmin}
    n = blocks.shape[0]
    packed_scales = blocks[:, 0:16]
    d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)
    q = _as_int8(_two_bit_planes(blocks[:, 16:80]), n)
    scale = d[:, None] * (packed_scales & 0x0F).astype(F32)
    offset = -(dmin[:, None] * (packed_scales >> 4).astype(F32))
    return Unpacked(q, scale, offset)


def _unpack_q3_k(blocks: np.ndarray) -> Unpacked:
    # block_q3_K = {u8 hmask[32], u8 qs[64], u8 scales[12], f16 d}
    n = blocks.shape[0]
    low = _two_bit_planes(blocks[:, 32:96]).astype(np.int8)
    high = _high_bits(blocks[:, 0:32]).astype(np.int8)
    # ggml subtracts 4 where the high bit is *clear*.
    q = low - np.int8(4) + np.int8(4) * high
    scale = f16_field(blocks, 108)[:, None] * (_unpack_q3_scales(blocks[:, 96:108]).astype(F32) - F32(32))
    return Unpacked(q, scale, None)


def _unpack_q4_k(blocks: np.ndarray) -> Unpacked:
    # block_q4_K = {f16 d, f16 dmin, u8 scales[12], u8 qs[128]}
    n = blocks.shape[0]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
    q = _as_int8(_nibble_planes(blocks[:, 16:144]), n)
    return Unpacked(q, d[:, None] * sc.astype(F32), -(dmin[:, None] * mn.astype(F32)))


def _unpack_q5_k(blocks: np.ndarray) -> Unpacked:
    # block_q5_K = {f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]}
    n = blocks.shape[0]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
    q = _nibble_planes(blocks[:, 48:176]) | (_high_bits(blocks[:, 16:48]) << 4)
    return Unpacked(_as_int8(q, n), d[:, None] * sc.astype(F32), -(dmin[:, None] * mn.astype(F32)))


def _unpack_q6_k(blocks: np.ndarray) -> Unpacked:
    # block_q6_K = {u8 ql[128], u8 qh[64], i8 scales[16], f16 d}
    n = blocks.shape[0]
    low = bit_planes(blocks[:, 0:128].reshape(n * 2, 64), (0, 4), 0x0F)  # (2n, nibble, 64)
    low = low.reshape(n * 2, 4, 32)  # k = 2 * nibble + half
    high = bit_planes(blocks[:, 128:192].reshape(n * 2, 32), _TWO_BIT_SHIFTS, 3)
    q = (low | (high << 4)).reshape(n, QK_K).view(np.int8) - np.int8(32)
    scale = f16_field(blocks, 208)[:, None] * blocks[:, 192:208].view(np.int8).astype(F32)
    return Unpacked(q, scale, None)


def _unpack_q8_k(blocks: np.ndarray) -> Unpacked:
    # block_q8_K = {f32 d, i8 qs[256], i16 bsums[16]}; one scale for all 256 values,
    # repeated here so that the group stays 32 like the other formats.
    d = f32_field(blocks, 0)
    return Unpacked(blocks[:, 4:260].view(np.int8), np.repeat(d[:, None], 8, axis=1), None)


# ---------------------------------------------------------------- quantizers


def _requantize(
    x: np.ndarray, levels: np.ndarray, step: np.ndarray, shift: np.ndarray | None, lo: int, hi: int
) -> np.ndarray:
    """Final pass of every K-quantizer: re-round x against the stored (f16-rounded)
    scales; groups whose step is 0 keep the levels from the search.

    x, levels: (n_blocks, groups, group); step, shift: (n_blocks, groups).
    """
    value = x if shift is None else x + shift[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int(value / step[:, :, None]), lo, hi)
    return np.where((step != 0)[:, :, None], fresh, levels)


def _positive_max(a: np.ndarray) -> np.ndarray:
    """Row maximum, floored at +0 (C: `float m = 0; if (v > m) m = v;`)."""
    m = a.max(axis=1)
    return np.where(m > 0, m, F32(0)).astype(F32)


def _uint8_wrap(v: np.ndarray) -> np.ndarray:
    # C assigns an int to a uint8_t field: modulo 256.
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    xt = elements_major(x, 16)
    scales, mins, levels = make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    levels = blocks_major(levels, n).reshape(n, 16, 16)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(15) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(15) / max_min, F32(0)).astype(F32)
    q_scale = np.where(max_scale[:, None] > 0, nearest_int(inv_scale[:, None] * scales), 0)
    q_min = np.where(max_min[:, None] > 0, nearest_int(inv_min[:, None] * mins), 0)
    packed_scales = _uint8_wrap(q_scale) | _uint8_wrap(q_min.astype(np.int64) << 4)
    d = (max_scale / F32(15)).astype(F32)
    dmin = (max_min / F32(15)).astype(F32)
    step = f16_round(d)[:, None] * (packed_scales & 0x0F).astype(F32)
    shift = f16_round(dmin)[:, None] * (packed_scales >> 4).astype(F32)
    levels = _requantize(x.reshape(n, 16, 16), levels, step, shift, 0, 3).reshape(n, QK_K)
    qs = _pack_two_bit_planes(levels.astype(np.uint8))
    return np.concatenate([packed_scales, qs, f16_bytes(d), f16_bytes(dmin)], axis=1)


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scales, levels = make_q3_quants(elements_major(x, 16), 4)
    scales = scales.reshape(n, 16)
    levels = blocks_major(levels, n).reshape(n, 16, 16)
    _, max_scale = first_absmax(scales.T)
    nonzero = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = np.where(nonzero, F32(-32) / max_scale, F32(0)).astype(F32)
    biased = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
    biased = np.where(nonzero[:, None], biased, 0).astype(np.uint8)
    with np.errstate(divide="ignore"):
        d = np.where(nonzero, F32(1) / iscale, F32(0)).astype(F32)
    step = f16_round(d)[:, None] * (biased.astype(F32) - F32(32))
    levels = _requantize(x.reshape(n, 16, 16), levels, step, None, -4, 3)
    # Levels from the search are already biased (0..7); fresh ones are signed.
    levels = np.where((step != 0)[:, :, None], levels + 4, levels).reshape(n, QK_K).astype(np.uint8)
    high = levels > 3
    qs = _pack_two_bit_planes(levels - 4 * high)
    hmask = _pack_high_bits(high)
    return np.concatenate([hmask, qs, _pack_q3_scales(biased), f16_bytes(d)], axis=1)


def _quantize_q45_k(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple:
    """The part Q4_K and Q5_K share: per-32 asymmetric search, 6-bit scales and mins."""
    n = x.shape[0]
    xt = elements_major(x, 32)
    av_x = np.sqrt(seq_sum(xt * xt) / F32(32)).astype(F32)
    scales, mins, levels = make_qkx2_quants(xt, av_x + np.abs(xt), nmax, rmin, rdelta, nstep, False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    levels = blocks_major(levels, n).reshape(n, 8, 32)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    q_scale = np.minimum(_uint8_wrap(nearest_int(inv_scale[:, None] * scales)), 63)
    q_min = np.minimum(_uint8_wrap(nearest_int(inv_min[:, None] * mins)), 63)
    d = (max_scale / F32(63)).astype(F32)
    dmin = (max_min / F32(63)).astype(F32)
    step = f16_round(d)[:, None] * q_scale.astype(F32)
    shift = f16_round(dmin)[:, None] * q_min.astype(F32)
    levels = _requantize(x.reshape(n, 8, 32), levels, step, shift, 0, nmax).reshape(n, QK_K)
    header = np.concatenate([f16_bytes(d), f16_bytes(dmin), pack_scale_min_k4(q_scale, q_min)], axis=1)
    return header, levels.astype(np.uint8)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    header, levels = _quantize_q45_k(x, 15, -1.0, 0.1, 20)
    return np.concatenate([header, _pack_nibble_planes(levels)], axis=1)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    header, levels = _quantize_q45_k(x, 31, -0.5, 0.1, 15)
    qh = _pack_high_bits(levels >> 4)
    return np.concatenate([header, qh, _pack_nibble_planes(levels & 0x0F)], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scales, levels = make_qx_quants(elements_major(x, 16), 32)
    scales = scales.reshape(n, 16)
    levels = blocks_major(levels, n).reshape(n, 16, 16)
    max_abs, max_scale = first_absmax(scales.T)
    zero = max_abs < GROUP_MAX_EPS
    max_scale = np.where(zero, F32(1), max_scale)
    iscale = (F32(-128) / max_scale).astype(F32)
    d = np.where(zero, F32(0), F32(1) / iscale).astype(F32)
    q_scales = np.where(zero[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * scales))).astype(np.int8)
    step = f16_round(d)[:, None] * q_scales.astype(F32)
    levels = _requantize(x.reshape(n, 16, 16), levels, step, None, -32, 31)
    levels = np.where((step != 0)[:, :, None], levels + 32, levels)
    levels = np.where(zero[:, None, None], 0, levels).reshape(n * 2, 4, 32).astype(np.uint8)
    # ql: nibble k // 2 of byte 32 * (k % 2) + l; qh: bits 2k of byte l (per half).
    ql = np.empty((n * 2, 2, 32), dtype=np.uint8)
    ql[:, 0] = (levels[:, 0] & 0x0F) | ((levels[:, 2] & 0x0F) << 4)
    ql[:, 1] = (levels[:, 1] & 0x0F) | ((levels[:, 3] & 0x0F) << 4)
    qh = pack_bit_planes(levels >> 4, 2)
    return np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), q_scales.view(np.uint8), f16_bytes(d)], axis=1
    )


def _quantize_q8_k(x: np.ndarray) -> np.ndarray:
    amax, signed_max = first_absmax(x.T)
    zero = amax == 0
    iscale = (F32(-127) / np.where(zero, F32(1), signed_max)).astype(F32)
    q = np.minimum(127, nearest_int(iscale[:, None] * x))
    q = np.where(zero[:, None], 0, q).astype(np.int8)
    d = np.where(zero, F32(0), F32(1) / iscale).astype(F32)
    bsums = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    return np.concatenate([d[:, None].view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)


FORMATS = [
    BlockFormat("Q2_K", QK_K, 84, 16, unpack=_unpack_q2_k, encode=_quantize_q2_k),
    BlockFormat("Q3_K", QK_K, 110, 16, unpack=_unpack_q3_k, encode=_quantize_q3_k),
    BlockFormat("Q4_K", QK_K, 144, 32, unpack=_unpack_q4_k, encode=_quantize_q4_k),
    BlockFormat("Q5_K", QK_K, 176, 32, unpack=_unpack_q5_k, encode=_quantize_q5_k),
    BlockFormat("Q6_K", QK_K, 210, 16, unpack=_unpack_q6_k, encode=_quantize_q6_k),
    BlockFormat("Q8_K", QK_K, 292, 32, unpack=_unpack_q8_k, encode=_quantize_q8_k),
]

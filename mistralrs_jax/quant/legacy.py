"""The float types and GGML's original 32-element block formats (Q4_0 .. Q8_1).

Layouts and quantizers follow ggml-quants.c (`block_q4_0` ..., `quantize_row_*_ref`);
the quantizers give the same bytes as `gguf.quants.quantize`.
"""

from __future__ import annotations

import numpy as np

from .packing import (
    F32,
    BlockFormat,
    Unpacked,
    f16_bytes,
    f16_field,
    first_absmax,
    join_nibbles,
    round_half_away,
    split_nibbles,
)

QK = 32  # elements per block in every format of this file


# ---------------------------------------------------------------- float types


def _decode_f32(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(F32).copy()


def _encode_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=F32).view(np.uint8)


def _decode_f16(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float16).astype(F32)


def _encode_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond +-65504 becomes inf, as in ggml
        return np.ascontiguousarray(x, dtype=F32).astype(np.float16).view(np.uint8)


def _decode_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32.
    return (np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << 16).view(F32)


def _encode_bf16(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: NaNs stay NaN (forced quiet), the rest round to nearest even.
    bits = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)


# ---------------------------------------------------------------- unpackers


def _unpack_q4_0(blocks: np.ndarray) -> Unpacked:
    d = f16_field(blocks, 0)
    q = split_nibbles(blocks[:, 2:18]).reshape(-1, QK).view(np.int8) - np.int8(8)
    return Unpacked(q, d[:, None], None)


def _unpack_q4_1(blocks: np.ndarray) -> Unpacked:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    q = split_nibbles(blocks[:, 4:20]).reshape(-1, QK).view(np.int8)
    return Unpacked(q, d[:, None], m[:, None])


def _fifth_bits(qh_bytes: np.ndarray) -> np.ndarray:
    # qh is a little-endian uint32 whose bit j is the high bit of element j.
    return np.unpackbits(qh_bytes, axis=1, bitorder="little")


def _unpack_q5_0(blocks: np.ndarray) -> Unpacked:
    d = f16_field(blocks, 0)
    low = split_nibbles(blocks[:, 6:22]).reshape(-1, QK)
    q = (low | (_fifth_bits(blocks[:, 2:6]) << 4)).view(np.int8) - np.int8(16)
    return Unpacked(q, d[:, None], None)


def _unpack_q5_1(blocks: np.ndarray) -> Unpacked:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    low = split_nibbles(blocks[:, 8:24]).reshape(-1, QK)
    q = (low | (_fifth_bits(blocks[:, 4:8]) << 4)).view(np.int8)
    return Unpacked(q, d[:, None], m[:, None])


def _unpack_q8_0(blocks: np.ndarray) -> Unpacked:
    return Unpacked(blocks[:, 2:34].view(np.int8), f16_field(blocks, 0)[:, None], None)


def _unpack_q8_1(blocks: np.ndarray) -> Unpacked:
    # block_q8_1 = {f16 d, f16 s = d * sum(qs), int8 qs[32]}; s is only a dot-product aid.
    return Unpacked(blocks[:, 4:36].view(np.int8), f16_field(blocks, 0)[:, None], None)


# ---------------------------------------------------------------- quantizers


def _signed_max_scale(x: np.ndarray, divisor: float) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: d = (value of largest magnitude) / divisor; the inverse is 0 for d == 0."""
    _, signed_max = first_absmax(x.T)
    d = (signed_max / F32(divisor)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    return d, inv


def _min_max_scale(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: d = (max - min) / levels, with the minimum as zero point."""
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = ((hi - lo) / F32(levels)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    return d, inv, lo


def _c_truncate(v: np.ndarray) -> np.ndarray:
    # C float -> integer conversion, `(int8_t)(v)`: truncation toward zero.
    return np.trunc(v).astype(np.int32)


def _pack_5bit(q: np.ndarray) -> np.ndarray:
    """q (n, 32) values 0..31 -> (qh: 4 bytes, qs: 16 bytes)."""
    qs = join_nibbles(q[:, :16] & 0x0F, q[:, 16:] & 0x0F)
    qh = np.packbits((q >> 4).astype(np.uint8) & 1, axis=1, bitorder="little")
    return qh, qs


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    d, inv = _signed_max_scale(x, -8)
    q = np.minimum(15, _c_truncate(x * inv[:, None] + F32(8.5)))
    return np.concatenate([f16_bytes(d), join_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _encode_q4_1(x: np.ndarray) -> np.ndarray:
    d, inv, lo = _min_max_scale(x, 15)
    q = np.minimum(15, _c_truncate((x - lo[:, None]) * inv[:, None] + F32(0.5)))
    return np.concatenate([f16_bytes(d), f16_bytes(lo), join_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _encode_q5_0(x: np.ndarray) -> np.ndarray:
    d, inv = _signed_max_scale(x, -16)
    q = np.minimum(31, _c_truncate(x * inv[:, None] + F32(16.5)))
    qh, qs = _pack_5bit(q)
    return np.concatenate([f16_bytes(d), qh, qs], axis=1)


def _encode_q5_1(x: np.ndarray) -> np.ndarray:
    d, inv, lo = _min_max_scale(x, 31)
    q = np.minimum(31, _c_truncate((x - lo[:, None]) * inv[:, None] + F32(0.5)))
    qh, qs = _pack_5bit(q)
    return np.concatenate([f16_bytes(d), f16_bytes(lo), qh, qs], axis=1)


def _q8_scale_and_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = (np.abs(x).max(axis=1) / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    return d, round_half_away(x * inv[:, None]).astype(np.int8)


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    d, q = _q8_scale_and_quants(x)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


def _encode_q8_1(x: np.ndarray) -> np.ndarray:
    d, q = _q8_scale_and_quants(x)
    s = q.astype(np.int32).sum(axis=1).astype(F32) * d
    return np.concatenate([f16_bytes(d), f16_bytes(s), q.view(np.uint8)], axis=1)


_NO_INT8_FLOAT = "it stores plain floating-point values, not integers with a scale"

FORMATS = [
    BlockFormat("F32", 1, 4, decode=_decode_f32, encode=_encode_f32, not_affine_reason=_NO_INT8_FLOAT),
    BlockFormat("F16", 1, 2, decode=_decode_f16, encode=_encode_f16, not_affine_reason=_NO_INT8_FLOAT),
    BlockFormat("BF16", 1, 2, decode=_decode_bf16, encode=_encode_bf16, not_affine_reason=_NO_INT8_FLOAT),
    BlockFormat("Q4_0", QK, 18, QK, unpack=_unpack_q4_0, encode=_encode_q4_0),
    BlockFormat("Q4_1", QK, 20, QK, unpack=_unpack_q4_1, encode=_encode_q4_1),
    BlockFormat("Q5_0", QK, 22, QK, unpack=_unpack_q5_0, encode=_encode_q5_0),
    BlockFormat("Q5_1", QK, 24, QK, unpack=_unpack_q5_1, encode=_encode_q5_1),
    BlockFormat("Q8_0", QK, 34, QK, unpack=_unpack_q8_0, encode=_encode_q8_0),
    BlockFormat("Q8_1", QK, 36, QK, unpack=_unpack_q8_1, encode=_encode_q8_1),
]

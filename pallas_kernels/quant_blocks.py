"""Packed weight formats as integer programs over a block's bytes: one definition per format,
used by the Pallas kernel (on tiles of blocks in registers) and by the XLA reference (on
whole arrays inside the jit).

A weight is uint8 [out, row_bytes]: each output row is a run of blocks, each block the
format's bytes exactly as ggml lays them out (block_q4_0, block_q4_K, ...), so a GGUF tensor
is held as the file holds it. HQQ4/HQQ8 are this project's own layouts in the same shape
(see mistralrs_jax/quant/hqq.py): per group of 64 weights an f16 scale, an f16 zero point
and the codes (nibbles for 4 bits, low nibbles first), w = (q - zero) * scale.

A format describes a block as *pieces*: runs of consecutive elements (16 or 32) whose values
it computes from the block bytes with elementwise integer ops and a few f32 multiplies, in
the same order of roundings as ggml / gguf-py, so the reference is bit-exact to them.
`load(array_index, byte_offset, count)` gives int32 [rows, blocks, count] bytes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mistralrs_jax.errors import NotSupportedError

Load = Callable[..., jax.Array]
Piece = tuple[int, int, jax.Array]  # (first element in the block, number of elements, f32 values [rows, blocks, n])


class BlockFormat(NamedTuple):
    block_elems: int  # weights per block along the input axis
    type_size: int  # bytes per block
    pieces: Callable[[Load], list[Piece]]


# -- byte helpers ------------------------------------------------------------------------------

def _f16(load: Load, offset: int) -> jax.Array:
    """Little-endian f16 at `offset` of each block, as f32 [rows, blocks, 1]."""
    bits = load(0, offset, 1) | (load(0, offset + 1, 1) << 8)
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _u32(load: Load, offset: int) -> jax.Array:
    """Little-endian 32 bits at `offset` as int32 (bit 31 may make it negative: read bits with & only)."""
    value = load(0, offset, 1)
    for i in range(1, 4):
        value = value | (load(0, offset + i, 1) << (8 * i))
    return value


def _f32(load: Load, offset: int) -> jax.Array:
    return lax.bitcast_convert_type(_u32(load, offset), jnp.float32)


def _signed(byte: jax.Array) -> jax.Array:
    return jnp.where(byte >= 128, byte - 256, byte)


def _f(values: jax.Array) -> jax.Array:
    return values.astype(jnp.float32)


def _iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (1, 1, n), 2)


def _lookup(index: jax.Array, table: tuple[int, ...]) -> jax.Array:
    """table[index] as f32 with selects (no gathers: the Triton lowering has none)."""
    out = jnp.zeros(index.shape, jnp.float32)
    for i, value in enumerate(table):
        out = jnp.where(index == i, jnp.float32(value), out)
    return out


# ggml-common.h kvalues_iq4nl
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# -- 32-weight formats ----------------------------------------------------------------------------

def _q8_0(load: Load) -> list[Piece]:
    # d: f16, then 32 int8: w = q * d
    d = _f16(load, 0)
    return [(0, 32, _signed(load(0, 2, 32)).astype(jnp.float32) * d)]


def _q8_1(load: Load) -> list[Piece]:
    # d: f16, s = d * sum(q): f16 (a dot-product aid, unused), then 32 int8: w = q * d
    d = _f16(load, 0)
    return [(0, 32, _signed(load(0, 4, 32)).astype(jnp.float32) * d)]


def _q4_0(load: Load) -> list[Piece]:
    # d: f16, then 16 bytes: low nibbles are elements 0..15, high nibbles 16..31; w = (nibble - 8) * d
    d = _f16(load, 0)
    qs = load(0, 2, 16)
    return [(0, 16, ((qs & 15) - 8).astype(jnp.float32) * d), (16, 16, ((qs >> 4) - 8).astype(jnp.float32) * d)]


def _q4_1(load: Load) -> list[Piece]:
    # d, m: f16, then 16 bytes of nibbles as in Q4_0; w = nibble * d + m
    d, m = _f16(load, 0), _f16(load, 2)
    qs = load(0, 4, 16)
    return [(0, 16, (qs & 15).astype(jnp.float32) * d + m), (16, 16, (qs >> 4).astype(jnp.float32) * d + m)]


def _q5(load: Load, *, has_min: bool) -> list[Piece]:
    # d (, m): f16, qh: 32 high bits (bit j belongs to element j), 16 bytes of nibbles as in Q4_0.
    d = _f16(load, 0)
    m = _f16(load, 2) if has_min else None
    qh = _u32(load, 4 if has_min else 2)
    qs = load(0, 8 if has_min else 6, 16)
    j = _iota(16)
    pieces = []
    for first, nibble in ((0, qs & 15), (16, qs >> 4)):
        q = nibble | (((qh >> (j + first)) & 1) << 4)
        pieces.append((first, 16, q.astype(jnp.float32) * d + m if has_min else (q - 16).astype(jnp.float32) * d))
    return pieces


def _iq4_nl(load: Load) -> list[Piece]:
    # d: f16, then 16 bytes of 4-bit indices into kvalues_iq4nl (low nibbles first)
    d = _f16(load, 0)
    qs = load(0, 2, 16)
    return [(0, 16, d * _lookup(qs & 15, IQ4NL_VALUES)), (16, 16, d * _lookup(qs >> 4, IQ4NL_VALUES))]


# -- 256-weight K-quants --------------------------------------------------------------------------

def _scale_min_k4(sb: list[jax.Array], i: int) -> tuple[jax.Array, jax.Array]:
    """ggml's get_scale_min_k4: 6-bit (scale, min) of sub-block i from the 12 packed bytes."""
    if i < 4:
        return sb[i] & 63, sb[i + 4] & 63
    return (sb[i + 4] & 15) | ((sb[i - 4] >> 6) << 4), (sb[i + 4] >> 4) | ((sb[i] >> 6) << 4)


def _q2_k(load: Load) -> list[Piece]:
    # scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit codes), d, dmin: f16 at 80, 82.
    # Element 128h + 32j + l (l < 32) is bits 2j of qs[32h + l]; its 16-run has scales[8h + 2j + l // 16].
    d, dmin = _f16(load, 80), _f16(load, 82)
    pieces = []
    for h in range(2):
        for j in range(4):
            for s in range(2):
                sc = load(0, 8 * h + 2 * j + s, 1)
                q = (load(0, 16 + 32 * h + 16 * s, 16) >> (2 * j)) & 3
                value = (d * _f(sc & 15)) * _f(q) - dmin * _f(sc >> 4)
                pieces.append((128 * h + 32 * j + 16 * s, 16, value))
    return pieces


def _q3_k(load: Load) -> list[Piece]:
    # hmask[32], qs[64], scales[12] (16 6-bit scales, biased by 32), d: f16 at 108.
    # Element e = 128h + 32j + l: low bits (qs[32h + l] >> 2j) & 3, high bit (hmask[l] >> (4h + j)) & 1,
    # q = low - 4 * (1 - high); scale k = e // 16: low 4 bits from byte k % 8 (high nibble if k >= 8),
    # top 2 bits from byte 8 + k % 4 at shift 2 * (k // 4).
    d = _f16(load, 108)
    pieces = []
    for h in range(2):
        for j in range(4):
            for s in range(2):
                k = 8 * h + 2 * j + s
                low_byte = load(0, 96 + k % 8, 1)
                high_bits = (load(0, 104 + k % 4, 1) >> (2 * (k // 4))) & 3
                sc = ((low_byte & 15) if k < 8 else (low_byte >> 4)) | (high_bits << 4)
                low = (load(0, 32 + 32 * h + 16 * s, 16) >> (2 * j)) & 3
                high = (load(0, 16 * s, 16) >> (4 * h + j)) & 1
                q = low - ((1 - high) << 2)
                pieces.append((128 * h + 32 * j + 16 * s, 16, (d * _f(sc - 32)) * _f(q)))
    return pieces


def _q4_5_k(load: Load, *, high_bits: bool) -> list[Piece]:
    # 256 weights: d, dmin (f16), 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32,
    # Q5_K only: qh[32] at 16 (bit i of qh[l] is the high bit of sub-block i, element l);
    # then 128 bytes of nibbles: bytes 32j..32j+31 hold sub-block 2j (low) and 2j+1 (high).
    d, dmin = _f16(load, 0), _f16(load, 2)
    sb = [load(0, 4 + i, 1) for i in range(12)]
    qh = load(0, 16, 32) if high_bits else None
    pieces = []
    for i in range(8):
        sc, mn = _scale_min_k4(sb, i)
        qs = load(0, (48 if high_bits else 16) + 32 * (i // 2), 32)
        q = qs & 15 if i % 2 == 0 else qs >> 4
        if high_bits:
            q = q | (((qh >> i) & 1) << 4)
        # ggml's order of roundings: (d * sc) * q - (dmin * m)
        pieces.append((32 * i, 32, (d * _f(sc)) * _f(q) - dmin * _f(mn)))
    return pieces


def _q6_k(load: Load) -> list[Piece]:
    # 256 weights: ql (128 bytes, low 4 bits), qh (64 bytes, high 2 bits), 16 int8 scales
    # (one per 16 weights), d (f16). Each half of 128 weights uses 64 ql, 32 qh, 8 scales:
    # quarter c holds weights 32c..32c+31 of the half, low nibbles of ql[0:32] (c=0),
    # ql[32:64] (c=1), high nibbles of the same (c=2, 3), high bits at qh >> 2c.
    d = _f16(load, 208)
    pieces = []
    for half in range(2):
        for c in range(4):
            for s in range(2):  # 16-weight runs: each has its own scale
                ql = load(0, 64 * half + 32 * (c % 2) + 16 * s, 16)
                qh = load(0, 128 + 32 * half + 16 * s, 16)
                low = ql & 15 if c < 2 else ql >> 4
                q = (low | (((qh >> (2 * c)) & 3) << 4)) - 32
                scale = _signed(load(0, 192 + 8 * half + 2 * c + s, 1)).astype(jnp.float32)
                pieces.append((128 * half + 32 * c + 16 * s, 16, (d * scale) * q.astype(jnp.float32)))
    return pieces


def _q8_k(load: Load) -> list[Piece]:
    # d: f32, 256 int8, then 16 int16 block sums (unused here): w = d * q
    d = _f32(load, 0)
    return [(32 * i, 32, d * _signed(load(0, 4 + 32 * i, 32)).astype(jnp.float32)) for i in range(8)]


def _iq4_xs(load: Load) -> list[Piece]:
    # d: f16, scales_h: u16 (2 high bits per sub-block), scales_l[4] (4 low bits, low nibble first),
    # qs[128]: sub-block i at 16i, low nibbles elements 0..15. w = (d * (ls - 32)) * kvalues[idx]
    d = _f16(load, 0)
    scales_h = load(0, 2, 1) | (load(0, 3, 1) << 8)
    pieces = []
    for i in range(8):
        ls = ((load(0, 4 + i // 2, 1) >> (4 * (i % 2))) & 15) | (((scales_h >> (2 * i)) & 3) << 4)
        dl = d * (ls - 32).astype(jnp.float32)
        qs = load(0, 8 + 16 * i, 16)
        pieces += [(32 * i, 16, dl * _lookup(qs & 15, IQ4NL_VALUES)),
                   (32 * i + 16, 16, dl * _lookup(qs >> 4, IQ4NL_VALUES))]
    return pieces


# -- HQQ (this project's layout) --------------------------------------------------------------

def _hqq4(load: Load) -> list[Piece]:
    scale, zero = _f16(load, 0), _f16(load, 2)
    qs = load(0, 4, 32)
    return [(0, 32, (_f(qs & 15) - zero) * scale), (32, 32, (_f(qs >> 4) - zero) * scale)]


def _hqq8(load: Load) -> list[Piece]:
    scale, zero = _f16(load, 0), _f16(load, 2)
    return [(32 * i, 32, (load(0, 4 + 32 * i, 32).astype(jnp.float32) - zero) * scale) for i in range(2)]


FORMATS: dict[str, BlockFormat] = {
    "Q4_0": BlockFormat(32, 18, _q4_0),
    "Q4_1": BlockFormat(32, 20, _q4_1),
    "Q5_0": BlockFormat(32, 22, lambda load: _q5(load, has_min=False)),
    "Q5_1": BlockFormat(32, 24, lambda load: _q5(load, has_min=True)),
    "Q8_0": BlockFormat(32, 34, _q8_0),
    "Q8_1": BlockFormat(32, 36, _q8_1),
    "Q2_K": BlockFormat(256, 84, _q2_k),
    "Q3_K": BlockFormat(256, 110, _q3_k),
    "Q4_K": BlockFormat(256, 144, lambda load: _q4_5_k(load, high_bits=False)),
    "Q5_K": BlockFormat(256, 176, lambda load: _q4_5_k(load, high_bits=True)),
    "Q6_K": BlockFormat(256, 210, _q6_k),
    "Q8_K": BlockFormat(256, 292, _q8_k),
    "IQ4_NL": BlockFormat(32, 18, _iq4_nl),
    "IQ4_XS": BlockFormat(256, 136, _iq4_xs),
    "HQQ4": BlockFormat(64, 36, _hqq4),
    "HQQ8": BlockFormat(64, 68, _hqq8),
}
"""Every packed format: both the Pallas kernel and the XLA reference read these."""


def block_format(qtype: str, blocks_shape: tuple[int, ...] | None = None) -> BlockFormat:
    fmt = FORMATS.get(qtype)
    if fmt is None:
        raise NotSupportedError(f"no packed-weight kernel for {qtype}; packed formats: {', '.join(FORMATS)}")
    if blocks_shape is not None and (len(blocks_shape) != 2 or blocks_shape[1] % fmt.type_size):
        raise NotSupportedError(f"{qtype} weights must be uint8 [out, row_bytes] with row_bytes a multiple of "
                                f"{fmt.type_size}; got shape {tuple(blocks_shape)}")
    return fmt


def dequantize_blocks(blocks: jax.Array, qtype: str) -> jax.Array:
    """Packed weight uint8 [out, row_bytes] -> f32 [out, in], with the format's piece functions
    (the XLA reference: bit-exact to gguf-py's dequantize for the GGUF types)."""
    blocks = jnp.asarray(blocks)
    fmt = block_format(qtype, blocks.shape)
    out_f, row_bytes = blocks.shape
    raw = blocks.reshape(out_f, row_bytes // fmt.type_size, fmt.type_size).astype(jnp.int32)
    parts = sorted(fmt.pieces(lambda i, offset, count: raw[:, :, offset:offset + count]), key=lambda p: p[0])
    w = jnp.concatenate([values for _, _, values in parts], axis=-1)
    return w.reshape(out_f, -1)

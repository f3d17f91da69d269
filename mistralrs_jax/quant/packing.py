"""What the GGML block-format modules share: byte/float helpers and the two types each
format module fills in (BlockFormat, Unpacked).

Every function works on whole arrays of blocks at once: `blocks` is a C-contiguous
uint8 array of shape (n_blocks, type_size). The rounding helpers reproduce the C
expressions ggml uses, so that quantizers written with them give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

F32 = np.float32

# ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this counts as all zero.
GROUP_MAX_EPS = F32(1e-15)


def f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian f16 at byte `start` of every block, widened to f32 (exact)."""
    raw = np.ascontiguousarray(blocks[:, start : start + 2])
    return raw.view(np.float16)[:, 0].astype(F32)


def f32_field(blocks: np.ndarray, start: int) -> np.ndarray:
    raw = np.ascontiguousarray(blocks[:, start : start + 4])
    return raw.view(F32)[:, 0].copy()


def u16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    raw = np.ascontiguousarray(blocks[:, start : start + 2])
    return raw.view(np.uint16)[:, 0].copy()


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """f32 values (n,) -> their f16 encoding as (n, 2) bytes (round to nearest even,
    like ggml's GGML_FP32_TO_FP16; beyond the f16 range that gives inf, as in ggml)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(values, dtype=F32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def f16_round(values: np.ndarray) -> np.ndarray:
    """What a value reads back as after a trip through an f16 field."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=F32).astype(np.float16).astype(F32)


def split_nibbles(packed: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2, k): low nibbles first, then high nibbles.

    ggml packs element j of a 2k-group in the low nibble of byte j and element
    j + k in the high nibble of the same byte, so this is also element order.
    """
    out = np.empty((packed.shape[0], 2, packed.shape[1]), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[:, 0])
    np.right_shift(packed, 4, out=out[:, 1])
    return out


def join_nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Inverse of split_nibbles for one pair of (n, k) arrays of values 0..15."""
    return (low.astype(np.uint8) & 0x0F) | (high.astype(np.uint8) << 4)


def bit_planes(packed: np.ndarray, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """(n, k) bytes -> (n, len(shifts), k): the field `(byte >> shift) & mask` per shift."""
    shift_arr = np.asarray(shifts, dtype=np.uint8).reshape(1, -1, 1)
    return (packed[:, None, :] >> shift_arr) & np.uint8(mask)


def pack_bit_planes(planes: np.ndarray, bits: int) -> np.ndarray:
    """(n, p, k) small ints -> (n, k) bytes with plane i at bit position i*bits."""
    out = np.zeros((planes.shape[0], planes.shape[2]), dtype=np.uint8)
    for i in range(planes.shape[1]):
        out |= planes[:, i].astype(np.uint8) << np.uint8(i * bits)
    return out


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: ties go away from zero, where np.rint sends them to even.

    rint and roundf differ only on exact ties that rint rounded toward zero; the
    residual x - rint(x) is exact, so those are found exactly.
    """
    rounded = np.rint(x)
    toward_zero_tie = (x - rounded) == np.copysign(F32(0.5), x)
    return np.add(rounded, np.sign(x), out=rounded, where=toward_zero_tie)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (the 1.5*2^23 trick) is round-half-to-even for the
    magnitudes it accepts, i.e. np.rint. Kept as float32 so masked-out garbage
    (inf/nan from guarded divisions) never hits an integer cast."""
    return np.rint(x)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 strictly left to right, as the C loops `s += t[i]` do.

    The quantizers' scale searches compare such sums, so the rounding order matters.
    numpy adds element by element when it reduces along an axis that is not the fast
    one in memory (its pairwise summation is only used along the fast axis, see the
    notes of numpy.sum), which is the case for a C-contiguous (n, B>1) array.
    """
    terms = np.ascontiguousarray(terms)
    if terms.ndim == 2 and terms.shape[1] > 1:
        return np.add.reduce(terms, axis=0)
    acc = terms[0].copy()
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of x (n, B): the largest |x| and the signed value where it first occurs
    (ggml scans with a strict `>`, so the first occurrence wins)."""
    absx = np.abs(x)
    idx = np.argmax(absx, axis=0)
    cols = np.arange(x.shape[1])
    return absx[idx, cols], x[idx, cols]


def elements_major(x: np.ndarray, group: int) -> np.ndarray:
    """(n_blocks, block_size) -> (group, n_groups) contiguous: one column per group.

    The quantizers loop over the positions inside a group (sequential sums, as in C)
    and vectorize across groups; columns keep each position's values contiguous.
    """
    return np.ascontiguousarray(x.reshape(-1, group).T)


def blocks_major(xt: np.ndarray, n_blocks: int) -> np.ndarray:
    """Inverse of elements_major."""
    return np.ascontiguousarray(xt.T).reshape(n_blocks, -1)


class Unpacked(NamedTuple):
    """A block format re-expressed as w = q * scale + offset, group by group.

    q: int8 (n_blocks, block_size); scale, offset: f32 (n_blocks, block_size // group).
    offset is None where the format has no zero point (it is then exactly 0).
    """

    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None


@dataclass(frozen=True)
class BlockFormat:
    """One GGML tensor type: its block geometry and the codecs this package has for it.

    unpack: blocks -> Unpacked, for the types whose values are exactly int8 * f32 (+ f32)
        per group of `group_size`; dequantizing evaluates that in f32 the way ggml does.
    decode: blocks -> f32 (n_blocks, block_size), for the types with no such form.
    encode: f32 (n_blocks, block_size) -> blocks (n_blocks, type_size).
    """

    name: str
    block_size: int
    type_size: int
    group_size: int = 0
    unpack: Callable[[np.ndarray], Unpacked] | None = None
    decode: Callable[[np.ndarray], np.ndarray] | None = None
    encode: Callable[[np.ndarray], np.ndarray] | None = None
    not_affine_reason: str = ""

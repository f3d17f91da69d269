"""GGUF tensor types: their sizes, dequantize, quantize, and the exact int8 affine form.

This is the entry point for GGML block formats; the formats themselves live in
legacy.py (F32/F16/BF16, Q4_0 .. Q8_1), kquants.py (Q2_K .. Q8_K) and iquants.py
(IQ4_NL, IQ4_XS, MXFP4). Types whose values come from lattice codebooks (IQ1/IQ2/IQ3,
the ternary TQ types, NVFP4) are dequantized by gguf-py, which already implements them.

Arrays are numpy and row-major: `shape` is the tensor's numpy shape, and its last
axis is the one cut into blocks (GGUF lists dimensions the other way round).

`to_affine_int8` re-expresses a block format as w = q * scale + offset with int8 q and
one f32 (scale, offset) per group of `g` consecutive values along a row. It is exact:
evaluating it in f32 gives the same floats as `dequantize`, and for every type with a
nonzero offset each product q * scale is exact in f32, so a fused multiply-add gives
the same bits too. (Linear keeps the packed bytes instead: quant/packed.py.)
"""

from __future__ import annotations

import re
from math import prod
from typing import NamedTuple, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES
from gguf import quants as gguf_quants

from ..errors import CorruptModelFileError, NotSupportedError
from . import iquants, kquants, legacy
from .packing import F32, BlockFormat

_NATIVE: dict[str, BlockFormat] = {f.name: f for f in (*legacy.FORMATS, *kquants.FORMATS, *iquants.FORMATS)}

# Lattice-codebook, ternary and NVFP4 types: gguf-py decodes them; nothing here encodes them.
_GGUF_DECODED = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "NVFP4")
_CODEBOOK_NOT_AFFINE = (
    "only decoding through gguf-py is implemented for it; its grid values are small integers, "
    "so an int8 form could be built, but this package does not unpack it"
)

QTYPES: dict[str, tuple[int, int]] = {
    **{name: (f.block_size, f.type_size) for name, f in _NATIVE.items()},
    **{name: GGML_QUANT_SIZES[GGMLQuantizationType[name]] for name in _GGUF_DECODED},
}
"""Every tensor type this package can read: name -> (elements per block, bytes per block).

Q8_1 is 36 bytes as in today's ggml (f16 d, f16 s, 32 int8); gguf-py's table still says
40 (the older f32 layout). No GGUF weight file stores Q8_1: it is an activation format.
"""

GGML_TYPES: dict[str, GGMLQuantizationType] = {name: GGMLQuantizationType[name] for name in QTYPES}

# Bounded work per numpy call: temporaries stay cache-sized and memory stays flat.
_CHUNK_ELEMENTS = 1 << 18


class AffineInt8(NamedTuple):
    """w[r, c] = q[r, c] * scale[r, c // group_size] + offset[r, c // group_size]."""

    q: np.ndarray  # int8 (rows, cols)
    scale: np.ndarray  # f32 (rows, cols // group_size)
    offset: np.ndarray  # f32 (rows, cols // group_size); zeros for symmetric formats
    group_size: int


_MISTRALRS_SPELLING = re.compile(r"^Q([2-8])K$")


def qtype_name(qtype: str | int | GGMLQuantizationType) -> str:
    """Canonical GGUF name of a tensor type given as a name, a GGMLQuantizationType or its id.

    Also accepts mistral.rs' ISQ spellings such as "Q4K" (= "Q4_K").
    """
    if isinstance(qtype, GGMLQuantizationType):
        name = qtype.name
    elif isinstance(qtype, (int, np.integer)):
        try:
            name = GGMLQuantizationType(int(qtype)).name
        except ValueError:
            raise NotSupportedError(f"unknown GGML tensor type id {int(qtype)}; known types: {_known()}") from None
    elif isinstance(qtype, str):
        name = qtype.strip().upper()
        name = _MISTRALRS_SPELLING.sub(r"Q\1_K", name)
    else:
        raise NotSupportedError(f"a tensor type must be a name or a GGMLQuantizationType, not {type(qtype).__name__}")
    if name not in QTYPES:
        raise NotSupportedError(f"GGML tensor type {name!r} is not supported; supported types: {_known()}")
    return name


def ggml_type(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    return GGML_TYPES[qtype_name(qtype)]


def _known() -> str:
    return ", ".join(QTYPES)


def nbytes(qtype: str | int | GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes a tensor of this type and numpy shape occupies in a GGUF file."""
    name = qtype_name(qtype)
    block_size, type_size = QTYPES[name]
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % block_size:
        raise NotSupportedError(
            f"a {name} tensor needs a last axis that is a multiple of {block_size}; shape {shape} is not"
        )
    return prod(shape) // block_size * type_size


def _blocks(data: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Validate `data` against (type, shape) and view it as (n_blocks, type_size) bytes."""
    block_size, type_size = QTYPES[name]
    if not shape or shape[-1] % block_size:
        raise CorruptModelFileError(
            f"a {name} tensor must have a last axis that is a multiple of {block_size}, got shape {shape}; "
            "the model file is damaged or was written by an incompatible tool"
        )
    raw = np.asarray(data)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    expected = prod(shape) // block_size * type_size
    if raw.size != expected:
        raise CorruptModelFileError(
            f"a {name} tensor of shape {shape} needs {expected} bytes but {raw.size} were given; "
            "the model file is truncated or its tensor table is wrong"
        )
    return np.ascontiguousarray(raw.reshape(-1)).reshape(-1, type_size)


def _chunks(n_blocks: int, block_size: int):
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        yield start, min(n_blocks, start + step)


def dequantize(
    data: np.ndarray, qtype: str | int | GGMLQuantizationType, shape: Sequence[int]
) -> np.ndarray:
    """Decode a GGUF tensor's bytes to float32 of the given numpy shape.

    Bit-identical to ggml's (and gguf-py's) dequantization.
    """
    name = qtype_name(qtype)
    shape = tuple(int(s) for s in shape)
    blocks = _blocks(data, name, shape)
    if name in _GGUF_DECODED:
        rows = blocks.reshape(-1, shape[-1] // QTYPES[name][0] * QTYPES[name][1])
        return np.asarray(gguf_quants.dequantize(rows, GGML_TYPES[name]), dtype=F32).reshape(shape)
    fmt = _NATIVE[name]
    out = np.empty((blocks.shape[0], fmt.block_size), dtype=F32)
    for start, stop in _chunks(blocks.shape[0], fmt.block_size):
        part = blocks[start:stop]
        if fmt.unpack is None:
            out[start:stop] = fmt.decode(part).reshape(stop - start, fmt.block_size)
            continue
        q, scale, offset = fmt.unpack(part)
        groups = out[start:stop].reshape(stop - start, scale.shape[1], -1)
        # The same two f32 roundings as ggml: q * scale, then + offset.
        np.multiply(q.reshape(groups.shape), scale[:, :, None], out=groups)
        if offset is not None:
            np.add(groups, offset[:, :, None], out=groups)
    return out.reshape(shape)


def quantize(x: np.ndarray, qtype: str | int | GGMLQuantizationType) -> np.ndarray:
    """Encode float values into GGUF bytes: uint8 of shape (*x.shape[:-1], row_bytes).

    Same bytes as gguf-py's quantizers where it has one, and as llama.cpp's reference
    quantizers (no importance matrix) for the K-quants and IQ4 types.
    """
    name = qtype_name(qtype)
    fmt = _NATIVE.get(name)
    if fmt is None or fmt.encode is None:
        encodable = ", ".join(n for n, f in _NATIVE.items() if f.encode is not None)
        raise NotSupportedError(f"quantizing to {name} is not supported; choose one of: {encodable}")
    values = np.asarray(x, dtype=F32)
    if values.ndim == 0 or values.shape[-1] % fmt.block_size:
        raise NotSupportedError(
            f"{name} packs rows in blocks of {fmt.block_size} values but the last axis of shape "
            f"{values.shape} is not a multiple of that; pick a type with 32-value blocks (e.g. Q8_0, Q4_0) "
            "for this tensor"
        )
    rows = values.reshape(-1, fmt.block_size)
    out = np.empty((rows.shape[0], fmt.type_size), dtype=np.uint8)
    for start, stop in _chunks(rows.shape[0], fmt.block_size):
        out[start:stop] = fmt.encode(np.ascontiguousarray(rows[start:stop])).reshape(stop - start, fmt.type_size)
    return out.reshape(*values.shape[:-1], values.shape[-1] // fmt.block_size * fmt.type_size)


def to_affine_int8(
    data: np.ndarray, qtype: str | int | GGMLQuantizationType, shape: Sequence[int]
) -> AffineInt8:
    """The exact int8 affine form of a GGUF tensor, flattened to 2-D rows.

    Group sizes: 16 for Q2_K, Q3_K and Q6_K (their sub-blocks), 32 for the others.
    Raises NotSupportedError for types that are not int8 * scale (+ offset), such as
    the float types and the IQ1/IQ2/IQ3 codebook types; dequantize those instead.
    """
    name = qtype_name(qtype)
    shape = tuple(int(s) for s in shape)
    fmt = _NATIVE.get(name)
    if fmt is None or fmt.unpack is None:
        reason = fmt.not_affine_reason if fmt is not None else _CODEBOOK_NOT_AFFINE
        raise NotSupportedError(f"{name} cannot be kept as int8 here ({reason}); load it with dequantize() instead")
    blocks = _blocks(data, name, shape)
    cols = shape[-1]
    rows = prod(shape[:-1])
    group = fmt.group_size
    n_blocks = blocks.shape[0]
    groups_per_block = fmt.block_size // group
    q = np.empty((n_blocks, fmt.block_size), dtype=np.int8)
    scale = np.empty((n_blocks, groups_per_block), dtype=F32)
    offset = np.zeros((n_blocks, groups_per_block), dtype=F32)
    for start, stop in _chunks(n_blocks, fmt.block_size):
        part = fmt.unpack(blocks[start:stop])
        q[start:stop] = part.q
        scale[start:stop] = part.scale
        if part.offset is not None:
            offset[start:stop] = part.offset
    return AffineInt8(
        q.reshape(rows, cols),
        scale.reshape(rows, cols // group),
        offset.reshape(rows, cols // group),
        group,
    )

"""Matmul with quantized weights, dequantized in registers: Pallas kernels for NVIDIA GPUs.

y[T, out] = x[T, in] @ dequant(W[out, in]).T, with W held in one of two ways:
- **affine int8** (what `Linear` keeps): int8 q [out, in] and one f32 scale (and offset)
  per group of 16 or 32 input columns, w = q * scale + offset. Every GGUF block format
  converts to it exactly (`mistralrs_jax.quant.to_affine_int8`), so this one kernel
  covers them all at 8 bits per weight plus scales.
- **raw GGUF blocks**: the file's own bytes, uint8 [out, row_bytes], for Q8_0, Q4_0,
  Q4_1, Q4_K and Q6_K. The kernel unpacks f16 scales, nibbles, 6-bit scales/mins and
  high bits itself, so weights stay at the format's size in GPU memory (4.5 bits for
  Q4_K against ~10 for the int8 form): decode is bandwidth-bound, so this is the fast
  path on a GPU.

Lowering: written for Pallas' **Triton** backend (`pl.pallas_call` + Triton compiler
params); `interpret=True` runs it anywhere (the tests use that on CPU). No Mosaic GPU
variant exists yet; `dispatch()` in quant_matmul.py is where one would be chosen.

Kernel shape: grid (token tile, output tile); each program loops over the input axis
`blocks_per_step` quantization blocks at a time. A format describes a block as *pieces*:
runs of consecutive elements (16 or 32) whose values it can produce from the block bytes
with elementwise integer ops (a Q4_0 block is two pieces: low nibbles = elements 0..15,
high nibbles = 16..31). For each piece the kernel loads the matching x columns, so no
register shuffles are needed, and accumulates one [block_t, block_n] matmul in f32.
Matmul inputs are bf16/f16 when the activations are (tensor cores), else f32, which
Triton runs as TF32 on the GPU by default (as XLA does); accumulation is always f32.
The same piece functions, applied to whole arrays, give a pure-JAX dequantization
(`dequantize_gguf_jnp`), which serves CPUs and readers.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mistralrs_jax.errors import NotSupportedError

from ._compat import triton_compiler_params

Load = Callable[..., jax.Array]  # load(array_index, byte_offset, count) -> int32/f32 [rows, blocks, count]
Piece = tuple[int, int, jax.Array]  # (first element in the block, number of elements, values [rows, blocks, n])


class BlockFormat(NamedTuple):
    block_elems: int  # weights per block along the input axis
    type_size: int  # bytes per block (raw formats)
    pieces: Callable[[Load], list[Piece]]


# -- byte helpers (work on refs inside the kernel and on arrays in the reference) --------------

def _f16(load: Load, offset: int) -> jax.Array:
    """Little-endian f16 at `offset` of each block, as f32 [rows, blocks, 1]."""
    bits = load(0, offset, 1) | (load(0, offset + 1, 1) << 8)
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _signed(byte: jax.Array) -> jax.Array:
    return jnp.where(byte >= 128, byte - 256, byte)


def _q8_0(load: Load) -> list[Piece]:
    # d: f16, then 32 int8: w = q * d
    d = _f16(load, 0)
    return [(0, 32, _signed(load(0, 2, 32)).astype(jnp.float32) * d)]


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


def _q4_k(load: Load) -> list[Piece]:
    # 256 weights: d, dmin (f16), 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32,
    # 128 bytes of nibbles: bytes 32j..32j+31 hold sub-block 2j (low) and 2j+1 (high).
    d, dmin = _f16(load, 0), _f16(load, 2)
    sb = [load(0, 4 + i, 1) for i in range(12)]
    pieces = []
    for i in range(8):
        if i < 4:
            sc, mn = sb[i] & 63, sb[i + 4] & 63
        else:
            sc = (sb[i + 4] & 15) | ((sb[i - 4] >> 6) << 4)
            mn = (sb[i + 4] >> 4) | ((sb[i] >> 6) << 4)
        qs = load(0, 16 + 32 * (i // 2), 32)
        nibble = qs & 15 if i % 2 == 0 else qs >> 4
        # ggml's order of roundings: (d * sc) * q - (dmin * m)
        pieces.append((32 * i, 32, (d * sc.astype(jnp.float32)) * nibble.astype(jnp.float32)
                       - dmin * mn.astype(jnp.float32)))
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


GGUF_FORMATS: dict[str, BlockFormat] = {
    "Q8_0": BlockFormat(32, 34, _q8_0),
    "Q4_0": BlockFormat(32, 18, _q4_0),
    "Q4_1": BlockFormat(32, 20, _q4_1),
    "Q4_K": BlockFormat(256, 144, _q4_k),
    "Q6_K": BlockFormat(256, 210, _q6_k),
}
"""Raw GGUF block types the kernel reads directly. Others go through `to_affine_int8`."""


def _affine_pieces(group: int, has_offset: bool) -> Callable[[Load], list[Piece]]:
    def pieces(load: Load) -> list[Piece]:
        w = load(0).astype(jnp.float32) * load(1)[..., None]
        if has_offset:
            w = w + load(2)[..., None]
        return [(0, group, w)]

    return pieces


# -- the kernel ---------------------------------------------------------------------------

def _matmul_kernel(x_ref, *refs, pieces: Callable, num_weights: int, raw_bytes: bool, blocks_per_step: int,
                   num_steps: int, compute_dtype):
    weight_refs, o_ref = refs[:num_weights], refs[num_weights]
    block_t, block_n = o_ref.shape

    def body(step, acc):
        blocks = pl.ds(step * blocks_per_step, blocks_per_step)

        def load(i, offset=None, count=None):
            ref = weight_refs[i]
            if offset is None:
                return ref[:, blocks] if len(ref.shape) == 2 else ref[:, blocks, :]
            value = ref[:, blocks, pl.ds(offset, count)]
            return value.astype(jnp.int32) if raw_bytes else value

        for first, count, w in pieces(load):
            x = x_ref[:, blocks, pl.ds(first, count)].reshape(block_t, blocks_per_step * count)
            w = w.reshape(block_n, blocks_per_step * count)
            acc += lax.dot_general(x.astype(compute_dtype), w.astype(compute_dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return acc

    o_ref[...] = lax.fori_loop(0, num_steps, body, jnp.zeros((block_t, block_n), jnp.float32))


def _largest_power_of_2_dividing(n: int, limit: int) -> int:
    best = 1
    while best * 2 <= limit and n % (best * 2) == 0:
        best *= 2
    return best


def _blocked_matmul(x, weights: list[jax.Array], weight_specs_rest: list[tuple[int, ...]], pieces, *, block_elems: int,
                    out_features: int, raw_bytes: bool, interpret: bool, block_t: int | None, block_n: int | None,
                    blocks_per_step: int | None, num_warps: int, num_stages: int, name: str):
    x = jnp.asarray(x)
    lead_shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    num_tokens, in_features = x.shape
    num_blocks = in_features // block_elems
    block_t = block_t or min(64, max(16, 1 << max(0, (num_tokens - 1).bit_length())))
    t_pad = -num_tokens % block_t
    block_n = block_n or _largest_power_of_2_dividing(out_features, 128)
    if out_features % block_n:
        raise NotSupportedError(f"block_n={block_n} does not divide {out_features} output features")
    blocks_per_step = blocks_per_step or _largest_power_of_2_dividing(num_blocks, max(1, 128 // block_elems))
    compute_dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    x_blocks = jnp.pad(x, ((0, t_pad), (0, 0))).reshape(num_tokens + t_pad, num_blocks, block_elems)

    def weight_spec(rest):
        return pl.BlockSpec((block_n, num_blocks, *rest), lambda i, j: (j, 0) + (0,) * len(rest))

    kernel = functools.partial(_matmul_kernel, pieces=pieces, num_weights=len(weights), raw_bytes=raw_bytes,
                               blocks_per_step=blocks_per_step, num_steps=num_blocks // blocks_per_step,
                               compute_dtype=compute_dtype)
    out = pl.pallas_call(
        kernel,
        grid=((num_tokens + t_pad) // block_t, out_features // block_n),
        in_specs=[pl.BlockSpec((block_t, num_blocks, block_elems), lambda i, j: (i, 0, 0))]
        + [weight_spec(rest) for rest in weight_specs_rest],
        out_specs=pl.BlockSpec((block_t, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((num_tokens + t_pad, out_features), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name=f"{name}_t{block_t}_n{block_n}_b{blocks_per_step}",
    )(x_blocks, *weights)
    return out[:num_tokens].reshape(*lead_shape, out_features)


def affine_int8_matmul_pallas(
    x: jax.Array,  # [T, in]
    q: jax.Array,  # int8 [out, in]
    scale: jax.Array,  # f32 [out, in // group]
    offset: jax.Array | None,  # f32 [out, in // group] or None
    group: int,
    *,
    interpret: bool = False,
    block_t: int | None = None,
    block_n: int | None = None,
    blocks_per_step: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
    """x @ (q * scale + offset).T -> [T, out] f32, dequantizing each weight tile in registers."""
    q, scale = jnp.asarray(q), jnp.asarray(scale)
    out_f, in_f = q.shape
    num_blocks = in_f // group
    weights = [q.reshape(out_f, num_blocks, group), scale.astype(jnp.float32)]
    rest = [(group,), ()]
    if offset is not None:
        weights.append(jnp.asarray(offset, jnp.float32))
        rest.append(())
    return _blocked_matmul(x, weights, rest, _affine_pieces(group, offset is not None), block_elems=group,
                           out_features=out_f, raw_bytes=False, interpret=interpret, block_t=block_t,
                           block_n=block_n, blocks_per_step=blocks_per_step, num_warps=num_warps,
                           num_stages=num_stages, name=f"affine_int8_matmul_g{group}")


def _check_gguf(blocks: jax.Array, qtype: str) -> BlockFormat:
    fmt = GGUF_FORMATS.get(qtype)
    if fmt is None:
        raise NotSupportedError(f"no raw-block kernel for {qtype}; kernels exist for {', '.join(GGUF_FORMATS)}. "
                                "Convert the weight with mistralrs_jax.quant.to_affine_int8 and use "
                                "affine_int8_matmul instead")
    if blocks.ndim != 2 or blocks.shape[1] % fmt.type_size:
        raise NotSupportedError(f"{qtype} weights must be uint8 [out, row_bytes] with row_bytes a multiple of "
                                f"{fmt.type_size}; got shape {tuple(blocks.shape)}")
    return fmt


def gguf_matmul_pallas(
    x: jax.Array,  # [T, in]
    blocks: jax.Array,  # uint8 [out, in / block_elems * type_size]: the GGUF tensor's bytes
    qtype: str,
    *,
    interpret: bool = False,
    block_t: int | None = None,
    block_n: int | None = None,
    blocks_per_step: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
    """x @ dequantize(blocks).T -> [T, out] f32, reading the raw GGUF blocks in the kernel."""
    blocks = jnp.asarray(blocks)
    fmt = _check_gguf(blocks, qtype)
    out_f, row_bytes = blocks.shape
    num_blocks = row_bytes // fmt.type_size
    return _blocked_matmul(x, [blocks.reshape(out_f, num_blocks, fmt.type_size)], [(fmt.type_size,)], fmt.pieces,
                           block_elems=fmt.block_elems, out_features=out_f, raw_bytes=True, interpret=interpret,
                           block_t=block_t, block_n=block_n, blocks_per_step=blocks_per_step, num_warps=num_warps,
                           num_stages=num_stages, name=f"gguf_matmul_{qtype.lower()}")


def dequantize_gguf_jnp(blocks: jax.Array, qtype: str) -> jax.Array:
    """Raw GGUF blocks [out, row_bytes] -> f32 [out, in], with the kernel's own piece functions."""
    blocks = jnp.asarray(blocks)
    fmt = _check_gguf(blocks, qtype)
    out_f, row_bytes = blocks.shape
    raw = blocks.reshape(out_f, row_bytes // fmt.type_size, fmt.type_size).astype(jnp.int32)
    w = jnp.zeros((out_f, raw.shape[1], fmt.block_elems), jnp.float32)
    for first, count, values in fmt.pieces(lambda i, offset, count: raw[:, :, offset:offset + count]):
        w = w.at[:, :, first:first + count].set(values)
    return w.reshape(out_f, -1)


def gguf_matmul_reference(x: jax.Array, blocks: jax.Array, qtype: str) -> jax.Array:
    """Pure-JAX x @ dequantize(blocks).T (the whole weight is dequantized inside the jit)."""
    w = dequantize_gguf_jnp(blocks, qtype)
    return lax.dot_general(jnp.asarray(x).astype(jnp.float32), w, (((1,), (1,)), ((), ())))


def triton_supports(out_features: int, in_features: int, block_elems: int) -> bool:
    """Whether the compiled (Triton) kernel handles this weight shape: power-of-two tiles
    of at least 16 output rows must divide the output axis, whole blocks the input, and a
    block (= one matmul's reduction length) must be a power of two of at least 16."""
    pow2 = block_elems & (block_elems - 1) == 0
    return out_features % 16 == 0 and in_features % block_elems == 0 and pow2 and block_elems >= 16


def gguf_matmul(x: jax.Array, blocks: jax.Array, qtype: str, *, impl: str | None = None) -> jax.Array:
    """Public entry for raw-block weights; same dispatch as `affine_int8_matmul`."""
    from .quant_matmul import dispatch

    impl = impl or dispatch()
    if impl == "reference":
        return gguf_matmul_reference(x, blocks, qtype)
    return gguf_matmul_pallas(x, blocks, qtype, interpret=impl == "pallas-interpret")


__all__ = ["GGUF_FORMATS", "affine_int8_matmul_pallas", "gguf_matmul_pallas", "gguf_matmul_reference",
           "gguf_matmul", "dequantize_gguf_jnp", "triton_supports"]

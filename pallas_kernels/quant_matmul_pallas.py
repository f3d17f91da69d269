"""Matmul with packed quantized weights, dequantized in registers: a Pallas kernel for NVIDIA GPUs.

y[T, out] = x[T, in] @ dequant(W[out, in]).T with W held packed, uint8 [out, row_bytes]: the
GGUF file's own blocks (every format in quant_blocks.py: Q4_0..Q8_0, Q2_K..Q8_K, IQ4_NL,
IQ4_XS) or this project's HQQ4/HQQ8 layout. The kernel unpacks f16 scales, nibbles, 6-bit
scales/mins and high bits itself, so weights stay at the format's size in GPU memory (4.5
bits for Q4_K): decode is bandwidth-bound, so this is the fast path on a GPU.

Lowering: written for Pallas' **Triton** backend (`pl.pallas_call` + Triton compiler
params); `interpret=True` runs it anywhere (the tests use that on CPU). No Mosaic GPU
variant exists yet; `dispatch()` in quant_matmul.py is where one would be chosen, and
quant_matmul.py is the only public entry.

Kernel shape: grid (token tile, output tile); each program loops over the input axis
`blocks_per_step` quantization blocks at a time. For each *piece* of a block (a run of 16 or
32 consecutive elements the format computes from the block bytes, quant_blocks.py) the kernel
loads the matching x columns, so no register shuffles are needed, and accumulates one
[block_t, block_n] matmul in f32. Matmul inputs are bf16/f16 when the activations are
(tensor cores), else f32, which Triton runs as TF32 on the GPU by default (as XLA does);
accumulation is always f32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mistralrs_jax.errors import NotSupportedError

from ._compat import triton_compiler_params
from .quant_blocks import block_format

# -- the kernel ---------------------------------------------------------------------------

def _matmul_kernel(x_ref, w_ref, o_ref, *, pieces, blocks_per_step: int, num_steps: int, compute_dtype):
    block_t, block_n = o_ref.shape

    def body(step, acc):
        blocks = pl.ds(step * blocks_per_step, blocks_per_step)

        def load(_, offset, count):
            return w_ref[:, blocks, pl.ds(offset, count)].astype(jnp.int32)

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


def _blocked_matmul(x, w, pieces, *, block_elems: int, out_features: int, interpret: bool, block_t: int | None,
                    block_n: int | None, blocks_per_step: int | None, num_warps: int, num_stages: int, name: str):
    """w: uint8 [out, num_blocks, type_size]."""
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
    kernel = functools.partial(_matmul_kernel, pieces=pieces, blocks_per_step=blocks_per_step,
                               num_steps=num_blocks // blocks_per_step, compute_dtype=compute_dtype)
    out = pl.pallas_call(
        kernel,
        grid=((num_tokens + t_pad) // block_t, out_features // block_n),
        in_specs=[pl.BlockSpec((block_t, num_blocks, block_elems), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((block_n, num_blocks, w.shape[2]), lambda i, j: (j, 0, 0))],
        out_specs=pl.BlockSpec((block_t, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((num_tokens + t_pad, out_features), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name=f"{name}_t{block_t}_n{block_n}_b{blocks_per_step}",
    )(x_blocks, w)
    return out[:num_tokens].reshape(*lead_shape, out_features)


def quant_matmul_pallas(
    x: jax.Array,  # [T, in]
    blocks: jax.Array,  # uint8 [out, in / block_elems * type_size]: the packed weight
    qtype: str,
    *,
    interpret: bool = False,
    block_t: int | None = None,
    block_n: int | None = None,
    blocks_per_step: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
    """x @ dequantize(blocks).T -> [T, out] f32, reading the packed blocks in the kernel."""
    blocks = jnp.asarray(blocks)
    fmt = block_format(qtype, blocks.shape)
    out_f, row_bytes = blocks.shape
    num_blocks = row_bytes // fmt.type_size
    return _blocked_matmul(x, blocks.reshape(out_f, num_blocks, fmt.type_size), fmt.pieces,
                           block_elems=fmt.block_elems, out_features=out_f, interpret=interpret,
                           block_t=block_t, block_n=block_n, blocks_per_step=blocks_per_step, num_warps=num_warps,
                           num_stages=num_stages, name=f"quant_matmul_{qtype.lower()}")


def triton_supports(out_features: int, in_features: int, block_elems: int) -> bool:
    """Whether the compiled (Triton) kernel handles this weight shape: power-of-two tiles
    of at least 16 output rows must divide the output axis, whole blocks the input, and a
    block must be a power of two of at least 16 elements."""
    pow2 = block_elems & (block_elems - 1) == 0
    return out_features % 16 == 0 and in_features % block_elems == 0 and pow2 and block_elems >= 16


__all__ = ["quant_matmul_pallas", "triton_supports"]

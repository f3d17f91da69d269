"""Ragged paged attention as a Pallas kernel for NVIDIA GPUs (Triton lowering).

Same inputs and result as `paged_attention_reference`: one flat token axis holding decode
tokens and prefill chunks of many sequences, K/V read from the paged cache through the
block tables, GQA, optional sliding window and logit soft-cap.

Lowering: this kernel is written for Pallas' **Triton** backend (`pl.pallas_call` with
Triton compiler params). It also runs under `interpret=True` anywhere, which is how the
tests prove it on CPU. Mosaic GPU (Pallas' successor backend from JAX 0.11) needs a
different kernel shape (warpgroups, TMA copies into shared memory, `plgpu.kernel`); none
is written yet, and `dispatch()` in paged_attention.py is where one would be chosen.

How the ragged batch maps onto the GPU
--------------------------------------
Grid = (query tile, kv head, kv split). A *query tile* is up to `block_q` consecutive
tokens of ONE sequence; its rows are (token, query head of this kv head) pairs, so a tile
is a [block_q * group, head_dim] matrix (group padded to a power of two for Triton) and
every K/V page it loads serves all heads of the group: GQA costs no extra memory traffic.
A decode token is a one-token tile; a prefill chunk of n tokens is ceil(n / block_q) tiles.
Each program walks its sequence's pages from the first one its window can see to the one
holding its last token, `pages_per_step` pages per iteration (gathered through the block
table row), with an online softmax in registers.

The tile list is derived inside the wrapper from the existing `AttentionMetadata` with jnp
ops (token counts per row, cumulative sums, a segment max/min of positions per tile), so
the runner and the metadata class need no change. Tiles beyond the real count get zero
pages and do nothing. The static tile count is T // block_q + min(S, T), an upper bound.

Scalar prefetch: Pallas' Triton backend has no `PrefetchScalarGridSpec` ("scalar prefetch
not implemented in the Triton backend"); on a GPU the per-tile scalars and block-table
entries are plain int32 inputs read inside the kernel (a global load each), which is
what scalar prefetch amounts to there.

Split-K (flash-decoding): with `kv_splits > 1` the pages of each tile are divided among
that many programs, each writing an unnormalised partial (acc, running max, running sum);
the wrapper merges them with a log-sum-exp. The default turns it on only when the grid
would otherwise be too small to fill a GPU and contexts are long.

Precision: scores and P@V are `lax.dot_general` with f32 accumulation. With bf16/f16
caches the matmul inputs are bf16/f16 (tensor cores); with f32 caches Triton's default
is TF32 on the GPU, like XLA's own GPU dots. Interpret mode computes in full f32.

Masking uses a large finite negative instead of -inf: Triton has no -inf-safe max/exp
idiom, and a row that sees nothing in one step (its window starts later) accumulates
garbage weighted by exp(MASK - MASK) = 1 that the first real key wipes out with a
correction factor of exp(MASK - real) = 0. Every real token sees at least its own key.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._compat import SQUEEZED, triton_compiler_params

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Programs needed to keep a large GPU busy (e.g. 132 SMs x 2); below it split-K kicks in.
MIN_PROGRAMS = 256
KEYS_PER_STEP = 64  # keys one loop iteration scores (pages_per_step * block_size)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def triton_supports(head_dim: int, block_size: int) -> bool:
    """Whether the compiled (Triton) kernel handles these shapes.

    Triton tensors must have power-of-two sizes and matmul sides of at least 16. Query
    tiles and pages per step are chosen to satisfy that; head_dim and block_size are the
    model's and the cache's, so shapes outside this fall back to the reference.
    """
    def pow2(n):
        return n >= 1 and n & (n - 1) == 0

    return pow2(head_dim) and head_dim >= 16 and pow2(block_size)


class _Tiles(NamedTuple):
    """Per query tile: sequence row, first token, first page, page count; per token: its tile and row."""

    row: jax.Array
    q_start: jax.Array
    first_page: jax.Array
    num_pages: jax.Array
    token_tile: jax.Array
    token_row: jax.Array


def _build_tiles(token_seq, positions, num_seqs: int, num_tiles: int, block_q: int, block_size: int,
                 sliding_window: int | None) -> _Tiles:
    """Cut the flat token axis into per-sequence query tiles (jnp ops, inside the jit).

    Tokens of one sequence row are contiguous and rows are in order (the runner's layout).
    Padding tokens sit in the last row at position 0: they only add work (a page for a
    padding-only row; with a sliding window, a real last row's final tile starts at page 0).
    """
    num_tokens = token_seq.shape[0]
    token_index = jnp.arange(num_tokens, dtype=jnp.int32)
    counts = jnp.zeros(num_seqs, jnp.int32).at[token_seq].add(1)
    seq_start = jnp.cumsum(counts) - counts
    tiles_per_seq = (counts + block_q - 1) // block_q
    tile_end = jnp.cumsum(tiles_per_seq)
    tile_first = tile_end - tiles_per_seq

    local = token_index - seq_start[token_seq]
    token_tile = tile_first[token_seq] + local // block_q
    token_row = local % block_q

    tile_index = jnp.arange(num_tiles, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(tile_end, tile_index, side="right"), num_seqs - 1).astype(jnp.int32)
    q_start = seq_start[row] + (tile_index - tile_first[row]) * block_q
    q_start = jnp.minimum(q_start, num_tokens - 1)  # unused tiles: keep the q read in bounds
    max_pos = jax.ops.segment_max(positions, token_tile, num_segments=num_tiles)
    min_pos = jax.ops.segment_min(positions, token_tile, num_segments=num_tiles)
    valid = tile_index < tile_end[-1]
    first_key = jnp.maximum(min_pos - sliding_window + 1, 0) if sliding_window else jnp.zeros_like(min_pos)
    first_page = jnp.where(valid, first_key // block_size, 0)
    num_pages = jnp.where(valid, max_pos // block_size + 1 - first_page, 0)
    return _Tiles(row, q_start.astype(jnp.int32), first_page.astype(jnp.int32), num_pages.astype(jnp.int32),
                  token_tile, token_row)


def _attention_kernel(
    tile_row_ref, tile_q_start_ref, tile_first_page_ref, tile_num_pages_ref,  # [num_tiles] int32
    block_tables_ref,  # [S, padded max_blocks] int32
    row_positions_ref,  # [T * group + pad] int32: position of each (token, head) row
    q_ref,  # [T * group + pad, D] this kv head's query rows (pre-scaled)
    k_ref, v_ref,  # [num_blocks, block_size, D] this kv head's pages
    o_ref,  # [block_m, D] f32: unnormalised accumulator
    m_ref, l_ref,  # [block_m] f32: running max and sum
    *, block_m: int, group: int, block_size: int, pages_per_step: int, kv_splits: int,
    sliding_window: int | None, soft_cap: float | None,
):
    tile = pl.program_id(0)
    split = pl.program_id(2)
    seq_row = tile_row_ref[tile]
    first_page = tile_first_page_ref[tile]
    num_steps = (tile_num_pages_ref[tile] + pages_per_step - 1) // pages_per_step
    steps_per_split = (num_steps + kv_splits - 1) // kv_splits
    step_lo = split * steps_per_split
    step_hi = jnp.minimum(num_steps, step_lo + steps_per_split)

    rows = pl.ds(tile_q_start_ref[tile] * group, block_m)
    q = q_ref[rows, :]
    row_pos = row_positions_ref[rows]
    keys_per_step = pages_per_step * block_size
    head_dim = q.shape[-1]

    def body(step, carry):
        acc, m_prev, l_prev = carry
        page = first_page + step * pages_per_step
        page_ids = block_tables_ref[seq_row, pl.ds(page, pages_per_step)]
        k = k_ref[page_ids].reshape(keys_per_step, head_dim)
        v = v_ref[page_ids].reshape(keys_per_step, head_dim)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = page * block_size + lax.broadcasted_iota(jnp.int32, (block_m, keys_per_step), 1)
        visible = key_pos <= row_pos[:, None]
        if sliding_window is not None:
            visible &= key_pos > row_pos[:, None] - sliding_window
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc * correction[:, None] + pv, m_new, l_prev * correction + p.sum(axis=-1)

    init = (jnp.zeros((block_m, head_dim), jnp.float32), jnp.full((block_m,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_m,), jnp.float32))
    acc, m, l = lax.fori_loop(step_lo, step_hi, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def choose_block_q(num_tokens: int, num_seqs: int, group: int, head_dim: int) -> int:
    """Tokens per query tile: 16-row tiles for decode-like batches, 64 rows for prefill
    (32 for head_dim >= 256, so the f32 accumulator still fits in registers)."""
    rows = 16 if num_tokens <= 2 * num_seqs else (64 if head_dim < 256 else 32)
    return max(1, rows // _next_power_of_2(group))


def choose_kv_splits(num_tiles: int, kv_heads: int, max_pages: int, pages_per_step: int) -> int:
    """Split-K factor: only when the grid is too small for the GPU and contexts are long."""
    programs = num_tiles * kv_heads
    if programs >= MIN_PROGRAMS:
        return 1
    steps = max(1, max_pages // pages_per_step)
    return int(max(1, min(8, steps // 4, MIN_PROGRAMS // max(1, programs))))


def paged_attention_pallas(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks * block_size, kv_heads, head_dim]
    v_cache: jax.Array,
    meta,  # AttentionMetadata (paged_attention.py)
    *,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    pages_per_step: int | None = None,
    kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Attention of every token against its own sequence's cached keys; [T, num_heads, head_dim].

    `block_q`, `pages_per_step`, `kv_splits` tune the tiling (defaults chosen from the
    static shapes); `interpret=True` runs the kernel through Pallas' interpreter (tests).
    """
    q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
    meta = jax.tree.map(jnp.asarray, meta)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    group_pad = _next_power_of_2(group)  # Triton tiles are powers of two
    num_seqs, max_blocks = meta.block_tables.shape
    block_q = block_q or choose_block_q(num_tokens, num_seqs, group, head_dim)
    block_m = block_q * group_pad
    pages_per_step = pages_per_step or max(1, KEYS_PER_STEP // block_size)
    num_tiles = num_tokens // block_q + min(num_seqs, num_tokens)
    kv_splits = kv_splits or choose_kv_splits(num_tiles, kv_heads, max_blocks, pages_per_step)

    tiles = _build_tiles(meta.token_seq.astype(jnp.int32), meta.positions.astype(jnp.int32), num_seqs, num_tiles,
                         block_q, block_size, sliding_window)

    # Query rows per kv head: row (t * group_pad + j) is token t, query head (kv_head * group + j).
    compute_dtype = k_cache.dtype if k_cache.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    q_rows = (q.astype(jnp.float32) * scale).reshape(num_tokens, kv_heads, group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, block_m), (0, 0), (0, group_pad - group), (0, 0)))
    q_rows = jnp.transpose(q_rows, (1, 0, 2, 3)).reshape(kv_heads, -1, head_dim).astype(compute_dtype)
    row_positions = jnp.repeat(jnp.pad(meta.positions.astype(jnp.int32), (0, block_m)), group_pad)
    # Page reads run up to pages_per_step past a tile's last page: pad the tables with the
    # trash block (those keys are beyond every row's position, so masked).
    block_tables = jnp.pad(meta.block_tables.astype(jnp.int32), ((0, 0), (0, pages_per_step)))
    num_blocks = k_cache.shape[0] // block_size
    k_pages = k_cache.reshape(num_blocks, block_size, kv_heads, head_dim)
    v_pages = v_cache.reshape(num_blocks, block_size, kv_heads, head_dim)

    kernel = functools.partial(
        _attention_kernel, block_m=block_m, group=group_pad, block_size=block_size, pages_per_step=pages_per_step,
        kv_splits=kv_splits, sliding_window=sliding_window, soft_cap=soft_cap)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, h, s: (0,) * len(shape))  # noqa: E731
    page_spec = pl.BlockSpec((num_blocks, block_size, SQUEEZED, head_dim), lambda i, h, s: (0, 0, h, 0))
    partial_shape = (kv_splits, num_tiles, kv_heads, block_m)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_tiles, kv_heads, kv_splits),
        in_specs=[
            whole((num_tiles,)), whole((num_tiles,)), whole((num_tiles,)), whole((num_tiles,)),
            whole(block_tables.shape), whole(row_positions.shape),
            pl.BlockSpec((SQUEEZED, q_rows.shape[1], head_dim), lambda i, h, s: (h, 0, 0)),
            page_spec, page_spec,
        ],
        out_specs=[
            pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, block_m, head_dim), lambda i, h, s: (s, i, h, 0, 0)),
            pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, block_m), lambda i, h, s: (s, i, h, 0)),
            pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, block_m), lambda i, h, s: (s, i, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name=f"ragged_paged_attention_bq{block_q}_g{group_pad}_p{pages_per_step}_s{kv_splits}",
    )(tiles.row, tiles.q_start, tiles.first_page, tiles.num_pages, block_tables, row_positions, q_rows,
      k_pages, v_pages)

    # Merge the kv splits (log-sum-exp), normalise, and pick each token's rows out of its tile.
    m_all = m.max(axis=0)
    weight = jnp.exp(m - m_all[None])
    total = (l * weight).sum(axis=0)
    out = (acc * weight[..., None]).sum(axis=0) / jnp.maximum(total, 1e-30)[..., None]
    out = out.reshape(num_tiles, kv_heads, block_q, group_pad, head_dim)
    out = out[tiles.token_tile, :, tiles.token_row]  # [T, kv_heads, group_pad, D]
    return out[:, :, :group].reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


__all__ = ["paged_attention_pallas", "triton_supports", "choose_block_q", "choose_kv_splits", "MASK_VALUE"]

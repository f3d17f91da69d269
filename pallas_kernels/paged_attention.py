"""Paged attention over a ragged mixed batch (decode tokens and prefill chunks together).

Layout (shared with the runner):
- the KV cache of one layer is `k_cache`, `v_cache`: [num_blocks * block_size, kv_heads,
  head_dim]; block 0 is a trash block that padding tokens write into.
- the step's tokens are one flat axis of length T (padded). Token t belongs to sequence row
  `token_seq[t]` and sits at absolute position `positions[t]`. Its K/V were written to the
  cache before attention runs, so each token attends to cache positions 0..positions[t] of
  its own sequence (causal, optionally a sliding window), read through the block tables.
- decode tokens come first: tokens [0, num_decode_tokens) are one-token decodes.

The pure-JAX reference has two paths, both with dynamic loop bounds so no step shape
depends on context lengths:
- decode tokens (one query per sequence): each token gathers its own context in chunks and
  reduces with broadcast multiply-adds. Measured on XLA:CPU, this beats an einsum over
  per-token gathered keys ~3x (tiny batched dots are slow there).
- prefill tokens: the host lists "key chunks" (sequence row, first key position) covering
  the prefill sequences' contexts; each loop iteration gathers one chunk of KEY_CHUNK keys
  and scores *all* tokens against it as one dense matmul, masking tokens of other
  sequences. Dense matmuls are what XLA:CPU does well: ~25x faster than per-token gathers
  for a 256-token prefill.

`paged_attention()` is the public entry: `dispatch()` picks the Pallas GPU kernel when a GPU
is present (see the Pallas issue) and this reference otherwise. On CPU with an f32 cache the
reference hands every row, decode or prefill, to the CPU kernel library's paged attention
(mistralrs_jax/quant/cpu_kernel/attention.h) instead of running the two paths above: the same
sums without gathering key chunks, a row's result independent of how its step was batched, and
a compiled step a third the size (the paths' loops and masks are most of its HLO).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

DECODE_CHUNK_TOKENS = 128  # keys gathered per loop iteration of the decode path
PREFILL_KEY_CHUNK = 256  # keys per prefill-path iteration


@jax.tree_util.register_dataclass
@dataclass
class AttentionMetadata:
    """The kernel contract: per-step arrays describing the ragged batch, built by the runner on
    the host and read by both attention paths here (and the Pallas kernel).

    Decode tokens (one per sequence) come first in the token axis; see the module docstring
    for how the two groups are attended.
    """

    positions: jax.Array  # [T] absolute position of each token
    slot_mapping: jax.Array  # [T] flat KV-cache slot each token's K/V is written to
    token_seq: jax.Array  # [T] sequence row of each token
    block_tables: jax.Array  # [S, max_blocks]
    num_decode_tokens: jax.Array  # scalar: tokens [0, n) are one-token decodes
    num_decode_chunks: jax.Array  # scalar: loop bound of the decode path
    chunk_seq: jax.Array  # [C] sequence row of each prefill key chunk
    chunk_start: jax.Array  # [C] first key position of each prefill key chunk
    num_prefill_chunks: jax.Array  # scalar: chunks in use


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array):
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their cache slots."""
    k_cache = k_cache.at[slot_mapping].set(k.astype(k_cache.dtype), mode="promise_in_bounds")
    v_cache = v_cache.at[slot_mapping].set(v.astype(v_cache.dtype), mode="promise_in_bounds")
    return k_cache, v_cache


def _soft_cap(s, soft_cap):
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def _online_update(carry, s, v_term):
    """One online-softmax step. s: scores [..., keys] (masked with -inf); v_term(p) -> [..., D]."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + v_term(p)


def _decode_path(qg, k_blocks, v_blocks, token_tables, positions, num_chunks, block_size, sliding_window, soft_cap):
    """qg [N, kvh, g, D] (pre-scaled); token_tables [N, max_blocks]. Returns (l, acc)."""
    n, kvh, group, head_dim = qg.shape
    blocks_per_chunk = max(1, DECODE_CHUNK_TOKENS // block_size)
    chunk_tokens = blocks_per_chunk * block_size

    def body(chunk, carry):
        ids = jax.lax.dynamic_slice_in_dim(token_tables, chunk * blocks_per_chunk, blocks_per_chunk, axis=1)
        k = k_blocks[ids].reshape(n, chunk_tokens, kvh, 1, head_dim).astype(jnp.float32)
        v = v_blocks[ids].reshape(n, chunk_tokens, kvh, 1, head_dim).astype(jnp.float32)
        s = (qg[:, None] * k).sum(-1)  # [N, C, kvh, g]
        s = jnp.moveaxis(_soft_cap(s, soft_cap), 1, -1)  # [N, kvh, g, C]
        key_pos = chunk * chunk_tokens + jnp.arange(chunk_tokens)
        visible = key_pos[None, :] <= positions[:, None]
        if sliding_window is not None:
            visible &= key_pos[None, :] > positions[:, None] - sliding_window
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        return _online_update(carry, s, lambda p: (jnp.moveaxis(p, -1, 1)[..., None] * v).sum(1))

    init = (jnp.full((n, kvh, group), -jnp.inf, jnp.float32), jnp.zeros((n, kvh, group), jnp.float32),
            jnp.zeros((n, kvh, group, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return l, acc


def _prefill_path(qg, k_blocks, v_blocks, block_tables, token_seq, positions, is_prefill, chunk_seq, chunk_start,
                  num_chunks, block_size, sliding_window, soft_cap):
    """All tokens against the listed key chunks, one dense matmul per chunk."""
    t, kvh, group, head_dim = qg.shape
    blocks_per_chunk = max(1, PREFILL_KEY_CHUNK // block_size)
    chunk_tokens = blocks_per_chunk * block_size
    q_heads = jnp.transpose(qg, (1, 0, 2, 3)).reshape(kvh, t * group, head_dim)  # [kvh, T*g, D]

    def body(c, carry):
        row = chunk_seq[c]
        start = chunk_start[c]
        ids = jax.lax.dynamic_slice_in_dim(block_tables[row], start // block_size, blocks_per_chunk)
        k = k_blocks[ids].reshape(chunk_tokens, kvh, head_dim).astype(jnp.float32)
        v = v_blocks[ids].reshape(chunk_tokens, kvh, head_dim).astype(jnp.float32)
        s = jnp.einsum("hqd,khd->hqk", q_heads, k).reshape(kvh, t, group, chunk_tokens)
        s = _soft_cap(s, soft_cap)
        key_pos = start + jnp.arange(chunk_tokens)
        visible = (token_seq[:, None] == row) & is_prefill[:, None] & (key_pos[None, :] <= positions[:, None])
        if sliding_window is not None:
            visible &= key_pos[None, :] > positions[:, None] - sliding_window
        s = jnp.where(visible[None, :, None, :], s, -jnp.inf)

        def v_term(p):
            return jnp.einsum("hqk,khd->hqd", p.reshape(kvh, t * group, chunk_tokens), v).reshape(kvh, t, group, head_dim)

        return _online_update(carry, s, v_term)

    init = (jnp.full((kvh, t, group), -jnp.inf, jnp.float32), jnp.zeros((kvh, t, group), jnp.float32),
            jnp.zeros((kvh, t, group, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return jnp.transpose(l, (1, 0, 2)), jnp.transpose(acc, (1, 0, 2, 3))


def _normalized(l, acc, q):
    """The attention output from the softmax sums: acc / l, in q's shape [T, heads, D] and dtype."""
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(q.shape).astype(q.dtype)


def paged_attention_reference(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks * block_size, kv_heads, head_dim]
    v_cache: jax.Array,
    meta: AttentionMetadata,
    *,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    cpu_kernel: bool = False,
) -> jax.Array:
    """`cpu_kernel`: every row's sums come from the CPU kernel library's paged attention
    (mistralrs_jax/quant/cpu_kernel/attention.h: the same sums, the cache read in place, and a
    row's result independent of how the step batched it) instead of the two XLA paths below;
    f32 caches on CPU only (see `paged_attention`)."""
    q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
    meta = jax.tree.map(jnp.asarray, meta)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, kv_heads, group, head_dim)
    if cpu_kernel:
        from mistralrs_jax.quant.cpu_kernel import paged_attention_cpu

        l, acc = paged_attention_cpu(qg, k_cache, v_cache, meta.block_tables, meta.token_seq, meta.positions,
                                     num_tokens, block_size=block_size, window=sliding_window, soft_cap=soft_cap)
        return _normalized(l, acc, q)
    # A one-KV-head cache (Gemma 3 270M, MQA) is viewed without its unit axis: with it, XLA:CPU
    # gives the blocked view a layout with the unit axis outermost and then copies the whole
    # cache back to row-major for the gathers, twice per layer and step, so a step's time grew
    # with the KV pool (Gemma 3 270M: 44 ms at 64 MiB, 130 ms at 512 MiB). The paths reshape
    # what they gather, so both views serve them.
    blocked = (-1, block_size, head_dim) if kv_heads == 1 else (-1, block_size, kv_heads, head_dim)
    k_blocks = k_cache.reshape(blocked)
    v_blocks = v_cache.reshape(blocked)
    token_index = jnp.arange(num_tokens)

    # Decode path over the leading tokens (at most one per sequence row).
    num_rows = min(num_tokens, meta.block_tables.shape[0])
    tables = meta.block_tables
    blocks_per_chunk = max(1, DECODE_CHUNK_TOKENS // block_size)
    if tables.shape[1] % blocks_per_chunk:
        tables = jnp.pad(tables, ((0, 0), (0, blocks_per_chunk - tables.shape[1] % blocks_per_chunk)))
    dec_l, dec_acc = _decode_path(
        qg[:num_rows], k_blocks, v_blocks, tables[meta.token_seq[:num_rows]], meta.positions[:num_rows],
        meta.num_decode_chunks, block_size, sliding_window, soft_cap)

    prefill_blocks = max(1, PREFILL_KEY_CHUNK // block_size)
    tables = meta.block_tables
    if tables.shape[1] % prefill_blocks:
        tables = jnp.pad(tables, ((0, 0), (0, prefill_blocks - tables.shape[1] % prefill_blocks)))
    is_prefill = token_index >= meta.num_decode_tokens
    pre_l, pre_acc = _prefill_path(
        qg, k_blocks, v_blocks, tables, meta.token_seq, meta.positions, is_prefill, meta.chunk_seq,
        meta.chunk_start, meta.num_prefill_chunks, block_size, sliding_window, soft_cap)

    is_decode = (token_index < meta.num_decode_tokens)[:, None, None]
    dec_l = jnp.pad(dec_l, ((0, num_tokens - num_rows), (0, 0), (0, 0)))
    dec_acc = jnp.pad(dec_acc, ((0, num_tokens - num_rows), (0, 0), (0, 0), (0, 0)))
    l = jnp.where(is_decode, dec_l, pre_l)
    acc = jnp.where(is_decode[..., None], dec_acc, pre_acc)
    return _normalized(l, acc, q)


def dispatch() -> str:
    """Which implementation `paged_attention` uses: 'pallas', 'pallas-interpret' or 'reference'.

    'pallas' is the kernel in paged_attention_pallas.py compiled through Pallas' Triton
    lowering (the only GPU lowering written so far; a Mosaic GPU kernel would be a
    fourth choice here). MISTRALRS_JAX_ATTENTION=reference|pallas|interpret overrides the
    default (Pallas on GPU, the XLA reference elsewhere). Read on every call, i.e. at
    trace time: a jitted function keeps the choice it was traced with.
    """
    from ._compat import choose_implementation

    return choose_implementation("MISTRALRS_JAX_ATTENTION", jax.default_backend() == "gpu" and _pallas_available())


def _pallas_available() -> bool:
    from ._compat import triton_available

    return triton_available()


def _cpu_attention_kernel(k_cache) -> bool:
    """Whether the reference runs on the CPU kernel library's paged attention (CPU, f32 cache,
    the library built; MISTRALRS_JAX_CPU_ATTENTION=off, or the older name
    MISTRALRS_JAX_CPU_DECODE_ATTENTION=off, turns it off). On XLA:CPU the reference gathers
    every key chunk into a new buffer (the decode path ~2-3x the kernel's time at batch 1), and
    its two paths' loops and masks are most of a compiled step's HLO (SmolLM2: 18.7k of its
    lines, ~25 MB of host memory per compiled step shape, against 7.4k without them). The
    kernel's sums equal the reference's up to the order of f32 roundings, which on the packed
    engine (8-bit activations) moves some greedy near-ties (tests/test_fidelity_llamacpp.py
    counts how often each follows llama.cpp)."""
    import os

    for name in ("MISTRALRS_JAX_CPU_ATTENTION", "MISTRALRS_JAX_CPU_DECODE_ATTENTION"):
        if os.environ.get(name, "on").strip().lower() in ("0", "off", "false", "no"):
            return False
    if jax.default_backend() != "cpu" or k_cache.dtype != jnp.float32:
        return False
    from mistralrs_jax.quant.cpu_kernel import cpu_kernel_available

    return cpu_kernel_available()


def paged_attention(q, k_cache, v_cache, meta, *, impl: str | None = None, **kwargs):
    """Paged attention over the ragged batch; `impl` (a `dispatch()` value) overrides the choice."""
    impl = impl or dispatch()
    if impl == "reference":
        return paged_attention_reference(q, k_cache, v_cache, meta, cpu_kernel=_cpu_attention_kernel(k_cache), **kwargs)
    from .paged_attention_pallas import paged_attention_pallas, triton_supports

    if impl == "pallas" and not triton_supports(q.shape[-1], kwargs["block_size"]):
        import logging

        logging.getLogger(__name__).warning(
            "head_dim %d / block_size %d are not powers of two: the Triton kernel cannot tile them, using the XLA "
            "reference attention", q.shape[-1], kwargs["block_size"])
        return paged_attention_reference(q, k_cache, v_cache, meta, **kwargs)
    return paged_attention_pallas(q, k_cache, v_cache, meta, interpret=impl == "pallas-interpret", **kwargs)

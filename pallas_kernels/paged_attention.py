"""Paged attention over a ragged mixed batch (prefill chunks and decode tokens together).

Layout (shared with the runner):
- the KV cache of one layer is `k_cache`, `v_cache`: [num_blocks * block_size, kv_heads, head_dim];
  block 0 is a trash block that padding tokens write into.
- the step's tokens are one flat axis of length T (padded). Token t belongs to sequence
  row `token_seq[t]`, sits at absolute position `positions[t]`, and its K/V were written
  to the cache before attention runs, so each token simply attends to cache positions
  0..positions[t] of its own sequence (causal), through `block_tables[token_seq[t]]`.

`paged_attention()` is the public entry: `dispatch()` picks the Pallas GPU kernel when a
GPU is present (see the Pallas issue) and the pure-JAX reference otherwise.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

# Keys gathered per loop iteration of the reference. Large enough that a short decode
# context is one iteration; small enough that a 512-token prefill chunk's gather stays
# in tens of MB.
REFERENCE_KV_CHUNK_TOKENS = 128


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array):
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their cache slots."""
    k_cache = k_cache.at[slot_mapping].set(k.astype(k_cache.dtype), mode="promise_in_bounds")
    v_cache = v_cache.at[slot_mapping].set(v.astype(v_cache.dtype), mode="promise_in_bounds")
    return k_cache, v_cache


def paged_attention_reference(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks * block_size, kv_heads, head_dim]
    v_cache: jax.Array,
    token_seq: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    block_tables: jax.Array,  # [S, max_blocks] int32
    num_kv_chunks: jax.Array,  # scalar int32: ceil((max position + 1) / chunk)
    *,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Online-softmax loop over chunks of each token's own context. Returns [T, heads, head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    blocks_per_chunk = max(1, REFERENCE_KV_CHUNK_TOKENS // block_size)
    chunk_tokens = blocks_per_chunk * block_size
    max_blocks = block_tables.shape[1]
    if max_blocks % blocks_per_chunk:  # pad the table so every chunk slice is in bounds
        pad = blocks_per_chunk - max_blocks % blocks_per_chunk
        block_tables = jnp.pad(block_tables, ((0, 0), (0, pad)))
    k_blocks = k_cache.reshape(-1, block_size, kv_heads, head_dim)
    v_blocks = v_cache.reshape(-1, block_size, kv_heads, head_dim)
    token_tables = block_tables[token_seq]  # [T, max_blocks]
    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, kv_heads, group, head_dim)

    def body(chunk, carry):
        m, l, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(token_tables, chunk * blocks_per_chunk, blocks_per_chunk, axis=1)
        k = k_blocks[ids].reshape(num_tokens, chunk_tokens, kv_heads, head_dim).astype(jnp.float32)
        v = v_blocks[ids].reshape(num_tokens, chunk_tokens, kv_heads, head_dim).astype(jnp.float32)
        s = jnp.einsum("tkgd,tskd->tkgs", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = chunk * chunk_tokens + jnp.arange(chunk_tokens)
        visible = key_pos[None, :] <= positions[:, None]
        if sliding_window is not None:
            visible &= key_pos[None, :] > positions[:, None] - sliding_window
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # Rows with nothing visible yet keep m = -inf; use 0 there to avoid inf - inf.
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgs,tskd->tkgd", p, v)
        return m_new, l, acc

    init = (
        jnp.full((num_tokens, kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group, head_dim), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_kv_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def dispatch() -> str:
    """Which implementation `paged_attention` uses: 'pallas', 'pallas-interpret' or 'reference'.

    MISTRALRS_JAX_ATTENTION=reference|pallas|interpret overrides the default (Pallas on
    GPU, the XLA reference elsewhere).
    """
    forced = os.environ.get("MISTRALRS_JAX_ATTENTION", "").strip().lower()
    if forced in ("reference", "pallas", "interpret"):
        return "pallas-interpret" if forced == "interpret" else forced
    return "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "reference"


def _pallas_available() -> bool:
    return False  # the Pallas kernel lands with the Pallas-kernels issue


def paged_attention(q, k_cache, v_cache, token_seq, positions, block_tables, num_kv_chunks, **kwargs):
    impl = dispatch()
    if impl != "reference":
        raise NotImplementedError("the Pallas paged-attention kernel is not built yet; use the reference")
    return paged_attention_reference(q, k_cache, v_cache, token_seq, positions, block_tables, num_kv_chunks, **kwargs)

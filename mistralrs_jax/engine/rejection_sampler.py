"""Speculative sampling on the device: draft draws and their verification by the target.

Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x is
accepted with probability min(1, p(x)/q(x)); at the first rejection the token is drawn
from norm(max(0, p - q)); if all k are accepted, a bonus token is drawn from p. Each
request's sampling settings (logit bias, penalties over the history *including* earlier
draft tokens, temperature, top-k, top-p, min-p) shape both p and q exactly as
`sampler.sample` shapes its distribution (`sampler.sampling_weights`), so every
SamplingParams field keeps its meaning under speculation. Greedy rows reduce to the
longest prefix of draft tokens equal to the target's argmax, then the argmax.

Random numbers: each decision draws from ``fold_in(fold_in(key(seed), output index),
purpose)``, row-local as in the sampler, so seeded requests repeat. Different purposes
(draft draw, acceptance test, final draw) never share a uniform, and the uniforms a step
uses belong to output indices no earlier kept decision used.

Both functions are pure; jit them with ``static_argnames=("modes",)``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .sampler import (GREEDY_TEMPERATURE, SamplerModes, SamplingArrays, apply_logit_adjustments, blocked_argmax,
                      inverse_cdf, largest_k, map_row_chunks, row_uniforms, sampling_weights)

# fold_in salts: which decision a uniform is for.
SALT_DRAFT, SALT_ACCEPT, SALT_FINAL = 1, 2, 3


def target_distributions(logits, arrays: SamplingArrays, modes: SamplerModes):
    """(probs f32[R, V], greedy ids i32[R]): the distribution `sampler.sample` draws each row
    from (bias, penalties, temperature, top-k/top-p/min-p, renormalized); one-hot at the
    argmax of the adjusted logits for greedy rows."""
    def rows(chunk_logits, chunk_arrays):
        adjusted = apply_logit_adjustments(chunk_logits.astype(jnp.float32), chunk_arrays, modes)
        greedy_ids = blocked_argmax(adjusted)
        weights = sampling_weights(adjusted, greedy_ids, chunk_arrays, modes)
        probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
        one_hot = (jnp.arange(adjusted.shape[1])[None, :] == greedy_ids[:, None]).astype(jnp.float32)
        greedy_row = chunk_arrays.temperature < GREEDY_TEMPERATURE
        return jnp.where(greedy_row[:, None], one_hot, probs), greedy_ids

    return map_row_chunks(rows, logits, arrays)


def draft_sample(logits, arrays: SamplingArrays, q_buffer, q_rows, position, modes: SamplerModes):
    """Draw one draft token per row of `logits` (f32[S, V]) and store the distribution it
    was drawn from in ``q_buffer[q_rows[i], position]`` (f32[Q, gamma, V]; rows with an
    out-of-range ``q_rows`` entry are not stored). Returns (ids i32[S], q_buffer).
    Donate the buffer."""
    if modes.all_greedy:
        # Greedy verification never reads q (see `verify`).
        return blocked_argmax(apply_logit_adjustments(logits.astype(jnp.float32), arrays, modes)), q_buffer
    probs, greedy_ids = target_distributions(logits, arrays, modes)
    sampled = inverse_cdf(probs, row_uniforms(arrays.seeds, arrays.steps, SALT_DRAFT))
    ids = jnp.where(arrays.temperature < GREEDY_TEMPERATURE, greedy_ids, sampled).astype(jnp.int32)
    return ids, q_buffer.at[q_rows, position].set(probs, mode="drop")


class VerifyResult(NamedTuple):
    num_accepted: jax.Array  # i32[S]: leading draft tokens accepted
    token_ids: jax.Array  # i32[S, gamma + 1]: the accepted drafts, then the final token at num_accepted
    logprobs: jax.Array  # f32[S, gamma + 1]: log_softmax(raw target logits) at token_ids
    top_ids: jax.Array  # i32[S, gamma + 1, K], by descending logprob
    top_logprobs: jax.Array  # f32[S, gamma + 1, K]


def verify(logits, arrays: SamplingArrays, q_buffer, q_rows, logit_rows, draft_ids, num_draft,
           modes: SamplerModes) -> VerifyResult:
    """Speculative sampling for S rows at once.

    logits: f32[L, V], the target's raw logits at L token positions; `arrays` has one row
    per position (that position's sampling settings, penalty history and output index).
    logit_rows: i32[S, gamma + 1], row s's position j -> its logits row (j = 0 follows the
    last chunk token, j > 0 follows draft token j). draft_ids: i32[S, gamma]; num_draft:
    i32[S], how many of them are real (0: plain sampling from p). q_rows: i32[S], row s's
    draft distributions in q_buffer (f32[Q, gamma, V]).

    Greedy rows never read q: with p one-hot, u * q(x) < p(x) holds iff x is the argmax
    (0 <= u * q < 1), and their final token is the argmax itself.
    """
    num_rows, gamma = draft_ids.shape
    positions = jnp.arange(gamma)[None, :]
    is_draft = positions < num_draft[:, None]
    rows = jnp.arange(num_rows)
    if modes.all_greedy:
        adjusted = apply_logit_adjustments(logits.astype(jnp.float32), arrays, modes)
        target_ids = blocked_argmax(adjusted)[logit_rows]  # [S, gamma + 1]
        accepted = (draft_ids == target_ids[:, :gamma]) & is_draft
        num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
        final = target_ids[rows, num_accepted]
    else:
        probs, greedy_ids = target_distributions(logits, arrays, modes)
        p_draft = probs[logit_rows[:, :gamma], draft_ids]  # p_j(x_j)
        q_draft = q_buffer[q_rows[:, None], positions, draft_ids]  # q_j(x_j)
        seeds, steps = arrays.seeds[logit_rows], arrays.steps[logit_rows]
        uniforms = row_uniforms(seeds[:, :gamma], steps[:, :gamma], SALT_ACCEPT)
        # u < p/q without a division (q > 0 for every drawn token; p = 0 always rejects).
        accepted = (uniforms * q_draft < p_draft) & is_draft
        num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
        final_rows = logit_rows[rows, num_accepted]
        p_final = probs[final_rows]
        q_final = q_buffer[q_rows, jnp.minimum(num_accepted, gamma - 1)]
        residual = jnp.maximum(p_final - q_final, 0.0)
        # After a rejection: norm(max(0, p - q)). That is all zero only when p == q up to
        # rounding, where a rejection had probability ~0: then p itself.
        use_residual = (num_accepted < num_draft) & (jnp.sum(residual, axis=-1) > 0.0)
        weights = jnp.where(use_residual[:, None], residual, p_final)
        final_uniforms = row_uniforms(seeds[rows, num_accepted], steps[rows, num_accepted], SALT_FINAL)
        sampled = inverse_cdf(weights, final_uniforms)
        greedy_row = arrays.temperature[final_rows] < GREEDY_TEMPERATURE
        final = jnp.where(greedy_row, greedy_ids[final_rows], sampled)
    padded_drafts = jnp.concatenate([draft_ids, jnp.zeros((num_rows, 1), draft_ids.dtype)], axis=1)
    all_positions = jnp.arange(gamma + 1)[None, :]
    token_ids = jnp.where(all_positions < num_accepted[:, None], padded_drafts, final[:, None]).astype(jnp.int32)

    raw = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(raw, axis=-1)
    logprobs = raw[logit_rows, token_ids] - log_normalizer[logit_rows]
    if modes.num_logprobs > 0:
        top_raw, top_ids = largest_k(raw, modes.num_logprobs, block=64)
        top_logprobs = (top_raw - log_normalizer[:, None])[logit_rows]
        top_ids = top_ids.astype(jnp.int32)[logit_rows]
    else:
        top_ids = jnp.zeros((num_rows, gamma + 1, 0), jnp.int32)
        top_logprobs = jnp.zeros((num_rows, gamma + 1, 0), jnp.float32)
    return VerifyResult(num_accepted, token_ids, logprobs, top_ids, top_logprobs)

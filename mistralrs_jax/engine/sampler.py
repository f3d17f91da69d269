"""On-device token sampling: penalties, logit bias, temperature, top-k/top-p/min-p, logprobs.

Design rule 6: the whole sampler runs on the device, as its own jitted call right after the
model step (runner.py); only the sampled ids and their logprobs go back to the host. Rule 2: every per-request value (temperature, top-k,
seed, ...) is an array row of `SamplingArrays`; only the `SamplerModes` flags are static,
so a new request never triggers a compile.

Order of operations (vLLM's): logit bias -> repetition penalty -> frequency/presence
penalty -> (greedy rows: argmax here) -> temperature -> top-k -> top-p -> min-p -> draw.
This is vLLM v0's filter order; vLLM v1 applies min-p before top-k/top-p. The two differ
only in which mass top-p renormalizes over when min-p is also set.

Reported logprobs are vLLM's default ("raw_logprobs", also what OpenAI reports): the
log-softmax of the model's raw logits, before bias, penalties, temperature and filters.

Why the filters avoid a full sort: on XLA:CPU a sort of a 49152-wide row costs ~20 ms
(S=32: ~1 s), while the 128 largest logits cost ~0.07 ms a row (`largest_k`: the largest
block maxima first, then the top-k within those blocks). Each row's top-k/top-p
thresholds are read off its `CANDIDATES` largest logits; a row whose top-k or nucleus
does not fit inside them gets its threshold from an exact bisection over the float bit
patterns of its full row (~0.4 ms a row at V=49152, paid only by such rows: with
SmolLM2 at T=1, top_p=0.95 that is ~14% of steps, at T=0.7 under 1%). Both paths give
the same, exact thresholds. Tokens tied with a threshold are kept, so the kept set never
depends on token order.

Why an inverse-CDF draw rather than Gumbel-max: Gumbel-max needs V random numbers per row
(S=32, V=49152: ~15 ms of threefry on this CPU); the inverse CDF needs one uniform per row
and a walk down a tree of partial sums (no full-row cumsum: XLA:CPU lowers cumsum to a
slow associative scan). Probabilities below ~1e-7 (the uniform's resolution) are not
reproduced exactly, which no f32 sampler does either.

Reproducibility: each row's key is `fold_in(key(seed), step)`, and every computation is
row-local, so the same seed and step give the same token whatever else is in the batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import InvalidRequestError
from ..sampling_params import (  # noqa: F401  (resolve_seed: the one seed rule, re-exported for callers here)
    GREEDY_TEMPERATURE, MAX_LOGIT_BIAS_ENTRIES, MAX_TOP_LOGPROBS, SamplingParams, resolve_seed)
from .buckets import round_up_to_bucket

# Largest logits read for the top-k/top-p thresholds; see the module docstring.
CANDIDATES = 128
# Penalties look at the last PENALTY_WINDOW tokens of prompt+output: the `repeat_last_n`
# default of both mistral.rs and llama.cpp. Presence/frequency count the output tokens in
# that window (OpenAI and vLLM count the whole output; past 64 tokens the two differ).
PENALTY_WINDOW = 64
# Static widths, so the compiled shapes stay a small fixed set.
HISTORY_WIDTH_BUCKETS = (0, 64, 256)  # W of history_tokens: 0 when no row has penalties
BIAS_WIDTH_BUCKETS = (0, 16, 128, MAX_LOGIT_BIAS_ENTRIES)  # B of bias_token_ids
NUM_LOGPROBS_BUCKETS = (0, 1, 5, MAX_TOP_LOGPROBS)  # K of top_ids; callers slice to what was asked
# Width of the blocks of the blocked argmax, and fan-out of the inverse-CDF sum tree.
_BLOCK = 256
_FANOUT = 64
# Rows sampled together at most: S x V f32 bytes; see `sample`.
_CHUNK_BYTES = 4 << 20

_THREEFRY = "threefry2x32"  # named, so a changed default PRNG cannot change seeded outputs


@jax.tree_util.register_dataclass
@dataclass
class SamplingArrays:
    """Per-row sampling settings; every leading dim is S, the padded number of sequences."""

    temperature: np.ndarray | jax.Array  # f32[S]; < GREEDY_TEMPERATURE -> greedy row
    top_k: np.ndarray | jax.Array  # i32[S]; 0 -> off
    top_p: np.ndarray | jax.Array  # f32[S]; 1 -> off
    min_p: np.ndarray | jax.Array  # f32[S]; 0 -> off
    repetition_penalty: np.ndarray | jax.Array  # f32[S]; 1 -> off
    presence_penalty: np.ndarray | jax.Array  # f32[S]
    frequency_penalty: np.ndarray | jax.Array  # f32[S]
    seeds: np.ndarray | jax.Array  # u32[S]
    steps: np.ndarray | jax.Array  # i32[S]; tokens this request has sampled so far
    history_tokens: np.ndarray | jax.Array  # i32[S, W]; last W prompt+output ids, -1 padding
    history_is_output: np.ndarray | jax.Array  # bool[S, W]
    bias_token_ids: np.ndarray | jax.Array  # i32[S, B]; -1 padding
    bias_values: np.ndarray | jax.Array  # f32[S, B]
    # i32[S, ceil(V / 32)]: bit t of row s set -> token t allowed (a grammar constraint, see
    # mistralrs_jax/guidance.py); all ones for free rows. None: no mask input at all (another trace).
    token_bitmask: np.ndarray | jax.Array | None = None


class SamplerModes(NamedTuple):
    """Static flags: each combination is one compiled variant of `sample`."""

    all_greedy: bool  # every row is greedy: argmax only, no randomness, no filters
    use_filters: bool  # some sampled row uses top_k / top_p / min_p
    use_penalties: bool  # some row uses repetition / presence / frequency penalties
    use_bias: bool  # some row has a logit_bias
    num_logprobs: int  # K, the width of top_ids / top_logprobs (one of NUM_LOGPROBS_BUCKETS)


class SamplerOutput(NamedTuple):
    token_ids: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]: log_softmax(raw logits) at token_ids
    top_ids: jax.Array  # i32[S, K], by descending logprob
    top_logprobs: jax.Array  # f32[S, K]


# ----------------------------------------------------------------------------- device side


def sample(logits: jax.Array, arrays: SamplingArrays, modes: SamplerModes) -> SamplerOutput:
    """Sample one token per row of `logits` (f32[S, V]). Jit with `static_argnames=("modes",)`.

    Greedy rows (temperature < GREEDY_TEMPERATURE) take the argmax of the biased and
    penalized logits; the others draw from the filtered softmax(logits / temperature)
    with the row's own key. `logprobs` and `top_logprobs` are log_softmax(raw logits).
    """
    return map_row_chunks(lambda chunk_logits, chunk_arrays: _sample_rows(chunk_logits, chunk_arrays, modes),
                          logits, arrays)


def map_row_chunks(fn, logits: jax.Array, arrays: SamplingArrays):
    """`fn(logits, arrays)` over slabs of rows on CPU (rows are independent), whole elsewhere.

    On CPU a big batch is sampled a chunk of rows at a time: the sampler's [rows, V]
    temporaries then stay small enough for malloc to reuse instead of mapping fresh pages
    on every call (S=128, V=49152 in one piece: ~100 MB of temporaries, up to ~18k page
    faults a call). Accelerators have pooled allocators, and there a loop would only
    serialize kernels.
    """
    num_rows, vocab = logits.shape
    rows_per_chunk = _rows_per_chunk(num_rows, vocab) if jax.default_backend() == "cpu" else num_rows
    if rows_per_chunk == num_rows:
        return fn(logits, arrays)
    num_chunks = num_rows // rows_per_chunk
    chunked = jax.tree.map(lambda x: x.reshape(num_chunks, rows_per_chunk, *x.shape[1:]), (logits, arrays))
    output = lax.map(lambda chunk: fn(*chunk), chunked)
    return jax.tree.map(lambda x: x.reshape(num_rows, *x.shape[2:]), output)


def _rows_per_chunk(num_rows: int, vocab: int) -> int:
    """The largest divisor of num_rows whose [rows, V] f32 slab fits in _CHUNK_BYTES (at least 1)."""
    limit = max(1, _CHUNK_BYTES // (4 * vocab))
    return max(d for d in range(1, min(num_rows, limit) + 1) if num_rows % d == 0)


def _sample_rows(logits, arrays, modes):
    raw = logits.astype(jnp.float32)
    adjusted = apply_logit_adjustments(raw, arrays, modes)
    if arrays.token_bitmask is not None:
        adjusted = apply_token_bitmask(adjusted, arrays.token_bitmask)
    greedy_ids = blocked_argmax(adjusted)
    if modes.all_greedy:
        token_ids = greedy_ids
    else:
        weights = sampling_weights(adjusted, greedy_ids, arrays, modes)
        sampled_ids = inverse_cdf(weights, row_uniforms(arrays.seeds, arrays.steps))
        token_ids = jnp.where(arrays.temperature < GREEDY_TEMPERATURE, greedy_ids, sampled_ids)

    log_normalizer = jax.nn.logsumexp(raw, axis=-1)
    logprobs = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - log_normalizer
    num_rows = raw.shape[0]
    if modes.num_logprobs > 0:
        top_raw, top_ids = largest_k(raw, modes.num_logprobs, block=64)
        top_logprobs = top_raw - log_normalizer[:, None]
    else:
        top_ids = jnp.zeros((num_rows, 0), jnp.int32)
        top_logprobs = jnp.zeros((num_rows, 0), jnp.float32)
    return SamplerOutput(token_ids.astype(jnp.int32), logprobs, top_ids.astype(jnp.int32), top_logprobs)


def sampling_weights(adjusted: jax.Array, greedy_ids: jax.Array, arrays: SamplingArrays,
                     modes: SamplerModes) -> jax.Array:
    """f32[S, V]: the unnormalized distribution a sampled row draws from, p / p_max after
    temperature and the top-k / top-p / min-p filters. `adjusted` holds the biased and
    penalized logits, `greedy_ids` their argmax. Greedy rows get some row; callers ignore it."""
    greedy_row = arrays.temperature < GREEDY_TEMPERATURE
    temperature = jnp.where(greedy_row, 1.0, arrays.temperature)
    scaled = adjusted / temperature[:, None]
    row_max = jnp.max(scaled, axis=-1, keepdims=True)
    # Probabilities relative to the row's most likely token: p / p_max, unnormalized.
    relative_probs = jnp.exp(scaled - row_max)
    if not modes.use_filters:
        return relative_probs
    # Greedy rows never read their filters; clearing them spares the exact fallback.
    top_k = jnp.where(greedy_row, 0, arrays.top_k)
    top_p = jnp.where(greedy_row, 1.0, arrays.top_p)
    keep = _truncation_mask(scaled, row_max, relative_probs, top_k, top_p, arrays.min_p)
    # The most likely token always stays in play. Without this, min_p=1.0 could leave
    # nothing (XLA may round p/p_max of the max token just below 1 when it fuses the two
    # computations differently) and the draw would return id 0.
    keep = keep | (jnp.arange(keep.shape[1])[None, :] == greedy_ids[:, None])
    return jnp.where(keep, relative_probs, 0.0)


def apply_logit_adjustments(logits: jax.Array, arrays: SamplingArrays, modes: SamplerModes) -> jax.Array:
    """Logit bias, then HF/vLLM repetition penalty, then OpenAI frequency/presence penalties."""
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    if modes.use_bias and arrays.bias_token_ids.shape[1] > 0:
        # Padding (-1) becomes an out-of-range index, which mode="drop" ignores;
        # a negative index would otherwise wrap around to the end of the vocabulary.
        bias_ids = jnp.where(arrays.bias_token_ids < 0, vocab, arrays.bias_token_ids)
        logits = logits.at[rows, bias_ids].add(arrays.bias_values.astype(jnp.float32), mode="drop")
    if modes.use_penalties and arrays.history_tokens.shape[1] > 0:
        # Work on the W history positions, not on dense [S, V] count arrays: every
        # [S, V] temporary is megabytes of fresh memory per step at large S.
        tokens = arrays.history_tokens
        seen_logits = jnp.take_along_axis(logits, jnp.clip(tokens, 0, vocab - 1), axis=-1)
        # How often each history token occurs among the row's output tokens: a W x W
        # comparison, cheap for the window widths used (W <= 256).
        same_token = (tokens[:, :, None] == tokens[:, None, :]) & arrays.history_is_output[:, None, :]
        output_count = jnp.sum(same_token, axis=-1).astype(jnp.float32)
        repetition = arrays.repetition_penalty[:, None]
        penalized = jnp.where(seen_logits > 0, seen_logits / repetition, seen_logits * repetition)
        penalized = (
            penalized
            - arrays.frequency_penalty[:, None] * output_count
            - arrays.presence_penalty[:, None] * (output_count > 0).astype(jnp.float32)
        )
        # A token repeated in the history gets the same value from each position, so the
        # order the scatter writes duplicates in does not matter. Padding (-1) is dropped.
        logits = logits.at[rows, jnp.where(tokens < 0, vocab, tokens)].set(penalized, mode="drop")
    return logits


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Disallowed tokens (bit 0 in `bitmask`, i32[S, ceil(V / 32)]) get -inf. A step whose rows
    are all free (every word -1) skips the [S, V] work at run time."""
    num_rows, vocab = logits.shape

    def masked():
        bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
        allowed = bits.reshape(num_rows, -1)[:, :vocab] != 0
        return jnp.where(allowed, logits, -jnp.inf)

    return lax.cond(jnp.all(bitmask == -1), lambda: logits, masked)


def truncation_mask(
    scaled_logits: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    one_row_at_a_time: bool | None = None,
) -> jax.Array:
    """bool[S, V]: the tokens top-k, then top-p, then min-p leave in play (exact, ties kept).

    top-k keeps logits >= the k-th largest. top-p keeps the smallest set of most likely
    tokens whose mass (renormalized over the top-k set) reaches top_p. min-p keeps tokens
    with p >= min_p * p_max. `one_row_at_a_time` picks how rows whose cut lies past the
    candidates are bisected (see `_exact_threshold_for_rows`); None picks by backend.
    """
    row_max = jnp.max(scaled_logits, axis=-1, keepdims=True)
    relative_probs = jnp.exp(scaled_logits - row_max)
    return _truncation_mask(scaled_logits, row_max, relative_probs, top_k, top_p, min_p, one_row_at_a_time)


def _truncation_mask(scaled, row_max, relative_probs, top_k, top_p, min_p, one_row_at_a_time=None):
    vocab = scaled.shape[1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    top_k_on = k < vocab
    top_p_on = top_p < 1.0
    # Rows with only min-p (or nothing) skip the candidate search at run time.
    threshold = lax.cond(
        jnp.any(top_k_on | top_p_on),
        lambda: _top_k_top_p_threshold(
            scaled, row_max, relative_probs, k, top_k_on, top_p, top_p_on, one_row_at_a_time
        ),
        lambda: jnp.full(scaled.shape[:1], -jnp.inf, jnp.float32),
    )
    return (scaled >= threshold[:, None]) & (relative_probs >= min_p[:, None])


def _top_k_top_p_threshold(scaled, row_max, relative_probs, k, top_k_on, top_p, top_p_on, one_row_at_a_time):
    """f32[S]: the logit each row's top-k and top-p together cut at (tokens equal to it stay)."""
    num_rows, vocab = scaled.shape
    num_candidates = min(CANDIDATES, vocab)
    candidate_logits, _ = largest_k(scaled, num_candidates, block=16)  # descending
    k_fits = k <= num_candidates
    kth_logit = jnp.take_along_axis(candidate_logits, jnp.clip(k - 1, 0, num_candidates - 1)[:, None], axis=-1)[:, 0]
    top_k_threshold = jnp.where(top_k_on & k_fits, kth_logit, -jnp.inf)

    # Nucleus over the candidates, with the top-k mass taken over the full row (ties at
    # the k-th logit may lie outside the candidates).
    top_k_mass = jnp.sum(jnp.where(scaled >= top_k_threshold[:, None], relative_probs, 0.0), axis=-1)
    nucleus_mass = top_p * top_k_mass
    candidate_probs = jnp.exp(candidate_logits - row_max)
    candidate_probs = jnp.where(candidate_logits >= top_k_threshold[:, None], candidate_probs, 0.0)
    cumulative = _small_cumsum(candidate_probs)
    mass_before = jnp.concatenate([jnp.zeros((num_rows, 1), jnp.float32), cumulative[:, :-1]], axis=-1)
    nucleus_size = jnp.sum(mass_before < nucleus_mass[:, None], axis=-1)
    last_in_nucleus = jnp.take_along_axis(candidate_logits, jnp.maximum(nucleus_size - 1, 0)[:, None], axis=-1)[:, 0]
    top_p_threshold = jnp.where(top_p_on, last_in_nucleus, -jnp.inf)
    nucleus_fits = cumulative[:, -1] >= nucleus_mass

    needs_full_row = (top_k_on & ~k_fits) | (top_p_on & ~nucleus_fits)
    threshold = jnp.maximum(top_k_threshold, top_p_threshold)
    return _exact_threshold_for_rows(needs_full_row, scaled, relative_probs, k, top_p, threshold, one_row_at_a_time)


def _exact_threshold_for_rows(needs_full_row, scaled, relative_probs, k, top_p, threshold, one_row_at_a_time):
    """Replace the threshold of the rows the candidates miss by a bisection over the full row.

    On CPU the rows are visited one at a time, so the cost (~0.4 ms a row at V=49152) is
    paid only per row that needs it. On an accelerator a loop over rows would serialize
    ~60 tiny kernels a row, so all rows are bisected at once when any needs it.
    """
    if one_row_at_a_time is None:
        one_row_at_a_time = jax.default_backend() == "cpu"
    if scaled.shape[0] == 1:
        # Not the loop below: with one row its body is loop-invariant, and XLA hoists it out
        # of the loop, running the bisection on every call (measured: +0.45 ms a token).
        return lax.cond(
            needs_full_row[0],
            lambda: _full_row_threshold(scaled[0], relative_probs[0], k[0], top_p[0])[None],
            lambda: threshold,
        )
    if not one_row_at_a_time:
        return lax.cond(
            jnp.any(needs_full_row),
            lambda: jnp.where(
                needs_full_row, jax.vmap(_full_row_threshold)(scaled, relative_probs, k, top_p), threshold
            ),
            lambda: threshold,
        )
    order = jnp.argsort(~needs_full_row, stable=True)  # rows needing the full row first
    count = jnp.sum(needs_full_row)

    def one_row(state):
        i, threshold = state
        row = order[i]
        row_threshold = _full_row_threshold(scaled[row], relative_probs[row], k[row], top_p[row])
        return i + 1, threshold.at[row].set(row_threshold)

    _, threshold = lax.while_loop(lambda state: state[0] < count, one_row, (jnp.int32(0), threshold))
    return threshold


def _full_row_threshold(row_logits, row_probs, k, top_p):
    """The top-k/top-p logit threshold of one row, exactly, without candidates."""
    vocab = row_logits.shape[0]
    k_threshold = lax.cond(k < vocab, lambda: _kth_largest(row_logits, k), lambda: jnp.float32(-jnp.inf))
    in_top_k = jnp.where(row_logits >= k_threshold, row_probs, 0.0)

    def nucleus_logit_threshold():
        p_threshold = _nucleus_threshold(in_top_k, top_p * jnp.sum(in_top_k))
        # The smallest logit inside the nucleus is its logit-scale threshold.
        return jnp.min(jnp.where(in_top_k >= p_threshold, row_logits, jnp.inf))

    p_threshold = lax.cond(top_p < 1.0, nucleus_logit_threshold, lambda: jnp.float32(-jnp.inf))
    return jnp.maximum(k_threshold, p_threshold)


def largest_k(values, k, block):
    """lax.top_k over the last axis, exact, reading only the k blocks with the largest maxima.

    The k largest values all lie in the k blocks whose maxima are largest, so two small
    top-k's replace one over the whole row (XLA:CPU, S=32, V=49152: k=20 ~0.5 ms instead
    of ~2.6 ms; k=128 ~2.3 ms instead of ~3.6 ms).
    """
    num_rows, width = values.shape
    if width < 4 * k * block:
        return lax.top_k(values, k)
    blocks = _pad_to_blocks(values, -jnp.inf, block)
    _, best_blocks = lax.top_k(jnp.max(blocks, axis=-1), k)
    gathered = jnp.take_along_axis(blocks, best_blocks[:, :, None], axis=1).reshape(num_rows, k * block)
    top_values, positions = lax.top_k(gathered, k)
    block_of = jnp.take_along_axis(best_blocks, positions // block, axis=-1)
    return top_values, (block_of * block + positions % block).astype(jnp.int32)


def _kth_largest(values, k):
    """The k-th largest of f32[V] (with multiplicity), by bisection over order-preserving int keys."""
    bits = lax.bitcast_convert_type(values + 0.0, jnp.int32)  # + 0.0 turns -0.0 into 0.0
    keys = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order == float order
    int_min, int_max = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max

    def halve(_, bounds):
        low, high = bounds  # invariant: count(keys >= low) >= k > count(keys >= high)
        mid = (low >> 1) + (high >> 1) + (low & high & 1)
        ok = jnp.sum(keys >= mid) >= k
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

    low, _ = lax.fori_loop(0, 32, halve, (jnp.int32(int_min), jnp.int32(int_max)))
    return lax.bitcast_convert_type(jnp.where(low < 0, low ^ 0x7FFFFFFF, low), jnp.float32)


def _nucleus_threshold(probs, nucleus_mass):
    """Smallest t with sum(probs[probs > t]) < nucleus_mass, for probs >= 0.

    A token belongs to the nucleus iff the mass strictly above it is < nucleus_mass, which
    is iff its probability is >= t. Bisection over the bit patterns of non-negative floats
    (which sort like the floats) makes t exact.
    """
    bits = lax.bitcast_convert_type(probs, jnp.int32)

    def halve(_, bounds):
        low, high = bounds  # invariant: mass_above(low) >= nucleus_mass > mass_above(high)
        mid = (low + high) >> 1
        ok = jnp.sum(jnp.where(bits > mid, probs, 0.0)) < nucleus_mass
        return jnp.where(ok, low, mid), jnp.where(ok, mid, high)

    init = (jnp.int32(-1), jnp.int32(0x7F800000))  # -1: below every probability; 0x7F800000: +inf
    _, high = lax.fori_loop(0, 31, halve, init)
    return lax.bitcast_convert_type(jnp.maximum(high, 0), jnp.float32)


def row_uniforms(seeds: jax.Array, steps: jax.Array, salt: int | None = None) -> jax.Array:
    """One U[0, 1) per element of `steps` (`seeds` alike shaped), from
    ``fold_in(key(seed), step)``, folded with `salt` too when given (speculative decoding
    draws several independent uniforms per step)."""
    def one(seed, step):
        key = jax.random.fold_in(jax.random.key(seed, impl=_THREEFRY), step)
        if salt is not None:
            key = jax.random.fold_in(key, salt)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(seeds.reshape(-1), steps.reshape(-1)).reshape(steps.shape)


def _pad_to_blocks(values, fill, block=_BLOCK):
    pad = (-values.shape[1]) % block
    if pad:
        values = jnp.pad(values, ((0, 0), (0, pad)), constant_values=fill)
    return values.reshape(values.shape[0], -1, block)


def blocked_argmax(logits):
    """First index of the row maximum (XLA:CPU's variadic argmax reduce is 10-20x slower)."""
    blocks = _pad_to_blocks(logits, -jnp.inf)
    best_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    block = jnp.take_along_axis(blocks, best_block[:, None, None], axis=1)[:, 0]
    return (best_block * _BLOCK + jnp.argmax(block, axis=-1)).astype(jnp.int32)


def inverse_cdf(weights, uniforms):
    """Index i with P(i) = weights[i] / sum(weights), walking a tree of partial sums.

    Level sums with fan-out _FANOUT are built in one pass over the row; the walk then picks
    one child per level from a cumulative sum of at most _FANOUT values, so no cumulative
    sum over the whole row is needed (XLA:CPU lowers cumsum to a slow associative scan).
    """
    num_rows, vocab = weights.shape
    depth = 1
    while _FANOUT**depth < vocab:
        depth += 1
    levels = [_pad_to_blocks(weights, 0.0, _FANOUT ** (depth - 1)).reshape(num_rows, -1)]
    for _ in range(depth - 1):
        levels.append(jnp.sum(levels[-1].reshape(num_rows, -1, _FANOUT), axis=-1))
    target = uniforms * jnp.sum(levels[-1], axis=-1)
    index = jnp.zeros((num_rows,), jnp.int32)
    for depth_index, level in enumerate(reversed(levels)):
        if depth_index == 0:
            children = level  # the root's children: at most _FANOUT sums
        else:
            children = jnp.take_along_axis(level.reshape(num_rows, -1, _FANOUT), index[:, None, None], axis=1)[:, 0]
        cumulative = _small_cumsum(children)
        # The first child whose cumulative sum passes the target; clamping to the last
        # non-empty child covers a target that rounding put at or past the end, so a
        # zero-weight token is never returned.
        choice = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1), _last_nonzero_index(children))
        before = jnp.take_along_axis(cumulative, jnp.maximum(choice - 1, 0)[:, None], axis=-1)[:, 0]
        target = jnp.maximum(target - jnp.where(choice > 0, before, 0.0), 0.0)
        index = index * children.shape[1] + choice
    return index


def _small_cumsum(values):
    """Inclusive cumulative sum over a short last axis (<= a few hundred) as one masked reduce.

    Every prefix is the same reduction with later entries zeroed, so for values >= 0 the
    result is non-decreasing whatever order the reduction adds in.
    """
    width = values.shape[-1]
    lower_triangle = jnp.arange(width)[:, None] >= jnp.arange(width)[None, :]
    return jnp.sum(jnp.where(lower_triangle, values[..., None, :], 0.0), axis=-1)


def _last_nonzero_index(values):
    positions = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    return jnp.max(jnp.where(values > 0, positions, 0), axis=-1)


# ------------------------------------------------------------------------------- host side


def build_sampling_arrays(
    params_list: Sequence[SamplingParams | None],
    histories: Sequence[tuple[Sequence[int], int] | None],
    steps: Sequence[int],
    num_rows: int,
    *,
    seeds: Sequence[int] | None = None,
    vocab_size: int | None = None,
    penalty_window: int = PENALTY_WINDOW,
) -> tuple[SamplingArrays, SamplerModes]:
    """Host-side (numpy) sampling arrays for one step, plus the static modes.

    Row i < len(params_list) belongs to `params_list[i]` (None: a padding row); rows past
    the list are padding. Padding rows are greedy with no penalties. `histories[i]` is
    (all prompt+output token ids so far, number of prompt tokens); it is read only for rows
    with penalties, which see the last `penalty_window` of those tokens. `seeds[i]` is the
    stored `resolve_seed` of the row's sequence; without `seeds`, seeded requests use their
    seed and unseeded ones draw a fresh one on every call. With `vocab_size`, logit_bias
    token ids outside the vocabulary are rejected.
    """
    num_requests = len(params_list)
    if num_requests > num_rows:
        raise ValueError(f"{num_requests} requests do not fit in {num_rows} rows")
    if penalty_window > HISTORY_WIDTH_BUCKETS[-1]:
        raise ValueError(f"penalty_window {penalty_window} exceeds {HISTORY_WIDTH_BUCKETS[-1]}")

    temperature = np.zeros(num_rows, np.float32)
    top_k = np.zeros(num_rows, np.int32)
    top_p = np.ones(num_rows, np.float32)
    min_p = np.zeros(num_rows, np.float32)
    repetition_penalty = np.ones(num_rows, np.float32)
    presence_penalty = np.zeros(num_rows, np.float32)
    frequency_penalty = np.zeros(num_rows, np.float32)
    row_seeds = np.zeros(num_rows, np.uint32)
    row_steps = np.zeros(num_rows, np.int32)

    penalized_rows: list[int] = []
    biased_rows: list[int] = []
    max_logprobs = 0
    for row, params in enumerate(params_list):
        if params is None:
            continue
        greedy = params.temperature < GREEDY_TEMPERATURE
        if not greedy:
            temperature[row] = params.temperature
            top_k[row] = params.top_k if params.top_k > 0 else 0
            top_p[row] = params.top_p
            min_p[row] = params.min_p
        if params.uses_penalties:
            repetition_penalty[row] = params.repetition_penalty
            presence_penalty[row] = params.presence_penalty
            frequency_penalty[row] = params.frequency_penalty
            penalized_rows.append(row)
        if params.logit_bias:
            biased_rows.append(row)
        if params.logprobs:
            max_logprobs = max(max_logprobs, params.logprobs)
        row_seeds[row] = seeds[row] if seeds is not None else resolve_seed(params)
        row_steps[row] = steps[row]

    history_width = 0
    if penalized_rows:
        longest = max(min(len(histories[row][0]), penalty_window) for row in penalized_rows)
        history_width = round_up_to_bucket(HISTORY_WIDTH_BUCKETS, max(longest, 1), "penalty history length")
    history_tokens = np.full((num_rows, history_width), -1, np.int32)
    history_is_output = np.zeros((num_rows, history_width), np.bool_)
    for row in penalized_rows:
        token_ids, num_prompt_tokens = histories[row]
        window = min(len(token_ids), penalty_window)
        if window == 0:
            continue
        start = len(token_ids) - window
        history_tokens[row, :window] = np.asarray(token_ids[start:], np.int32)
        history_is_output[row, :window] = np.arange(start, len(token_ids)) >= num_prompt_tokens

    bias_width = 0
    if biased_rows:
        most = max(len(params_list[row].logit_bias) for row in biased_rows)
        bias_width = round_up_to_bucket(BIAS_WIDTH_BUCKETS, most, "logit_bias entries")
    bias_token_ids = np.full((num_rows, bias_width), -1, np.int32)
    bias_values = np.zeros((num_rows, bias_width), np.float32)
    for row in biased_rows:
        entries = params_list[row].logit_bias
        ids = np.fromiter((int(token) for token in entries), np.int64, len(entries))
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
            raise InvalidRequestError(
                f"logit_bias token id {bad} is not a valid token id; use ids in {limit}", param="logit_bias"
            )
        bias_token_ids[row, : ids.size] = ids
        bias_values[row, : ids.size] = np.fromiter((float(v) for v in entries.values()), np.float32, len(entries))

    sampled = temperature >= GREEDY_TEMPERATURE
    modes = SamplerModes(
        all_greedy=not bool(sampled.any()),
        use_filters=bool(np.any(sampled & ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0)))),
        use_penalties=bool(penalized_rows),
        use_bias=bool(biased_rows),
        num_logprobs=round_up_to_bucket(NUM_LOGPROBS_BUCKETS, max_logprobs, "logprobs"),
    )
    arrays = SamplingArrays(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seeds=row_seeds,
        steps=row_steps,
        history_tokens=history_tokens,
        history_is_output=history_is_output,
        bias_token_ids=bias_token_ids,
        bias_values=bias_values,
    )
    return arrays, modes

"""The on-device sampler against references: numpy argmax/softmax/sort, HF's repetition
penalty, OpenAI's presence/frequency formula, and chi-square bounds on many draws.

Compiles dominate the run time, so the tests share two batch shapes (DRAWS and BATCH rows,
VOCAB columns) and few mode combinations.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistralrs_jax.engine import sampler
from mistralrs_jax.engine.sampler import (
    CANDIDATES,
    PENALTY_WINDOW,
    SamplerModes,
    apply_logit_adjustments,
    build_sampling_arrays,
    resolve_seed,
    truncation_mask,
)
from mistralrs_jax.errors import InvalidRequestError
from mistralrs_jax.sampling_params import SamplingParams

VOCAB = 1000  # > CANDIDATES (so the full-row path can run) and not a multiple of any block
DRAWS = 3000  # rows of one request at steps 0..DRAWS-1: that many independent draws
BATCH = 64

sample_jit = jax.jit(sampler.sample, static_argnames=("modes",))
adjust_jit = jax.jit(apply_logit_adjustments, static_argnames=("modes",))
truncation_mask_jit = jax.jit(truncation_mask, static_argnames=("one_row_at_a_time",))

# Turns on every mode of the mixed BATCH tests (penalties, bias, filters, 5 logprobs).
EVERY_MODE = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.2, logit_bias={0: 1.0}, logprobs=5, seed=3)
EVERY_MODE_HISTORY = (list(range(200, 300)), 50)


def run_sampler(logits, params_list, *, steps=None, seeds=None, histories=None, num_rows=None):
    """Build the arrays as the runner does and sample once; returns (numpy output, modes)."""
    logits = np.asarray(logits, np.float32)
    count = len(params_list)
    num_rows = num_rows or logits.shape[0]
    if logits.shape[0] < num_rows:  # padding rows: arbitrary logits, greedy
        logits = np.concatenate([logits, np.zeros((num_rows - logits.shape[0], logits.shape[1]), np.float32)])
    steps = list(range(count)) if steps is None else list(steps)
    arrays, modes = build_sampling_arrays(
        params_list, histories or [None] * count, steps, num_rows, seeds=seeds, vocab_size=logits.shape[1]
    )
    output = sample_jit(jnp.asarray(logits), jax.device_put(arrays), modes)
    return jax.tree.map(np.asarray, output), modes


def pad_vocab(row):
    """A short logit row widened to VOCAB with tokens of probability zero."""
    return np.concatenate([np.asarray(row, np.float32), np.full(VOCAB - len(row), -np.inf, np.float32)])


def draws(row, params, seed=7):
    """DRAWS draws for one request: the same logits at steps 0..DRAWS-1."""
    logits = np.broadcast_to(pad_vocab(row), (DRAWS, VOCAB))
    output, _ = run_sampler(logits, [params] * DRAWS, seeds=[seed] * DRAWS)
    return output.token_ids


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def chi2_critical(df, z=3.0902):
    """The 0.999 quantile of chi-square (Wilson-Hilferty; within 0.3 of the exact value)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_frequencies_match(tokens, probs):
    """Chi-square goodness of fit; the draws are seeded, so this cannot flake."""
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(tokens, minlength=len(probs))
    assert len(counts) == len(probs) and counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    support = probs > 0
    expected = probs[support] * len(tokens)
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    critical = chi2_critical(support.sum() - 1)
    assert statistic < critical, f"chi2 {statistic:.1f} >= {critical:.1f}: counts {counts[support]} vs {expected}"


def reference_keep_mask(logits, top_k, top_p, min_p):
    """Sort-based top-k -> top-p -> min-p in float64 (vLLM's definitions; ties at a cut kept)."""
    x = np.asarray(logits, np.float64)
    descending = np.sort(x)[::-1]
    keep = np.ones(x.shape, bool)
    if 0 < top_k < x.size:
        keep &= x >= descending[top_k - 1]
    if top_p < 1.0:
        probs = np.where(keep, np.exp(x - x.max()), 0.0)
        sorted_probs = np.sort(probs)[::-1]
        mass_before = np.cumsum(sorted_probs) - sorted_probs
        nucleus_size = np.sum(mass_before < top_p * probs.sum())
        keep &= probs >= sorted_probs[nucleus_size - 1]
    if min_p > 0.0:
        keep &= np.exp(x - x.max()) >= min_p
    return keep


def reference_repetition_penalty(logits, token_ids, penalty):
    """HF RepetitionPenaltyLogitsProcessor: each distinct seen token once, by sign."""
    out = np.array(logits, np.float64)
    for token in set(token_ids):
        out[token] = out[token] * penalty if out[token] < 0 else out[token] / penalty
    return out


def reference_openai_penalties(logits, output_ids, presence, frequency):
    """OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, over output tokens."""
    counts = np.bincount(np.asarray(output_ids, np.int64), minlength=len(logits)).astype(np.float64)
    return np.asarray(logits, np.float64) - counts * frequency - (counts > 0) * presence


# ---------------------------------------------------------------------------- greedy, bias


def test_greedy_rows_are_numpy_argmax_first_index_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((BATCH, VOCAB)).astype(np.float32)
    logits[1, [17, 400, 999]] = 9.0  # tie: the first index wins, like np.argmax
    logits[2, VOCAB - 1] = 9.0  # the maximum in the padded last block
    output, modes = run_sampler(logits, [SamplingParams(temperature=0.0)] * BATCH)
    assert modes.all_greedy
    np.testing.assert_array_equal(output.token_ids, np.argmax(logits, axis=-1))
    assert output.token_ids[1] == 17

    # Greedy rows mixed with sampled, biased and penalized rows still take the argmax.
    mixed = [SamplingParams(temperature=0.0) if i % 2 == 0 else EVERY_MODE for i in range(BATCH)]
    histories = [EVERY_MODE_HISTORY if i % 2 else None for i in range(BATCH)]
    output, modes = run_sampler(logits, mixed, histories=histories)
    assert not modes.all_greedy and modes.use_filters and modes.use_penalties and modes.use_bias
    np.testing.assert_array_equal(output.token_ids[::2], np.argmax(logits[::2], axis=-1))


def test_logit_bias_plus_100_forces_and_minus_100_bans():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(50).astype(np.float32)
    row[3] = 3.0  # token 3 holds about half the mass without bias
    assert set(draws(row, SamplingParams(temperature=1.0, logit_bias={11: 100.0}))) == {11}
    banned = draws(row, SamplingParams(temperature=1.0, logit_bias={3: -100.0}))
    assert 3 not in banned and len(set(banned)) > 10
    assert 3 in draws(row, SamplingParams(temperature=1.0, logit_bias={11: 0.0}))

    greedy_rows = [
        SamplingParams(temperature=0.0, logit_bias={11: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={3: -100.0}),
    ]
    output, _ = run_sampler(np.stack([pad_vocab(row)] * 2), greedy_rows, num_rows=DRAWS)
    assert output.token_ids[:2].tolist() == [11, int(np.argsort(-row)[1])]


# ---------------------------------------------------------------------------------- filters


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((16, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    params += [SamplingParams(temperature=1.5, top_p=1e-3, seed=i) for i in range(8)]
    output, _ = run_sampler(logits, params, num_rows=DRAWS)
    np.testing.assert_array_equal(output.token_ids[:16], np.argmax(logits, axis=-1))


def test_top_k_never_samples_outside_the_top_k():
    rng = np.random.default_rng(3)
    row = rng.standard_normal(64).astype(np.float32)
    tokens = draws(row, SamplingParams(temperature=1.0, top_k=5))
    top5 = np.argsort(-row)[:5]
    assert set(tokens.tolist()) == set(top5.tolist())
    probs = np.zeros(VOCAB)
    probs[top5] = softmax(row[top5])
    assert_frequencies_match(tokens, probs)

    # A k beyond the candidate set takes the exact full-row path.
    flat = rng.uniform(0, 0.5, VOCAB).astype(np.float32)
    k = CANDIDATES + 72
    tokens = draws(flat, SamplingParams(temperature=1.0, top_k=k))
    assert set(tokens.tolist()) <= set(np.argsort(-flat)[:k].tolist())
    assert len(set(tokens.tolist())) > CANDIDATES  # the draws do reach past the candidates


@pytest.mark.parametrize(
    "vocab, one_row_at_a_time",
    [(VOCAB, True), (49152, True), (VOCAB, False)],
    ids=["cpu-path", "wide", "accelerator-path"],
)
def test_truncation_mask_matches_sort_reference(vocab, one_row_at_a_time):
    """Exact top-k/top-p/min-p sets, including rows whose cut lies past the candidates
    (bisected one row at a time as on CPU, or all rows at once as on an accelerator)."""
    rng = np.random.default_rng(4)
    rows = 24
    logits = (rng.standard_normal((rows, vocab)) * rng.choice([0.05, 1.0, 3.0], (rows, 1))).astype(np.float32)
    logits[:4] = rng.integers(0, 4, (4, vocab))  # many ties at every cut
    top_k = rng.choice([0, 1, 5, 50, CANDIDATES, CANDIDATES + 1, 700], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.1, 0.5, 0.9, 0.99], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.05, 0.5], rows).astype(np.float32)
    mask = np.asarray(truncation_mask_jit(jnp.asarray(logits), top_k, top_p, min_p, one_row_at_a_time))
    for i in range(rows):
        expected = reference_keep_mask(logits[i], top_k[i], top_p[i], min_p[i])
        assert np.array_equal(mask[i], expected), (
            f"row {i} (k={top_k[i]}, p={top_p[i]}, min_p={min_p[i]}): {mask[i].sum()} kept, expected {expected.sum()}"
        )
    assert (mask.sum(axis=1) > CANDIDATES).any()  # some cuts needed the full-row path


def test_truncation_mask_of_a_single_row_past_the_candidates():
    """A batch of one takes its own full-row path (see _exact_threshold_for_rows)."""
    flat = np.random.default_rng(14).uniform(0, 0.2, (1, VOCAB)).astype(np.float32)
    for top_k, top_p in [(0, 0.9), (CANDIDATES + 50, 1.0), (600, 0.7), (40, 0.9)]:
        args = (np.int32([top_k]), np.float32([top_p]), np.float32([0.0]))
        mask = np.asarray(truncation_mask_jit(jnp.asarray(flat), *args))
        expected = reference_keep_mask(flat[0], top_k, top_p, 0.0)
        assert np.array_equal(mask[0], expected), f"k={top_k}, p={top_p}: {mask.sum()} kept, expected {expected.sum()}"


def test_filtered_frequencies_match_the_renormalized_distribution():
    row = np.array([2.0, 1.6, 1.5, 1.2, 0.3, 0.2, 0.0, -1.0, -1.5, -3.0], np.float32)
    for params in [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.1),
    ]:
        scaled = row / params.temperature
        keep = reference_keep_mask(scaled, params.top_k, params.top_p, params.min_p)
        probs = np.zeros(VOCAB)
        probs[: len(row)] = np.where(keep, softmax(scaled), 0.0)
        assert_frequencies_match(draws(row, params, seed=11), probs / probs.sum())


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    row = np.log(np.array([0.4, 0.2, 0.15, 0.11, 0.1, 0.04], np.float32))  # p / p_max: 1 .5 .375 .275 .25 .1
    tokens = draws(row, SamplingParams(temperature=1.0, min_p=0.3, seed=5))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_nucleus_past_the_candidates_samples_the_exact_nucleus():
    flat = np.random.default_rng(12).uniform(0, 0.3, VOCAB).astype(np.float32)
    tokens = draws(flat, SamplingParams(temperature=1.0, top_p=0.5))
    nucleus = np.flatnonzero(reference_keep_mask(flat, 0, 0.5, 0.0))
    assert len(nucleus) > CANDIDATES
    assert set(tokens.tolist()) <= set(nucleus.tolist())


# -------------------------------------------------------------------------------- penalties


def test_bias_and_penalties_match_hf_and_openai_references():
    rng = np.random.default_rng(6)
    prompt_len = 70
    logits = (rng.standard_normal((BATCH, VOCAB)) * 3).astype(np.float32)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, top_k=20, presence_penalty=0.7, frequency_penalty=0.4, logprobs=5),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1),
        SamplingParams(temperature=0.0, logit_bias={5: 2.5, 7: -1.0}, repetition_penalty=1.5),
        SamplingParams(temperature=0.0),  # no penalties in a batch that has them
    ]
    histories = [(rng.integers(0, 40, prompt_len + 30).tolist(), prompt_len) for _ in range(4)]
    histories[3][0][-3:] = [5, 7, 5]  # biased tokens are also penalized: bias first, as in vLLM
    histories.append(None)
    arrays, modes = build_sampling_arrays(params, histories, [0] * 5, BATCH)
    assert modes.use_penalties and arrays.history_tokens.shape[1] == PENALTY_WINDOW
    adjusted = np.asarray(adjust_jit(jnp.asarray(logits), jax.device_put(arrays), modes))

    expected = logits.astype(np.float64)
    for row, p in enumerate(params):
        out = expected[row].copy()
        for token, bias in (p.logit_bias or {}).items():
            out[token] += bias
        if p.uses_penalties:
            tokens, num_prompt = histories[row]
            window_start = len(tokens) - PENALTY_WINDOW  # the last PENALTY_WINDOW tokens count
            out = reference_repetition_penalty(out, tokens[window_start:], p.repetition_penalty)
            output_ids = tokens[max(window_start, num_prompt) :]
            out = reference_openai_penalties(out, output_ids, p.presence_penalty, p.frequency_penalty)
        expected[row] = out
    np.testing.assert_allclose(adjusted, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(adjusted[4:], logits[4:])

    # The adjusted logits are what greedy rows take the argmax of.
    output, _ = run_sampler(logits, params, histories=histories)
    greedy = [0, 2, 3, 4]
    np.testing.assert_array_equal(output.token_ids[greedy], np.argmax(expected[greedy], axis=-1))


# ------------------------------------------------------------------------------ randomness


def test_same_seed_and_step_give_the_same_token_in_any_batch():
    rng = np.random.default_rng(8)
    requests = 24
    logits = (rng.standard_normal((requests, VOCAB)) * 0.5).astype(np.float32)  # flat: many outcomes
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i) if i % 2 else SamplingParams(temperature=1.2, seed=i)
        for i in range(requests)
    ]
    steps = rng.integers(0, 500, requests).tolist()
    seeds = [resolve_seed(p) for p in params]
    alone, modes_alone = run_sampler(logits, params, steps=steps, seeds=seeds, num_rows=DRAWS)
    assert not modes_alone.use_penalties and not modes_alone.use_bias

    # The same requests at other row positions, among other kinds of rows and padding.
    used_rows = 48
    positions = rng.permutation(used_rows)[:requests]
    batch_params = [EVERY_MODE] * used_rows
    histories = [EVERY_MODE_HISTORY] * used_rows
    batch_logits = rng.standard_normal((used_rows, VOCAB)).astype(np.float32)
    batch_steps, batch_seeds = [0] * used_rows, [resolve_seed(EVERY_MODE)] * used_rows
    for i, pos in enumerate(positions):
        batch_params[pos], histories[pos], batch_logits[pos] = params[i], None, logits[i]
        batch_steps[pos], batch_seeds[pos] = steps[i], seeds[i]
    mixed, modes_mixed = run_sampler(
        batch_logits, batch_params, steps=batch_steps, seeds=batch_seeds, histories=histories, num_rows=BATCH
    )
    assert modes_mixed.use_penalties and modes_mixed.use_bias and modes_mixed.num_logprobs == 5
    np.testing.assert_array_equal(mixed.token_ids[positions], alone.token_ids[:requests])

    # The next step of the same seed draws afresh.
    later, _ = run_sampler(logits, params, steps=[s + 1 for s in steps], seeds=seeds, num_rows=DRAWS)
    assert (later.token_ids[:requests] != alone.token_ids[:requests]).sum() >= requests // 2


def test_draws_are_independent_across_steps_and_sibling_seeds():
    """The joint frequencies of two draws are the product of their marginals: consecutive steps
    of one seed, the same step of seeds s and s + 1 (the seeds of an n > 1 request's siblings),
    and step t + 1 of seed s against step t of seed s + 1 (a key built as seed + step would
    repeat itself there). Non-overlapping pairs, so each pair is one independent observation."""
    row = np.log(np.array([0.35, 0.25, 0.2, 0.12, 0.08], np.float32))
    probs = softmax(row)
    joint = np.zeros(VOCAB)
    joint[: len(row) ** 2] = np.outer(probs, probs).reshape(-1)
    params = SamplingParams(temperature=1.0)
    first, second = draws(row, params, seed=7), draws(row, params, seed=8)
    for label, a, b in [
        ("consecutive steps", first[0::2], first[1::2]),
        ("sibling seeds, same step", first, second),
        ("seed s step t+1 vs seed s+1 step t", first[1:], second[:-1]),
    ]:
        pairs = a * len(row) + b
        try:
            assert_frequencies_match(pairs, joint)
        except AssertionError as error:
            raise AssertionError(f"{label}: draws are not independent: {error}") from None
    assert (first != second).mean() > 0.5  # and the two seeds are not the same stream


def test_different_seeds_give_different_samples():
    flat = np.zeros((DRAWS, 64), np.float32)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(DRAWS)]
    output, _ = run_sampler(np.concatenate([flat, np.full((DRAWS, VOCAB - 64), -np.inf, np.float32)], 1), params,
                            steps=[0] * DRAWS, seeds=range(DRAWS))
    probs = np.zeros(VOCAB)
    probs[:64] = 1 / 64
    assert_frequencies_match(output.token_ids, probs)


def test_resolve_seed():
    assert resolve_seed(SamplingParams(seed=42)) == 42
    assert resolve_seed(SamplingParams(seed=42), sequence_index=2) == 44  # n > 1 siblings differ
    assert 0 <= resolve_seed(SamplingParams(seed=-1)) < 2**32
    assert resolve_seed(SamplingParams(seed=2**40 + 5)) != resolve_seed(SamplingParams(seed=5))
    unseeded = {resolve_seed(SamplingParams()) for _ in range(8)}
    assert len(unseeded) > 1 and all(0 <= s < 2**32 for s in unseeded)


# -------------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_at_the_sampled_token_and_sorted_top_k():
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((BATCH, VOCAB)) * 2).astype(np.float32)
    params = [
        SamplingParams(temperature=1.0, logprobs=3, seed=1),
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={5: 30.0}),  # bias does not touch logprobs
        EVERY_MODE,
        SamplingParams(temperature=0.0),
    ]
    output, modes = run_sampler(logits, params, histories=[None, None, EVERY_MODE_HISTORY, None])
    assert modes.num_logprobs == 5 and output.top_ids.shape == (BATCH, 5)
    assert output.token_ids[1] == 5
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    rows = np.arange(BATCH)
    np.testing.assert_allclose(output.logprobs, reference[rows, output.token_ids], rtol=1e-5, atol=1e-5)
    expected_ids = np.argsort(-reference, axis=-1)[:, :5]
    np.testing.assert_array_equal(output.top_ids, expected_ids)
    np.testing.assert_allclose(output.top_logprobs, np.take_along_axis(reference, expected_ids, -1), atol=1e-5)
    assert (np.diff(output.top_logprobs, axis=-1) <= 0).all()


def test_blocked_top_k_equals_lax_top_k_on_wide_rows():
    values = jnp.asarray(np.random.default_rng(13).standard_normal((3, 49152)), jnp.float32)
    got_values, got_ids = jax.jit(lambda v: sampler.largest_k(v, 20, block=64))(values)
    want_values, want_ids = jax.lax.top_k(values, 20)
    np.testing.assert_array_equal(got_values, want_values)
    np.testing.assert_array_equal(got_ids, want_ids)


# --------------------------------------------------------------------- builder and compiles


def test_builder_pads_buckets_and_windows():
    params = [
        SamplingParams(temperature=0.5, top_k=-1, presence_penalty=0.5, logit_bias={4: 1.0, 9: -2.0, 7: 3.0}),
        None,
        SamplingParams(temperature=1e-7, top_p=0.5),  # below the greedy threshold
    ]
    tokens = list(range(100, 200))  # 100 tokens, 60 of them prompt
    arrays, modes = build_sampling_arrays(params, [(tokens, 60), None, None], [3, 0, 9], 8, seeds=[1, 2, 3])
    assert modes == SamplerModes(all_greedy=False, use_filters=False, use_penalties=True, use_bias=True, num_logprobs=0)
    assert arrays.temperature[0] == np.float32(0.5) and (arrays.temperature[1:] == 0).all()
    assert arrays.top_k[0] == 0 and arrays.top_p[2] == 1.0  # greedy rows carry no filters
    np.testing.assert_array_equal(arrays.history_tokens[0], np.arange(136, 200))  # the last 64
    np.testing.assert_array_equal(arrays.history_is_output[0], np.arange(136, 200) >= 160)
    assert (arrays.history_tokens[1:] == -1).all()
    assert arrays.bias_token_ids.shape == (8, 16) and arrays.bias_token_ids[0, :3].tolist() == [4, 9, 7]
    assert (arrays.bias_token_ids[0, 3:] == -1).all()
    assert arrays.seeds.tolist()[:3] == [1, 0, 3] and arrays.steps.tolist()[:3] == [3, 0, 9]
    assert arrays.seeds.dtype == np.uint32 and arrays.steps.dtype == np.int32

    _, modes = build_sampling_arrays([SamplingParams(temperature=0)] * 2, [None] * 2, [0, 0], 4)
    assert modes == SamplerModes(True, False, False, False, 0)
    _, modes = build_sampling_arrays([SamplingParams(temperature=1.0, logprobs=7)], [None], [0], 1)
    assert modes.num_logprobs == 20

    with pytest.raises(InvalidRequestError) as error:
        build_sampling_arrays([SamplingParams(logit_bias={50000: 1.0})], [None], [0], 1, vocab_size=49152)
    assert error.value.param == "logit_bias"
    with pytest.raises(ValueError):
        build_sampling_arrays([SamplingParams()] * 3, [None] * 3, [0] * 3, 2)


def test_new_request_values_do_not_recompile():
    """Rule 2: temperatures, top-k/p, penalties, seeds and steps are data, not constants."""

    def step(logits, arrays, modes):  # its own function, so its own compile cache
        return sampler.sample(logits, arrays, modes)

    step = jax.jit(step, static_argnames=("modes",))
    logits = jnp.asarray(np.random.default_rng(10).standard_normal((4, 500)), jnp.float32)
    history = [(list(range(30)), 10)] * 4
    first = [SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.1, seed=1)] * 4
    second = [
        SamplingParams(temperature=1.3, top_p=0.5, min_p=0.1, frequency_penalty=2.0, seed=9),
        SamplingParams(temperature=0.0, presence_penalty=1.0),
        SamplingParams(temperature=0.2, top_k=400, repetition_penalty=3.0),
        SamplingParams(temperature=2.0, top_k=1, presence_penalty=-1.0, seed=123),
    ]
    for params, steps in [(first, [0, 1, 2, 3]), (second, [7, 7, 100, 5])]:
        arrays, modes = build_sampling_arrays(params, history, steps, 4)
        jax.block_until_ready(step(logits, jax.device_put(arrays), modes))
    assert step._cache_size() == 1


def test_min_p_one_keeps_the_most_likely_token_under_jit():
    """min_p=1.0 leaves exactly the most likely token, also in the runner's jitted variant
    (a regression: rounding once let the filter drop every token and return id 0)."""
    from mistralrs_jax.engine.runner import compiled_sampler_variant

    rng = np.random.default_rng(0)
    jitted = jax.jit(sampler.sample, static_argnames=("modes",))
    for _ in range(8):
        logits = rng.standard_normal((8, 49152)).astype(np.float32) * 5
        arrays, modes = build_sampling_arrays([SamplingParams(temperature=1.5, min_p=1.0)] * 8,
                                              [([1, 2, 3], 3)] * 8, [0] * 8, num_rows=8, seeds=list(range(8)))
        arrays, modes = compiled_sampler_variant(arrays, modes)
        out = jitted(jnp.asarray(logits), arrays, modes=modes)
        np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))

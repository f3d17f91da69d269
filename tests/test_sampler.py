"""The on-device sampler against references: numpy argmax/softmax/sort, HF's repetition
penalty, OpenAI's presence/frequency formula, and chi-square bounds on many draws."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

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

sample_jit = jax.jit(sampler.sample, static_argnames=("modes",))
adjust_jit = jax.jit(apply_logit_adjustments, static_argnames=("modes",))
truncation_mask_jit = jax.jit(truncation_mask)


def run_sampler(logits, params_list, *, steps=None, seeds=None, histories=None, num_rows=None):
    """Build the arrays as the runner does and sample once; returns (output, modes)."""
    logits = np.asarray(logits, np.float32)
    count = len(params_list)
    steps = list(range(count)) if steps is None else list(steps)
    histories = histories or [None] * count
    arrays, modes = build_sampling_arrays(
        params_list, histories, steps, num_rows or logits.shape[0], seeds=seeds, vocab_size=logits.shape[1]
    )
    output = sample_jit(jnp.asarray(logits), jax.device_put(arrays), modes)
    return jax.tree.map(np.asarray, output), modes


def draws(logit_row, params, count, seed=7):
    """`count` draws for one request: the same logits at steps 0..count-1."""
    logits = np.broadcast_to(np.asarray(logit_row, np.float32), (count, len(logit_row)))
    output, _ = run_sampler(logits, [params] * count, steps=range(count), seeds=[seed] * count)
    return output.token_ids


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def assert_frequencies_match(tokens, probs):
    """Chi-square goodness of fit; the draws are deterministic, so this cannot flake."""
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(tokens, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    support = probs > 0
    expected = probs[support] * len(tokens)
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    critical = stats.chi2.ppf(0.999, df=support.sum() - 1)
    assert statistic < critical, f"chi2 {statistic:.1f} >= {critical:.1f}: counts {counts} vs expected {expected}"


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
    logits = rng.standard_normal((6, 1000)).astype(np.float32)  # 1000: not a multiple of the block
    logits[1, [17, 400, 999]] = 9.0  # tie: the first index wins, like np.argmax
    logits[2, 999] = 9.0  # the maximum in the padded last block
    output, modes = run_sampler(logits, [SamplingParams(temperature=0.0)] * 6)
    assert modes.all_greedy
    np.testing.assert_array_equal(output.token_ids, np.argmax(logits, axis=-1))
    assert output.token_ids[1] == 17

    # Greedy rows mixed with sampled rows still take the argmax.
    mixed = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=3) for i in range(6)]
    output, modes = run_sampler(logits, mixed)
    assert not modes.all_greedy
    np.testing.assert_array_equal(output.token_ids[::2], np.argmax(logits[::2], axis=-1))


def test_logit_bias_plus_100_forces_and_minus_100_bans():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(50).astype(np.float32)
    row[3] = 3.0  # token 3 holds ~half the mass without bias
    forced = SamplingParams(temperature=1.0, logit_bias={11: 100.0}, seed=1)
    banned = SamplingParams(temperature=1.0, logit_bias={3: -100.0}, seed=1)
    assert set(draws(row, forced, 300)) == {11}
    banned_draws = draws(row, banned, 300)
    assert 3 not in banned_draws and len(set(banned_draws)) > 10
    assert 3 in draws(row, SamplingParams(temperature=1.0, seed=1), 300)

    greedy_rows = [SamplingParams(temperature=0.0, logit_bias={11: 100.0}), SamplingParams(temperature=0.0, logit_bias={3: -100.0})]
    output, _ = run_sampler(np.stack([row, row]), greedy_rows)
    second_best = int(np.argsort(-row)[1])
    assert output.token_ids.tolist() == [11, second_best]


# ---------------------------------------------------------------------------------- filters


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((16, 300)).astype(np.float32)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    params += [SamplingParams(temperature=1.5, top_p=1e-3, seed=i) for i in range(8)]
    output, _ = run_sampler(logits, params)
    np.testing.assert_array_equal(output.token_ids, np.argmax(logits, axis=-1))


def test_top_k_never_samples_outside_the_top_k():
    rng = np.random.default_rng(3)
    row = rng.standard_normal(64).astype(np.float32)
    tokens = draws(row, SamplingParams(temperature=1.0, top_k=5), 2000)
    top5 = set(np.argsort(-row)[:5].tolist())
    assert set(tokens.tolist()) == top5
    probs = np.where(np.isin(np.arange(64), list(top5)), softmax(row), 0.0)
    assert_frequencies_match(tokens, probs / probs.sum())

    # A k beyond the candidate set takes the exact full-row path.
    flat = rng.uniform(0, 0.5, 1000).astype(np.float32)
    k = CANDIDATES + 72
    tokens = draws(flat, SamplingParams(temperature=1.0, top_k=k), 2000)
    assert set(tokens.tolist()) <= set(np.argsort(-flat)[:k].tolist())
    assert len(set(tokens.tolist())) > CANDIDATES  # draws do reach past the candidates


@pytest.mark.parametrize("vocab", [1000, 49152])
def test_truncation_mask_matches_sort_reference(vocab):
    """Exact top-k/top-p/min-p sets, including rows whose cut lies past the candidates."""
    rng = np.random.default_rng(4)
    rows = 24
    logits = (rng.standard_normal((rows, vocab)) * rng.choice([0.05, 1.0, 3.0], (rows, 1))).astype(np.float32)
    logits[:4] = rng.integers(0, 4, (4, vocab))  # many ties at every cut
    top_k = rng.choice([0, 1, 5, 50, CANDIDATES, CANDIDATES + 1, 700], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.1, 0.5, 0.9, 0.99], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.05, 0.5], rows).astype(np.float32)
    mask = np.asarray(truncation_mask_jit(jnp.asarray(logits), top_k, top_p, min_p))
    for i in range(rows):
        expected = reference_keep_mask(logits[i], top_k[i], top_p[i], min_p[i])
        assert np.array_equal(mask[i], expected), (
            f"row {i} (k={top_k[i]}, p={top_p[i]}, min_p={min_p[i]}): {mask[i].sum()} kept, expected {expected.sum()}"
        )
    assert (mask.sum(axis=1) > CANDIDATES).any()  # some nuclei needed the full-row path


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
        probs = np.where(keep, softmax(scaled), 0.0)
        tokens = draws(row, params, 4000, seed=11)
        assert_frequencies_match(tokens, probs / probs.sum())


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    row = np.log(np.array([0.4, 0.2, 0.15, 0.11, 0.1, 0.04], np.float32))  # ratios 1, .5, .375, .275, .25, .1
    tokens = draws(row, SamplingParams(temperature=1.0, min_p=0.3, seed=5), 2000)
    assert set(tokens.tolist()) == {0, 1, 2}


# -------------------------------------------------------------------------------- penalties


def test_penalties_match_hf_and_openai_references():
    rng = np.random.default_rng(6)
    vocab, prompt_len = 300, 70
    logits = (rng.standard_normal((4, vocab)) * 3).astype(np.float32)
    histories = [(rng.integers(0, 40, prompt_len + 30).tolist(), prompt_len) for _ in range(3)]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1),
        SamplingParams(temperature=0.0),  # no penalties in a batch that has them
    ]
    arrays, modes = build_sampling_arrays(params, histories + [None], [0] * 4, 4)
    assert modes.use_penalties and arrays.history_tokens.shape[1] == PENALTY_WINDOW
    adjusted = np.asarray(adjust_jit(jnp.asarray(logits), jax.device_put(arrays), modes))

    expected = []
    for row, p in enumerate(params):
        out = logits[row].astype(np.float64)
        if p.uses_penalties:
            tokens, num_prompt = histories[row]
            window_start = len(tokens) - PENALTY_WINDOW  # the last PENALTY_WINDOW tokens
            out = reference_repetition_penalty(out, tokens[window_start:], p.repetition_penalty)
            output_ids = tokens[max(window_start, num_prompt):]
            out = reference_openai_penalties(out, output_ids, p.presence_penalty, p.frequency_penalty)
        expected.append(out)
    np.testing.assert_allclose(adjusted, np.array(expected), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(adjusted[3], logits[3])

    # The penalized logits are what greedy rows take the argmax of.
    output, _ = run_sampler(logits, params, histories=histories + [None])
    greedy = [0, 2, 3]
    np.testing.assert_array_equal(output.token_ids[greedy], np.argmax(np.array(expected)[greedy], axis=-1))


def test_repetition_reference_agrees_with_transformers():
    """The numpy reference above against HF's own RepetitionPenaltyLogitsProcessor."""
    logits_process = pytest.importorskip(
        "transformers.generation.logits_process", reason="transformers is not installed: cannot cross-check"
    )
    import torch

    rng = np.random.default_rng(7)
    scores = (rng.standard_normal(200) * 3).astype(np.float32)
    tokens = rng.integers(0, 60, 90).tolist()
    for penalty in (0.7, 1.3):
        hf = logits_process.RepetitionPenaltyLogitsProcessor(penalty=penalty)(
            torch.tensor([tokens]), torch.tensor(scores[None])
        )[0].numpy()
        np.testing.assert_allclose(reference_repetition_penalty(scores, tokens, penalty), hf, rtol=1e-6)


# ------------------------------------------------------------------------------ randomness


def test_same_seed_and_step_give_the_same_token_in_any_batch():
    rng = np.random.default_rng(8)
    vocab = 300
    requests = 24
    logits = (rng.standard_normal((requests, vocab)) * 0.5).astype(np.float32)  # flat: many outcomes
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i) if i % 2 else SamplingParams(temperature=1.2, seed=i)
        for i in range(requests)
    ]
    steps = rng.integers(0, 500, requests).tolist()
    seeds = [resolve_seed(p) for p in params]
    alone, modes_alone = run_sampler(logits, params, steps=steps, seeds=seeds)
    assert not modes_alone.use_penalties and not modes_alone.use_bias

    # The same requests scattered among other kinds of rows, plus padding rows.
    others = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5, logit_bias={1: 5.0, 2: -3.0}, logprobs=5),
        SamplingParams(temperature=1.0, top_k=3, min_p=0.2, frequency_penalty=1.0, seed=3),
    ]
    num_rows = 64
    positions = rng.permutation(48)[:requests]
    batch_params: list = [None] * 48
    batch_logits = (rng.standard_normal((num_rows, vocab))).astype(np.float32)
    batch_steps, batch_seeds, histories = [0] * 48, [0] * 48, [None] * 48
    for i, pos in enumerate(positions):
        batch_params[pos], batch_logits[pos] = params[i], logits[i]
        batch_steps[pos], batch_seeds[pos] = steps[i], seeds[i]
    for pos in set(range(48)) - set(positions.tolist()):
        batch_params[pos] = others[pos % 2]
        batch_seeds[pos] = resolve_seed(others[pos % 2])
        histories[pos] = (rng.integers(0, vocab, 100).tolist(), 50)
    mixed, modes_mixed = run_sampler(
        batch_logits, batch_params, steps=batch_steps, seeds=batch_seeds, histories=histories, num_rows=num_rows
    )
    assert modes_mixed.use_penalties and modes_mixed.use_bias and modes_mixed.num_logprobs == 5
    np.testing.assert_array_equal(mixed.token_ids[positions], alone.token_ids)

    # Another step of the same seed draws afresh.
    later, _ = run_sampler(logits, params, steps=[s + 1 for s in steps], seeds=seeds)
    assert (later.token_ids != alone.token_ids).sum() >= requests // 2


def test_different_seeds_give_different_samples():
    flat = np.zeros(64, np.float32)
    count = 640
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(count)]
    output, _ = run_sampler(np.broadcast_to(flat, (count, 64)), params, steps=[0] * count, seeds=range(count))
    assert_frequencies_match(output.token_ids, np.full(64, 1 / 64))


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
    vocab = 20000  # wide enough for the blocked top-k path
    logits = (rng.standard_normal((4, vocab)) * 2).astype(np.float32)
    params = [
        SamplingParams(temperature=1.0, logprobs=3, seed=1),
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={5: 30.0}),  # bias does not touch logprobs
        SamplingParams(temperature=0.7, top_p=0.9, logprobs=5, seed=2, repetition_penalty=2.0),
        SamplingParams(temperature=0.0),
    ]
    output, modes = run_sampler(logits, params, histories=[None, None, ([1, 2, 3], 1), None])
    assert modes.num_logprobs == 5 and output.top_ids.shape == (4, 5)
    assert output.token_ids[1] == 5
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    rows = np.arange(4)
    np.testing.assert_allclose(output.logprobs, reference[rows, output.token_ids], rtol=1e-5, atol=1e-5)
    expected_ids = np.argsort(-reference, axis=-1)[:, :5]
    np.testing.assert_array_equal(output.top_ids, expected_ids)
    np.testing.assert_allclose(output.top_logprobs, np.take_along_axis(reference, expected_ids, -1), rtol=1e-5, atol=1e-5)
    assert (np.diff(output.top_logprobs, axis=-1) <= 0).all()


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
    assert arrays.temperature.tolist()[:1] == [0.5] and (arrays.temperature[1:] == 0).all()
    assert arrays.top_k[0] == 0 and arrays.top_p[2] == 1.0  # greedy rows carry no filters
    np.testing.assert_array_equal(arrays.history_tokens[0], np.arange(136, 200))  # the last 64
    np.testing.assert_array_equal(arrays.history_is_output[0], np.arange(136, 200) >= 160)
    assert (arrays.history_tokens[1:] == -1).all()
    assert arrays.bias_token_ids.shape == (8, 16) and arrays.bias_token_ids[0, :3].tolist() == [4, 9, 7]
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
    step = jax.jit(sampler.sample, static_argnames=("modes",))
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

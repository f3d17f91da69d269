"""The sampler's filters and penalties against code other people wrote.

- transformers' logits processors, composed in the order `generate()` applies them
  (temperature, top-k, top-p, min-p; sequence bias and the repetition penalty before them):
  the set of tokens left in play, the adjusted logits, and the frequencies of many draws.
- llama.cpp's penalties sampler (`llama_sampler_init_penalties`, through llama-cpp-python's
  C bindings): repetition, frequency and presence penalties over the last 64 tokens.
  llama.cpp counts every token in the window for all three; OpenAI (and this engine) count
  only generated tokens for frequency and presence, so a history with a prompt is compared
  with two llama.cpp passes: the repetition penalty over the window, then frequency and
  presence over its generated part.
"""
from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from peers import require_peer
from test_sampler import VOCAB, assert_frequencies_match, draws, pad_vocab, truncation_mask_jit

from mistralrs_jax.engine.sampler import PENALTY_WINDOW, apply_logit_adjustments, build_sampling_arrays
from mistralrs_jax.sampling_params import SamplingParams

adjust_jit = jax.jit(apply_logit_adjustments, static_argnames=("modes",))


def _processors():
    require_peer("torch")
    return require_peer("transformers").generation.logits_process


def transformers_warped(row: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """transformers' warpers on one row of logits: finite where a token stays in play."""
    import torch

    lp = _processors()
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(lp.MinPLogitsWarper(min_p))
    scores = torch.tensor(np.asarray(row, np.float32)[None])
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores[0].numpy()


FILTER_CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 5, 1.0, 0.0), (0.7, 40, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 0.5, 0.0), (1.0, 0, 0.99, 0.0),
    (1.0, 0, 1.0, 0.05), (0.8, 0, 1.0, 0.3), (1.0, 50, 0.9, 0.0), (1.2, 20, 0.8, 0.1), (1.0, 700, 0.95, 0.01),
    (0.5, 200, 1.0, 0.0),
]


def test_filters_keep_the_tokens_transformers_keeps():
    """truncation_mask of logits / temperature against TopK/TopP/MinPLogitsWarper, on rows of
    several spreads, including cuts past the engine's 128 candidates (its exact full-row path)."""
    rng = np.random.default_rng(40)
    checked = 0
    for scale in (0.05, 1.0, 3.0):
        for temperature, top_k, top_p, min_p in FILTER_CASES:
            row = (rng.standard_normal(VOCAB) * scale).astype(np.float32)
            expected = np.isfinite(transformers_warped(row, temperature, top_k, top_p, min_p))
            scaled = jnp.asarray(row[None] / np.float32(temperature))
            mask = np.asarray(truncation_mask_jit(scaled, np.int32([top_k]), np.float32([top_p]),
                                                  np.float32([min_p])))[0]
            assert np.array_equal(mask, expected), (
                f"scale {scale}, T={temperature} k={top_k} p={top_p} min_p={min_p}: "
                f"{mask.sum()} kept, transformers keeps {expected.sum()}")
            checked += 1
    assert checked == 3 * len(FILTER_CASES)


def test_draws_follow_transformers_filtered_distribution():
    """Many seeded draws of the engine against softmax of transformers' warped logits."""
    import torch

    row = np.array([2.0, 1.6, 1.5, 1.2, 0.3, 0.2, 0.0, -1.0, -1.5, -3.0, 0.9, 0.8], np.float32)
    for temperature, top_k, top_p, min_p in [(0.7, 0, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.3),
                                             (1.0, 6, 0.9, 0.1), (1.5, 4, 1.0, 0.0)]:
        warped = transformers_warped(pad_vocab(row), temperature, top_k, top_p, min_p)
        probs = torch.softmax(torch.tensor(warped, dtype=torch.float64), dim=-1).numpy()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        assert_frequencies_match(draws(row, params, seed=21), probs)


def _adjusted(logits: np.ndarray, params: list[SamplingParams], histories: list) -> np.ndarray:
    arrays, modes = build_sampling_arrays(params, histories, [0] * len(params), len(params))
    return np.asarray(adjust_jit(jnp.asarray(logits), jax.device_put(arrays), modes))


def test_repetition_penalty_and_bias_match_transformers():
    """logit_bias then the repetition penalty, against SequenceBias- and RepetitionPenaltyLogitsProcessor
    over the last PENALTY_WINDOW tokens (prompt and output alike, as in HF)."""
    import torch

    lp = _processors()
    rng = np.random.default_rng(41)
    logits = (rng.standard_normal((4, VOCAB)) * 3).astype(np.float32)
    histories = [(rng.integers(0, 80, 100).tolist(), 40) for _ in range(4)]
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty, logit_bias=bias) for penalty, bias in
              [(1.3, None), (0.7, None), (1.5, {5: 2.5, 7: -1.0, 900: 4.0}), (2.0, {3: -30.0})]]
    ours = _adjusted(logits, params, histories)
    for row, (p, (tokens, _)) in enumerate(zip(params, histories)):
        scores = torch.tensor(logits[row : row + 1])
        window = torch.tensor([tokens[-PENALTY_WINDOW:]])
        if p.logit_bias:
            bias = lp.SequenceBiasLogitsProcessor([[[token], value] for token, value in p.logit_bias.items()])
            scores = bias(window, scores)
        expected = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(window, scores)[0].numpy()
        np.testing.assert_allclose(ours[row], expected, rtol=1e-6, atol=1e-5, err_msg=f"row {row}")


def test_repetition_penalty_matches_transformers():
    """The engine's repetition penalty alone (both directions) against HF's processor."""
    import torch

    lp = _processors()
    rng = np.random.default_rng(42)
    logits = (rng.standard_normal((2, VOCAB)) * 3).astype(np.float32)
    tokens = rng.integers(0, 60, 64).tolist()
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty) for penalty in (0.7, 1.3)]
    ours = _adjusted(logits, params, [(tokens, 10)] * 2)
    for row, p in enumerate(params):
        processor = lp.RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty)
        expected = processor(torch.tensor([tokens]), torch.tensor(logits[row : row + 1]))[0].numpy()
        np.testing.assert_allclose(ours[row], expected, rtol=1e-6, atol=1e-5)


def llama_cpp_penalties(logits: np.ndarray, history: list[int], repeat: float, frequency: float,
                        presence: float) -> np.ndarray:
    """llama.cpp's penalties sampler over `history` (its last PENALTY_WINDOW tokens) on one row."""
    llama_cpp = require_peer("llama_cpp")
    sampler = llama_cpp.llama_sampler_init_penalties(len(logits), PENALTY_WINDOW, repeat, frequency, presence)
    try:
        for token in history:
            llama_cpp.llama_sampler_accept(sampler, token)
        count = len(logits)
        data = (llama_cpp.llama_token_data * count)(
            *[llama_cpp.llama_token_data(token, float(logit), 0.0) for token, logit in enumerate(logits)])
        candidates = llama_cpp.llama_token_data_array(data, count, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        out = np.empty(count, np.float32)
        for i in range(candidates.size):
            out[data[i].id] = data[i].logit
        return out
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_penalties_match_llama_cpp():
    rng = np.random.default_rng(43)
    cases = [  # (repetition, frequency, presence, prompt length)
        (1.0, 0.4, 0.7, 0), (1.3, 1.1, -0.5, 0), (0.8, 0.0, 1.5, 0), (1.0, 2.0, 0.0, 0),
        (1.2, 0.5, 0.5, 30), (1.0, 0.8, 0.3, 90), (1.4, 0.0, 0.0, 100),
    ]
    logits = (rng.standard_normal((len(cases), VOCAB)) * 3).astype(np.float32)
    logits[:, :5] = 0.0  # llama.cpp divides logits <= 0 by nothing: exact zeros must agree too
    histories = [(rng.integers(0, 50, 100).tolist(), prompt_len) for *_, prompt_len in cases]
    params = [SamplingParams(temperature=0.0, repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
              for r, f, p, _ in cases]
    ours = _adjusted(logits, params, histories)
    for row, ((repeat, frequency, presence, prompt_len), (tokens, _)) in enumerate(zip(cases, histories)):
        window = tokens[-PENALTY_WINDOW:]
        generated = tokens[max(len(tokens) - PENALTY_WINDOW, prompt_len):]
        if prompt_len == 0:  # every token is generated: one llama.cpp pass does all three
            expected = llama_cpp_penalties(logits[row], window, repeat, frequency, presence)
        else:
            expected = llama_cpp_penalties(logits[row], window, repeat, 0.0, 0.0)
            expected = llama_cpp_penalties(expected, generated, 1.0, frequency, presence)
        np.testing.assert_allclose(ours[row], expected, rtol=1e-6, atol=1e-5, err_msg=f"case {cases[row]}")

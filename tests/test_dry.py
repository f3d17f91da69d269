"""DRY sampling: the penalties match llama.cpp's DRY sampler (`llama_sampler_init_dry`, through
llama-cpp-python, on SmolLM2's own vocabulary), and the server applies them end to end."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from mistralrs_jax.dry import DryBreakers, dry_penalties
from mistralrs_jax.sampling_params import SamplingParams
from peers import require_peer

pytest_plugins = ["server_fixtures"]

WORDS = [" apple", " banana", " cherry", " plum", " fig", " kiwi"]


@pytest.fixture(scope="module")
def llama_vocab(smollm2_gguf_path):
    llama_cpp = require_peer("llama_cpp")
    model = llama_cpp.Llama(smollm2_gguf_path, vocab_only=True, verbose=False)
    yield llama_cpp, model, llama_cpp.llama_model_get_vocab(model.model)
    model.close()


def llama_cpp_dry(llama_cpp, vocab, logits: dict[int, float], history: list[int], multiplier: float, base: float,
                  allowed_length: int, breakers: list[str]) -> dict[int, float]:
    """llama.cpp's DRY sampler over the whole `history`, on the candidates `logits` (id -> logit)."""
    encoded = [text.encode() for text in breakers]
    array = (ctypes.c_char_p * max(1, len(encoded)))(*encoded)
    sampler = llama_cpp.llama_sampler_init_dry(vocab, multiplier, base, allowed_length, len(history), array,
                                               len(encoded))
    try:
        for token in history:
            llama_cpp.llama_sampler_accept(sampler, token)
        ids = list(logits)
        data = (llama_cpp.llama_token_data * len(ids))(
            *[llama_cpp.llama_token_data(token, logits[token], 0.0) for token in ids])
        candidates = llama_cpp.llama_token_data_array(data, len(ids), -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return {data[i].id: data[i].logit for i in range(candidates.size)}
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize("multiplier, base, allowed_length", [(0.8, 1.75, 2), (2.0, 1.5, 3), (1.0, 2.0, 1)])
def test_penalties_match_llama_cpp(llama_vocab, llm_tokenizer, multiplier, base, allowed_length):
    llama_cpp, _, vocab = llama_vocab
    words = [llm_tokenizer.encode(word, add_special_tokens=False)[0] for word in WORDS]
    newline = llm_tokenizer.encode("\n", add_special_tokens=False)[0]
    rng = np.random.default_rng(allowed_length)
    for case in range(12):
        # Repetitive histories: a few random phrases repeated with noise, sometimes split by newlines.
        phrases = [rng.choice(words, rng.integers(2, 5)).tolist() for _ in range(2)]
        history: list[int] = []
        while len(history) < 36:
            history += phrases[rng.integers(2)] if rng.random() < 0.8 else [int(rng.choice(words))]
            if case % 3 == 0 and rng.random() < 0.3:
                history.append(newline)
        breakers = ["\n"] if case % 3 == 0 else []
        logits = {token: float(value) for token, value in zip(words + [newline], rng.standard_normal(len(words) + 1))}
        expected = llama_cpp_dry(llama_cpp, vocab, logits, history, multiplier, base, allowed_length, breakers)
        params = SamplingParams(dry_multiplier=multiplier, dry_base=base, dry_allowed_length=allowed_length,
                                dry_sequence_breakers=breakers)
        penalties = DryBreakers(llm_tokenizer).penalties(params, history)
        ours = {token: logit - penalties.get(token, 0.0) for token, logit in logits.items()}
        assert ours == pytest.approx(expected, rel=1e-5, abs=1e-5), (history, penalties)


def test_breakers_stop_matches_and_are_never_penalized():
    a, b, c, stop = 10, 11, 12, 99
    assert dry_penalties([a, b, c, a, b], 1.0, 2.0, 2) == {c: 1.0}
    assert dry_penalties([a, b, c, a, b, c, a, b], 1.0, 2.0, 2) == {c: 2.0 ** 3}
    assert dry_penalties([a, b, stop, a, b], 1.0, 2.0, 2, breakers={stop}) == {}  # the follower is a breaker
    assert dry_penalties([stop, b, c, stop, b], 1.0, 2.0, 1, breakers={stop}) == {c: 1.0}  # match stops at it
    assert dry_penalties([a, b, a, b], 0.0, 2.0, 1) == {}


@pytest.fixture(scope="module")
def llm_tokenizer(smollm2_gguf_path):
    from mistralrs_jax.loading.gguf import read_gguf_metadata
    from mistralrs_jax.loading.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_gguf_path))


@pytest.mark.slow
def test_dry_breaks_a_loop_through_the_server_without_compiling(live_server):
    client = live_server.client()
    prompt = "1 2 3 1 2 3 1 2 3 1 2 3 1 2"
    before = live_server.metrics()["mistralrs_xla_compiles_total"]
    plain = client.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0)
    dry = client.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"dry_multiplier": 3.0})
    assert plain.choices[0].text.startswith(" 3 1 2 3")  # the model loops without DRY
    assert not dry.choices[0].text.startswith(" 3")  # " 3" would extend a 14-token repeat
    assert live_server.metrics()["mistralrs_xla_compiles_total"] == before

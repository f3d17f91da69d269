"""The comparisons catch the bugs they are there for: each test plants one bug in the engine
(monkeypatching the config value or the function the engine reads), runs the very comparison
another test file runs, and asserts that it fails, with the deviation printed next to the bound.

- a norm epsilon 10x off and a RoPE base at its default: test_families' logits vs transformers;
- a KV position off by one in decode steps (the position a token is rotated and attends at, and
  separately the cache slot its K/V are written to): test_decode_transformers' per-step logprobs;
- a block-scale error in Q4_1 dequantization: test_quant_formats' bit-exact check against
  llama.cpp, and test_fidelity_transformers' SmolLM2 logits vs transformers.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import test_quant_formats
from family_fixtures import build_checkpoint, load_reference, reference_logits, require_checkpoint_peers
from libggml import libggml
from peers import require_peer, transformers_logits
from test_decode_transformers import TINY_MAX_ABS_DIFF, tiny_family_deviation
from test_families import LLM_KWARGS, MAX_ABS_DIFF, SCORE_LEN, _token_ids
from test_fidelity_transformers import MAX_ABS_DIFF as SMOLLM2_MAX_ABS_DIFF

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    require_checkpoint_peers()
    root = tmp_path_factory.mktemp("mutations")
    return {name: build_checkpoint(name, root / name) for name in ("llama3", "gemma", "gemma3")}


def _mutate_config(monkeypatch, **changes_of) -> None:
    """Make the safetensors loader hand the engine a config with `changes_of[field](config)`."""
    from mistralrs_jax.loading import safetensors as safetensors_loading

    original = safetensors_loading.config_from_hf

    def mutated(*args, **kwargs):
        config = original(*args, **kwargs)
        return config.replace(**{name: change(config) for name, change in changes_of.items()})

    monkeypatch.setattr(safetensors_loading, "config_from_hf", mutated)


def _family_deviation(directory) -> float:
    """test_families' comparison: max |Δ| of the engine's scored logits against transformers'."""
    from mistralrs_jax import LLM

    score_ids = _token_ids(SCORE_LEN, seed=1)
    expected = reference_logits(load_reference(directory), score_ids)
    with LLM(model=str(directory), **LLM_KWARGS) as llm:
        return float(np.abs(llm.score(score_ids) - expected).max())


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_a_10x_norm_epsilon_fails_the_family_comparison(family, checkpoints, monkeypatch):
    _mutate_config(monkeypatch, rms_norm_eps=lambda config: config.rms_norm_eps * 10)
    deviation = _family_deviation(checkpoints[family])
    print(f"\n{family}, epsilon x10: max |Δ| {deviation:.3g} (bound {MAX_ABS_DIFF:g})")
    assert deviation > 100 * MAX_ABS_DIFF


# transformers' (and llama.cpp's) default bases; the fixtures use others (family_fixtures.py).
DEFAULT_ROPE = {"llama3": {"rope_theta": 10_000.0}, "gemma3": {"rope_theta": 1_000_000.0, "rope_local_theta": 10_000.0}}


@pytest.mark.parametrize("family", list(DEFAULT_ROPE))
def test_a_default_rope_base_fails_the_family_comparison(family, checkpoints, monkeypatch):
    defaults = DEFAULT_ROPE[family]
    _mutate_config(monkeypatch, **{key: (lambda config, value=value: value) for key, value in defaults.items()})
    deviation = _family_deviation(checkpoints[family])
    print(f"\n{family}, default RoPE base: max |Δ| {deviation:.3g} (bound {MAX_ABS_DIFF:g})")
    assert deviation > 100 * MAX_ABS_DIFF


def test_a_decode_position_off_by_one_fails_the_decode_comparison(checkpoints, monkeypatch):
    """Decode tokens (one-token runs) rotated and attended as if one position further on."""
    from mistralrs_jax.engine.runner import ModelRunner

    original = ModelRunner.build_metadata

    def shifted(self, runs, *args, **kwargs):
        input_ids, meta, logits_indices = original(self, runs, *args, **kwargs)
        decode_tokens = int(meta.num_decode_tokens)
        meta.positions[:decode_tokens] += 1
        return input_ids, meta, logits_indices

    monkeypatch.setattr(ModelRunner, "build_metadata", shifted)
    worst = tiny_family_deviation("llama3", checkpoints["llama3"])
    print(f"\nllama3, decode position + 1: max |Δ logprob| {worst['logprob']:.3g} (bound {TINY_MAX_ABS_DIFF:g})")
    assert worst["logprob"] > 100 * TINY_MAX_ABS_DIFF


def test_a_decode_kv_slot_off_by_one_fails_the_decode_comparison(checkpoints, monkeypatch):
    """Decode tokens rotated at the right position but their K/V written one slot further on (in
    the same block), so every later step reads a stale or empty slot for them."""
    from mistralrs_jax.engine.runner import ModelRunner

    original = ModelRunner.build_metadata

    def shifted(self, runs, *args, **kwargs):
        input_ids, meta, logits_indices = original(self, runs, *args, **kwargs)
        decode = meta.slot_mapping[: int(meta.num_decode_tokens)]
        in_block = decode % self.block_size
        decode += (in_block + 1) % self.block_size - in_block
        return input_ids, meta, logits_indices

    monkeypatch.setattr(ModelRunner, "build_metadata", shifted)
    worst = tiny_family_deviation("llama3", checkpoints["llama3"])
    print(f"\nllama3, decode KV slot + 1: max |Δ logprob| {worst['logprob']:.3g} (bound {TINY_MAX_ABS_DIFF:g})")
    assert worst["logprob"] > 100 * TINY_MAX_ABS_DIFF


def _scale_error_in_q4_1(monkeypatch, factor: float) -> None:
    """Q4_1 blocks dequantized with their f16 scale `d` multiplied by `factor`."""
    from mistralrs_jax.quant import formats

    fmt = formats._NATIVE["Q4_1"]

    def unpack(blocks):
        q, scale, offset = fmt.unpack(blocks)
        return q, (scale * np.float32(factor)).astype(scale.dtype), offset

    monkeypatch.setitem(formats._NATIVE, "Q4_1", dataclasses.replace(fmt, unpack=unpack))


def test_a_block_scale_error_fails_the_dequantization_check(monkeypatch):
    ggml = libggml()
    test_quant_formats.test_dequantize_matches_llama_cpp(ggml, "Q4_1")  # the check passes as is
    _scale_error_in_q4_1(monkeypatch, 1 + 2**-10)  # one part in a thousand
    with pytest.raises(AssertionError, match="not equal"):
        test_quant_formats.test_dequantize_matches_llama_cpp(ggml, "Q4_1")


def test_a_block_scale_error_fails_the_smollm2_comparison(smollm2_gguf_path, english_text, monkeypatch):
    """SmolLM2 (Q4_1 on disk) loaded with 1% too large block scales, scored on 64 tokens."""
    require_peer("transformers")
    from mistralrs_jax import LLM

    _scale_error_in_q4_1(monkeypatch, 1.01)
    with LLM(cpu_weights="f32", warmup=False, max_seqs=1, max_num_batched_tokens=64, token_buckets=[64],
             pa_ctxt_len=128, prefix_cache_n=0) as llm:
        token_ids = llm.tokenizer.encode(english_text)[:64]
        deviation = float(np.abs(llm.score(token_ids) - transformers_logits(smollm2_gguf_path, token_ids)).max())
    print(f"\nSmolLM2, Q4_1 scales x1.01: max |Δ| {deviation:.3g} (bound {SMOLLM2_MAX_ABS_DIFF:g})")
    assert deviation > 10 * SMOLLM2_MAX_ABS_DIFF

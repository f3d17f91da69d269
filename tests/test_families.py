"""Every model family against transformers: tiny random checkpoints, from safetensors and from GGUF.

For each family (tests/family_fixtures.py) transformers builds and saves a tiny random model;
the engine loads the directory (safetensors) and the GGUF that llama.cpp's own converter makes
of it, and both must give transformers' teacher-forced logits and its greedy continuation.

The sequences run past every switch the tiny configs have: sliding windows of 8 and 20 tokens,
Phi-3's LongRoPE boundary at 64 (the 80-token scoring pass and the greedy run use the long
factors, `test_phi3_short_factors` the short ones), and Gemma 3's local/global layers.
"""
from __future__ import annotations

import numpy as np
import pytest

from family_fixtures import (FAMILIES, VOCAB_SIZE, build_all_checkpoints, convert_to_gguf, load_reference,
                             reference_greedy, reference_logits, ReferenceUnavailable)
from peers import missing_peer

# Measured (JAX 0.10.2 XLA:CPU vs torch 2.13 CPU, f32, 80 tokens, logits within ±0.8..±14):
# max |Δ| 3.7e-7 .. 6.2e-6 across families and both formats: f32 summation order. The bound
# is ~16x the largest. What it must catch, measured on these fixtures with transformers
# (test_mutations.py proves the engine's comparison fails): a 10x norm epsilon moves logits by
# 0.5 .. 9, a default RoPE base by 0.05 .. 4 (the fixtures' knobs are set off their defaults
# for that, see family_fixtures.py); a wrong norm offset, bias, rope variant or window by
# whole units.
MAX_ABS_DIFF = 1e-4
SCORE_LEN = 80
NEW_TOKENS = 32
FORMATS = ("safetensors", "gguf")
# One sequence, prompts up to 128 tokens in one prefill chunk, compiled on demand (two step shapes).
LLM_KWARGS = dict(warmup=False, max_seqs=1, max_num_batched_tokens=128, token_buckets=[2, 128], pa_ctxt_len=256,
                  prefix_cache_n=0)
# One fused attn_qkv tensor instead of three; in the llama architecture its Q and K rows are permuted.
FUSED_QKV = ("llama3", "qwen2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return build_all_checkpoints(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def gguf_files(checkpoints) -> dict:
    """{family: .gguf} and {family + "-fused-qkv": .gguf} (the converter's --fuse-qkv, for FUSED_QKV)."""
    jobs = {name: (directory, directory.parent / f"{name}.gguf") for name, directory in checkpoints.items()}
    jobs.update({f"{name}-fused-qkv": (checkpoints[name], checkpoints[name].parent / f"{name}-fused-qkv.gguf",
                                       "--fuse-qkv") for name in FUSED_QKV})
    try:
        convert_to_gguf(list(jobs.values()))
    except ReferenceUnavailable as exc:
        missing_peer(f"llama.cpp's converter is unavailable (the llama-cpp-python sdist could not be fetched): {exc}")
    return {name: job[1] for name, job in jobs.items()}


def _token_ids(count: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB_SIZE, size=count).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, fmt, checkpoints, gguf_files):
    from mistralrs_jax import LLM, SamplingParams

    spec = FAMILIES[family]
    path = checkpoints[family] if fmt == "safetensors" else gguf_files[family]
    reference = load_reference(checkpoints[family], spec.gguf_reference_overrides if fmt == "gguf" else None)
    score_ids, prompt = _token_ids(SCORE_LEN, seed=1), _token_ids(spec.prompt_len, seed=2)
    expected_logits = reference_logits(reference, score_ids)
    expected_tokens = reference_greedy(reference, prompt, NEW_TOKENS)

    with LLM(model=str(path), **LLM_KWARGS) as llm:
        logits = llm.score(score_ids)
        [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    tokens = out.outputs[0].token_ids

    diff = np.abs(logits - expected_logits)
    print(f"\n{family} {fmt}: max |Δ| {diff.max():.2e}, mean |Δ| {diff.mean():.2e}, "
          f"logits within ±{np.abs(expected_logits).max():.1f}")
    assert logits.shape == expected_logits.shape
    assert diff.max() <= MAX_ABS_DIFF
    assert tokens == expected_tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", FUSED_QKV)
def test_fused_qkv_gguf_matches_transformers(family, checkpoints, gguf_files):
    from mistralrs_jax import LLM

    score_ids = _token_ids(SCORE_LEN, seed=1)
    expected = reference_logits(load_reference(checkpoints[family]), score_ids)
    with LLM(model=str(gguf_files[f"{family}-fused-qkv"]), **LLM_KWARGS) as llm:
        assert llm.model.layers[0].self_attn.qkv_proj is not None
        logits = llm.score(score_ids)
    assert np.abs(logits - expected).max() <= MAX_ABS_DIFF


@pytest.mark.slow
def test_phi3_short_factors(checkpoints):
    """Below LongRoPE's switch point the short factors apply, on both sides."""
    from mistralrs_jax import LLM

    score_ids = _token_ids(48, seed=3)
    expected = reference_logits(load_reference(checkpoints["phi3"]), score_ids)
    with LLM(model=str(checkpoints["phi3"]), **LLM_KWARGS) as llm:
        logits = llm.score(score_ids)
    assert np.abs(logits - expected).max() <= MAX_ABS_DIFF
    # And the two factor sets really differ here: the first 48 of an 80-token pass (long factors) do not match.
    long_pass = reference_logits(load_reference(checkpoints["phi3"]), score_ids + _token_ids(32, seed=4))[:48]
    assert np.abs(long_pass - expected).max() > 100 * MAX_ABS_DIFF


def _llama_cpp_tensor_names(constants, arch: str) -> set[str]:
    arch_id = next(a for a, name in constants.MODEL_ARCH_NAMES.items() if name == arch)
    return {constants.TENSOR_NAMES[t].replace("blk.{bid}.", "") for t in constants.MODEL_TENSORS[arch_id]}


def test_gguf_bindings_name_llama_cpp_tensors():
    """Every llama.cpp tensor name the GGUF bindings use exists for that architecture, in the installed
    gguf package or in the gguf-py of the llama.cpp release whose converter the tests use (newer:
    it knows the fused attn_qkv its converter writes with --fuse-qkv)."""
    import importlib.util

    import gguf

    from family_fixtures import llama_cpp_converter_dir
    from mistralrs_jax.loading.gguf_weights import GGUF_EXPERT_NAMES, GGUF_GLOBAL_BINDINGS, GGUF_LAYER_BINDINGS

    try:
        path = llama_cpp_converter_dir() / "gguf-py" / "gguf" / "constants.py"
    except ReferenceUnavailable as exc:
        missing_peer(f"the llama-cpp-python sdist could not be fetched: {exc}")
    spec = importlib.util.spec_from_file_location("llama_cpp_gguf_constants", path)
    converter_constants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter_constants)
    for arch, bindings in GGUF_LAYER_BINDINGS.items():
        known = _llama_cpp_tensor_names(gguf.constants, arch) | _llama_cpp_tensor_names(converter_constants, arch)
        used = set(bindings.values()) | {name for name in GGUF_GLOBAL_BINDINGS.values() if name != "output"}
        if arch == "llama":
            used |= set(GGUF_EXPERT_NAMES.values())
        assert used <= known, f"{arch}: {sorted(used - known)} are not llama.cpp tensor names for it"
        assert set(bindings.values()) & _llama_cpp_tensor_names(gguf.constants, arch)

"""Teacher-forced logits of the engine vs Hugging Face transformers on the same GGUF file.

Both sides dequantize the Q4_1 weights of SmolLM2-135M-Instruct to f32 (the engine with
`cpu_weights="f32"`, the `llm_f32` fixture) and run the whole sequence in f32, so the only
differences are summation order (XLA's vs torch's matmul blocking, fused vs unfused softmax)
accumulated over 30 layers. A wrong rope
layout, a missing q/k un-permutation, a bad norm epsilon or an off-by-one in the
causal mask all move logits by whole units and flip the top-1 token.
"""
from __future__ import annotations

import numpy as np
import pytest

from peers import transformers_logits

pytestmark = pytest.mark.slow

# Measured on the 2-core CI CPU (JAX 0.10.2 XLA:CPU vs torch 2.13 CPU, 385 tokens):
# max |Δ| 1.4e-4 and mean |Δ| 8.8e-6 on logits in [-38, 38] -- f32 rounding (~1e-7
# relative) grown through 30 layers. The bounds leave > 10x for other CPUs' matmul
# blocking and stay orders of magnitude below what a real bug does (a wrong rope base
# or norm epsilon moves logits by whole units). They assume f32 matmuls: a backend that
# computes f32 dots in TF32 or bf16 (GPU default precision) needs its own bounds.
MAX_ABS_DIFF = 2e-3
MEAN_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def english_ids(llm_f32, english_text) -> list[int]:
    token_ids = llm_f32.tokenizer.encode(english_text)
    assert 200 <= len(token_ids) <= 1000, f"the fixture text should be a few hundred tokens, got {len(token_ids)}"
    return token_ids


@pytest.fixture(scope="module")
def english_scores(llm_f32, english_ids) -> np.ndarray:
    return np.asarray(llm_f32.score(english_ids), dtype=np.float32)


def test_score_matches_transformers_on_english_text(llm_f32, smollm2_gguf_path, english_ids, english_scores):
    ours = english_scores
    reference = transformers_logits(smollm2_gguf_path, english_ids)
    assert ours.shape == reference.shape == (len(english_ids), llm_f32.model_config.vocab_size)
    assert np.isfinite(ours).all()

    abs_diff = np.abs(ours - reference)
    max_abs, mean_abs = float(abs_diff.max()), float(abs_diff.mean())
    top1_ours, top1_ref = ours.argmax(-1), reference.argmax(-1)
    agreement = float((top1_ours == top1_ref).mean())
    worst = np.unravel_index(abs_diff.argmax(), abs_diff.shape)
    print(
        f"\n{len(english_ids)} tokens: top-1 agreement {agreement:.2%}, "
        f"max |Δ| {max_abs:.3e} (position {worst[0]}, token {worst[1]}), mean |Δ| {mean_abs:.3e}, "
        f"logit range [{reference.min():.1f}, {reference.max():.1f}]"
    )

    disagreeing = np.flatnonzero(top1_ours != top1_ref).tolist()
    assert agreement == 1.0, f"top-1 differs from transformers at positions {disagreeing}"
    assert max_abs < MAX_ABS_DIFF
    assert mean_abs < MEAN_ABS_DIFF


def test_score_of_a_prefix_matches_the_prefix_rows(llm_f32, english_ids, english_scores):
    """Causality: the logits of a prefix do not depend on the tokens after it."""
    prefix = np.asarray(llm_f32.score(english_ids[:97]))
    np.testing.assert_allclose(prefix, english_scores[:97], atol=MAX_ABS_DIFF, rtol=0)

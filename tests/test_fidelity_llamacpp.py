"""Greedy continuations of the engine vs llama.cpp on the same GGUF file and prompt ids.

Why only the first 16 of 32 tokens must agree: llama.cpp does not compute in f32. For
Q4_1 weights its CPU kernels quantize the activations to 8 bits (q8_1 blocks) and take
integer dot products, while the engine dequantizes the weights to f32 once and runs f32
matmuls. The logits therefore differ by ~1e-2, and when two candidates are that close
the argmax flips; after one flip the continuations are different texts. Such near-ties
are rare in the first few tokens of an ordinary prompt but become likely over 32, so the
tail is reported, not asserted.
"""
from __future__ import annotations

import pytest

from mistralrs_jax import SamplingParams
from peers import llamacpp_greedy

pytestmark = pytest.mark.slow

N_GENERATED = 32
N_MUST_AGREE = 16

RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a forest,",
    "def fibonacci(n):\n    ",
    "The three primary colors are red,",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain",
]
CHAT_MESSAGES = [
    [{"role": "user", "content": "Give me three tips for sleeping better."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is photosynthesis?"},
    ],
]


def _prompt_ids(llm) -> list[tuple[str, list[int]]]:
    prompts = [(text, llm.tokenizer.encode(text)) for text in RAW_PROMPTS]
    for messages in CHAT_MESSAGES:
        chat_text = llm.apply_chat_template(messages, add_generation_prompt=True)
        assert "<|im_start|>assistant" in chat_text, "SmolLM2's template is ChatML"
        prompts.append((messages[-1]["content"], llm.tokenizer.encode(chat_text, add_special_tokens=False)))
    return prompts


def test_greedy_matches_llamacpp(llm, smollm2_gguf_path):
    prompts = _prompt_ids(llm)
    params = SamplingParams(temperature=0.0, max_tokens=N_GENERATED, ignore_eos=True)
    # One batched call: greedy output must not depend on what else is in the batch.
    outputs = llm.generate([ids for _, ids in prompts], [params] * len(prompts))

    failures = []
    for (label, prompt_ids), output in zip(prompts, outputs):
        ours = output.outputs[0].token_ids
        assert len(ours) == N_GENERATED, f"ignore_eos run of {label!r} stopped after {len(ours)} tokens"
        reference = llamacpp_greedy(smollm2_gguf_path, prompt_ids, N_GENERATED)
        first_difference = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), N_GENERATED)
        agreeing = sum(a == b for a, b in zip(ours, reference))
        print(
            f"\n{label!r}: first {first_difference} tokens identical, {agreeing}/{N_GENERATED} positions agree"
            f"\n  ours:      {llm.tokenizer.decode(ours)!r}\n  llama.cpp: {llm.tokenizer.decode(reference)!r}"
        )
        if first_difference < N_MUST_AGREE:
            failures.append(f"{label!r} diverges at token {first_difference}: {ours[:N_MUST_AGREE]} vs {reference[:N_MUST_AGREE]}")
    assert not failures, "\n".join(failures)

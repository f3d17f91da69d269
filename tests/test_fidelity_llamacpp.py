"""Greedy continuations of the engine vs llama.cpp on the same GGUF file and prompt ids.

llama.cpp does not compute in f32. For Q4_1 weights its CPU kernels quantize the
activations to 8 bits (q8_1 blocks) and take integer dot products, and its KV cache is
f16. Measured on the 385-token English fixture, llama.cpp's teacher-forced logits differ
from the f32 reference (transformers on the same file) by 0.15 on average and up to 1.5,
and its top-1 token differs at ~3% of positions. A greedy continuation therefore follows
llama.cpp exactly only until the first near-tie, and after one flip the two texts are
different texts: over 32 tokens most prompts agree throughout, some flip early.

The engine runs in two ways, and each is held to what is true of it:
- f32 weights (`--cpu-weights f32`): where a prompt diverges from llama.cpp before token
  16, the f32 reference must side with the engine and call the two candidates a near-tie
  (a gap llama.cpp's activation rounding can close).
- packed weights (the default for a quantized file): the CPU kernel quantizes activations
  exactly as llama.cpp does (tests/test_cpu_kernel.py checks it against ggml's own
  quantize_row_q8_* and vec_dot), but the other ops (attention, norms, the f16 KV cache)
  differ, so the engine carries llama.cpp-sized noise too (mean 0.17, max 1.3 against f32,
  tests/test_packed_engine.py). At a divergence either side may be right; the f32
  reference must call the two candidates a near-tie. And the packed engine must follow
  llama.cpp for at least as many prompts as the f32 engine does.
How many of 32 tokens agree is printed for every prompt.
"""
from __future__ import annotations

import pytest

from mistralrs_jax import SamplingParams
from peers import llamacpp_greedy, require_peer, transformers_logits

pytestmark = pytest.mark.slow

N_GENERATED = 32
N_MUST_AGREE = 16
# Largest f32 logit gap between the engine's token and llama.cpp's token that is accepted
# as a near-tie. The flips measured on these prompts had gaps of 0.015-0.22; llama.cpp's
# mean logit error is 0.15, so 0.5 is ~3x its typical error and still far below the gaps
# a real bug produces (several logits).
NEAR_TIE_GAP = 0.5
# 30 prompts, because agreement over 32 tokens is decided at near-ties: on the first 9 alone a
# change in f32 rounding order moved the count by 2 either way. Measured on all 30: the f32 engine
# follows llama.cpp for 16+ tokens on 13, the packed engine on 16 (XLA or CPU decode attention).
MIN_EXACT_FRACTION = 0.4

RAW_PROMPTS = [
    "Once upon a time, in a small village at the edge of a forest,",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain",
    "My favourite recipe for a rainy Sunday afternoon is",
    "The three primary colors are red,",
    "In 1969, the first humans",
    "The capital of France is",
    "The best way to learn a new language is",
    "Scientists recently discovered that",
    "To make a paper airplane, first",
    "The history of the Roman Empire",
    "A good night's sleep is important because",
    "def fibonacci(n):",
    "The weather today is",
    "Here is a list of fruits: apple,",
    "In the middle of the night, she heard",
    "The stock market",
    "Photosynthesis is the process by which",
    "My dog likes to",
    "The theory of relativity states that",
    "Once there was a robot who",
    "The most important invention of the 20th century was",
    "Dear hiring manager,",
    "The ocean covers",
    "import numpy as np\n",
    "Yesterday I went to the market and bought",
    "The sun rises in the",
    "Music can",
]
CHAT_MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
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
        label = f"chat: {messages[-1]['content']}"
        prompts.append((label, llm.tokenizer.encode(chat_text, add_special_tokens=False)))
    return prompts


def _agreement(llm, gguf_path, *, f32_engine: bool) -> tuple[int, list[str]]:
    """(prompts following llama.cpp for N_MUST_AGREE tokens, divergences the f32 reference does not explain)."""
    prompts = _prompt_ids(llm)
    params = SamplingParams(temperature=0.0, max_tokens=N_GENERATED, ignore_eos=True)
    # One batched call: the greedy output of a prompt must not depend on what else is in the batch.
    outputs = llm.generate([ids for _, ids in prompts], [params] * len(prompts))

    exact, failures = 0, []
    for (label, prompt_ids), output in zip(prompts, outputs):
        ours = output.outputs[0].token_ids
        assert len(ours) == N_GENERATED, f"ignore_eos run of {label!r} stopped after {len(ours)} tokens"
        reference = llamacpp_greedy(gguf_path, prompt_ids, N_GENERATED)
        first_difference = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), N_GENERATED)
        agreeing = sum(a == b for a, b in zip(ours, reference))
        report = (
            f"\n{label!r}: first {first_difference} tokens identical, {agreeing}/{N_GENERATED} positions agree"
            f"\n  ours:      {llm.tokenizer.decode(ours)!r}\n  llama.cpp: {llm.tokenizer.decode(reference)!r}"
        )
        if first_difference >= N_MUST_AGREE:
            exact += 1
        else:
            # Ask the f32 reference about the first token where the two part.
            context = prompt_ids + ours[:first_difference]
            f32_logits = transformers_logits(gguf_path, context)[-1]
            ours_token, llamacpp_token = ours[first_difference], reference[first_difference]
            gap = float(f32_logits[ours_token] - f32_logits[llamacpp_token])
            report += (
                f"\n  at token {first_difference}: f32 reference picks {int(f32_logits.argmax())}, "
                f"ours {ours_token}, llama.cpp {llamacpp_token}; f32 logit gap {gap:.4f}"
            )
            if f32_engine:
                explained = int(f32_logits.argmax()) == ours_token and 0.0 <= gap < NEAR_TIE_GAP
            else:
                explained = abs(gap) < NEAR_TIE_GAP
            if not explained:
                failures.append(report)
        print(report)
    return exact, failures


def test_f32_engine_greedy_matches_llamacpp(llm_f32, smollm2_gguf_path):
    require_peer("llama_cpp")
    require_peer("transformers")
    exact, failures = _agreement(llm_f32, smollm2_gguf_path, f32_engine=True)
    assert not failures, "divergences from llama.cpp not explained by its rounding:" + "".join(failures)
    assert exact >= MIN_EXACT_FRACTION * len(RAW_PROMPTS + CHAT_MESSAGES), (
        f"only {exact} prompts match llama.cpp for {N_MUST_AGREE} tokens"
    )


def test_packed_engine_greedy_matches_llamacpp_as_well_as_f32(llm, llm_f32, smollm2_gguf_path):
    require_peer("llama_cpp")
    require_peer("transformers")
    assert llm is not llm_f32, "the default engine keeps a quantized file packed"
    exact, failures = _agreement(llm, smollm2_gguf_path, f32_engine=False)
    exact_f32, _ = _agreement(llm_f32, smollm2_gguf_path, f32_engine=True)
    print(f"\nprompts following llama.cpp for {N_MUST_AGREE} tokens: packed {exact}, f32 {exact_f32}")
    assert not failures, "divergences from llama.cpp that are no near-tie in f32:" + "".join(failures)
    assert exact >= exact_f32, f"packed engine follows llama.cpp for {exact} prompts, the f32 engine for {exact_f32}"

"""Speculative decoding with a draft model (engine/speculative.py).

References nobody here wrote: transformers runs the tiny random checkpoints (greedy argmax
along the engine's own tokens, and the exact sampling distribution through its own logits
processors), and the plain (non-speculative) engine is the reference for the text-level
behaviour speculation must not change (stop strings, EOS, max_tokens, logprobs).

Models: a tiny random llama (family_fixtures, vocab 128) as target; as draft either the
target itself (acceptance ~100%, so accepted runs are long) or a copy with every tensor
perturbed by 0.2 of its std (acceptance ~50%: both the accept and the reject paths run);
and the real SmolLM2 with itself as draft.

Greedy tolerance: a verification step runs k + 1 tokens through the prefill path of
attention, a plain decode step one token through the decode path; the two round
differently (~1e-5 in f32). A token is therefore accepted as correct when it is the
reference's argmax or within NEAR_TIE of it (as in test_batching.py).
"""
from __future__ import annotations

import json
import random
import shlex
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import assert_all_blocks_free, wait_for_idle
from family_fixtures import build_checkpoint, load_reference, reference_logits
from mistralrs_jax import LLM, SamplingParams
from mistralrs_jax.errors import ModelLoadError

pytestmark = pytest.mark.slow

NEAR_TIE = 1e-3  # logits
DRAFT_NOISE = 0.2  # perturbation of the noisy draft, in units of each tensor's std
TINY = dict(max_seqs=32, max_num_batched_tokens=128, token_buckets=[8, 32])
SMALL_POOL_TOKENS = 640  # 40 blocks: the abort test's 12 requests need ~60, so some are preempted


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=kwargs.pop("ignore_eos", True), **kwargs)


def assert_greedy_trajectory(logits: np.ndarray, prompt: list[int], output: list[int],
                             near_tie: float = NEAR_TIE) -> None:
    """Every output token is the argmax (or a near-tie of it) of the reference logits given
    the tokens before it. `logits` are teacher-forced over prompt + output."""
    for i, token in enumerate(output):
        row = logits[len(prompt) - 1 + i]
        assert row.max() - row[token] < near_tie, (
            f"output token {i} is {token}, but the reference's argmax is {row.argmax()} "
            f"({row.max() - row[token]:.3g} above it): not a rounding near-tie")


def spec_metrics(llm: LLM) -> dict:
    return {k: v for k, v in llm.metrics().items() if k.startswith("spec_")}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("speculative")
    target = build_checkpoint("llama3", root / "target", seed=0)
    noisy = root / "noisy"
    shutil.copytree(target, noisy, ignore=shutil.ignore_patterns("*.safetensors"))
    rng = np.random.default_rng(1)
    for shard in target.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({name: w + DRAFT_NOISE * w.std() * rng.standard_normal(w.shape).astype(w.dtype)
                   for name, w in tensors.items()}, noisy / shard.name, metadata={"format": "pt"})
    return {"target": target, "noisy": noisy}


@pytest.fixture(scope="module")
def reference(checkpoints):
    return load_reference(checkpoints["target"])


@pytest.fixture(scope="module")
def noisy_spec(checkpoints):
    """Target + the perturbed draft, gamma 3, a pool small enough to force preemptions."""
    llm = LLM(str(checkpoints["target"]), draft_model=str(checkpoints["noisy"]), speculative_gamma=3,
              pa_ctxt_len=SMALL_POOL_TOKENS, **TINY)
    try:
        yield llm
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def self_spec(checkpoints):
    """The target as its own draft, gamma 4: long accepted runs."""
    llm = LLM(str(checkpoints["target"]), draft_model=str(checkpoints["target"]), speculative_gamma=4,
              pa_ctxt_len=4096, **TINY)
    try:
        yield llm
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def plain(checkpoints):
    llm = LLM(str(checkpoints["target"]), pa_ctxt_len=4096, **TINY)
    try:
        yield llm
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def text_ids(plain, english_text) -> list[int]:
    return plain.tokenizer.encode(english_text, add_special_tokens=False)


# --------------------------------------------------------------------------- (a) greedy


def test_greedy_with_a_different_draft_is_the_targets_greedy_output(noisy_spec, reference, text_ids):
    # Half the prompts share a two-block prefix, cached by the first request: both models'
    # KV in shared blocks must be right.
    shared = [1] + text_ids[100:133]
    prompts = [shared + text_ids[9 * i:9 * i + 1 + 3 * i] if i % 2 == 0 else [1] + text_ids[9 * i:9 * i + 4 + 6 * i]
               for i in range(9)]
    outputs = noisy_spec.generate(prompts[:1], greedy(40))
    hits = noisy_spec.metrics()["prefix_cache_hits"]
    before = spec_metrics(noisy_spec)
    outputs += noisy_spec.generate(prompts[1:], greedy(40))
    after = spec_metrics(noisy_spec)
    assert noisy_spec.metrics()["prefix_cache_hits"] - hits >= 4 * 32
    for prompt, out in zip(prompts, outputs):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 40 and out.outputs[0].finish_reason == "length"
        assert_greedy_trajectory(reference_logits(reference, prompt + tokens), prompt, tokens)
    proposed = after["spec_draft_tokens_total"] - before["spec_draft_tokens_total"]
    accepted = after["spec_accepted_tokens_total"] - before["spec_accepted_tokens_total"]
    print(f"\nnoisy draft, greedy: {accepted}/{proposed} draft tokens accepted")
    assert 0.1 < accepted / proposed < 0.9  # both the accept and the reject paths ran
    assert_all_blocks_free(noisy_spec)


# The packed engine (8-bit activations, as llama.cpp) is path-sensitive: the same query
# through a different attention path (the CPU decode kernel for one-token decodes, the XLA
# prefill path for a verification step's rows and for score()) sums in another f32 order,
# which can flip an activation's 8-bit rounding. Measured on these prompts: a generated
# token sat at most 0.119 logits below score()'s argmax (5 of 96 tokens; the draft's
# acceptance 0.880). The f32 engine has no such step: its paths agree to ~1e-6.
PACKED_NEAR_TIE = 0.25
SELF_DRAFT = {"f32": (NEAR_TIE, 0.95), "quantized": (PACKED_NEAR_TIE, 0.8)}  # (near-tie, acceptance floor)


@pytest.mark.parametrize("cpu_weights", sorted(SELF_DRAFT))
def test_greedy_smollm2_with_itself_as_draft(smollm2_gguf_path, english_text, cpu_weights):
    near_tie, acceptance_floor = SELF_DRAFT[cpu_weights]
    llm = LLM(smollm2_gguf_path, draft_model=smollm2_gguf_path, speculative_gamma=4, max_seqs=4,
              max_num_batched_tokens=64, token_buckets=[8, 32], pa_ctxt_len=2048, cpu_weights=cpu_weights)
    try:
        ids = llm.tokenizer.encode(english_text, add_special_tokens=False)
        prompts = [ids[40 * i:40 * i + 10 + 7 * i] for i in range(4)]
        compiles = llm.metrics()["compiles"]
        outputs = llm.generate(prompts, greedy(24))
        assert llm.metrics()["compiles"] == compiles  # (score() below compiles its own shapes)
        for prompt, out in zip(prompts, outputs):
            tokens = out.outputs[0].token_ids
            assert len(tokens) == 24
            assert_greedy_trajectory(llm.score(prompt + tokens), prompt, tokens, near_tie)
        metrics = spec_metrics(llm)
        print(f"\nSmolLM2 ({cpu_weights}) drafting for itself: acceptance {metrics['spec_acceptance_rate']:.3f}, "
              f"{metrics['spec_tokens_per_step']:.2f} tokens per speculative step")
        assert metrics["spec_acceptance_rate"] > acceptance_floor
        assert_all_blocks_free(llm)
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------- (b) distribution

# Sampling settings of the distribution test: every filter, a penalty below 1 (it favours
# repeats, so tokens repeated *within* an accepted run carry real mass and a penalty
# history that forgot the draft tokens would show) and a logit bias.
SAMPLED = dict(temperature=0.9, top_k=3, top_p=0.95, min_p=0.05, repetition_penalty=0.6, logit_bias={17: 1.0})
DISTRIBUTION_PROMPT = [1, 86, 45, 74, 21, 110, 59]
NUM_SAMPLES = 4096
NUM_TOKENS = 4  # token 1 comes from the prefill step, 2-3 from draft positions 0-1, 4 as the bonus (gamma >= 2)


def exact_joint_distribution(model, prompt: list[int], num_tokens: int) -> dict[tuple[int, ...], float]:
    """P(y1..yn) under the target with SAMPLED applied by transformers' own processors, in the
    sampler's documented order: bias, repetition penalty, temperature, top-k, top-p, min-p."""
    import torch
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              SequenceBiasLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    processors = LogitsProcessorList([
        SequenceBiasLogitsProcessor({(token,): bias for token, bias in SAMPLED["logit_bias"].items()}),
        RepetitionPenaltyLogitsProcessor(SAMPLED["repetition_penalty"]),
        TemperatureLogitsWarper(SAMPLED["temperature"]), TopKLogitsWarper(SAMPLED["top_k"]),
        TopPLogitsWarper(SAMPLED["top_p"]), MinPLogitsWarper(SAMPLED["min_p"])])
    joint = {(): 1.0}
    for depth in range(num_tokens):
        prefixes = [key for key in joint if len(key) == depth]
        ids = torch.tensor([prompt + list(key) for key in prefixes])
        with torch.inference_mode():
            logits = model(ids).logits[:, -1].float()
        probs = torch.softmax(processors(ids, logits), dim=-1).numpy()
        for key, row in zip(prefixes, probs):
            for token in np.nonzero(row)[0]:
                joint[key + (int(token),)] = joint[key] * float(row[token])
    return {key: p for key, p in joint.items() if len(key) == num_tokens}


def test_speculative_sampling_preserves_the_target_distribution(noisy_spec, reference):
    """Many seeded requests: the joint distribution of their first 4 tokens against the exact
    one. During development each of these broke the test (chi-square p < 1e-150 or tokens
    outside the target's support): accepting every draft token, accepting with u < p instead
    of u < p/q, drawing the replacement from p instead of norm(max(0, p - q)), and a penalty
    history without the earlier draft tokens."""
    from scipy import stats

    joint = exact_joint_distribution(reference, DISTRIBUTION_PROMPT, NUM_TOKENS)
    before = spec_metrics(noisy_spec)
    params = [SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True, seed=i, **SAMPLED) for i in range(NUM_SAMPLES)]
    outputs = noisy_spec.generate([DISTRIBUTION_PROMPT] * NUM_SAMPLES, params)
    after = spec_metrics(noisy_spec)
    counts: dict[tuple[int, ...], int] = {}
    for out in outputs:
        key = tuple(out.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    impossible = {key: n for key, n in counts.items() if key not in joint}
    assert not impossible, f"outputs the target can never produce under these settings: {impossible}"

    likely = [key for key in joint if joint[key] * NUM_SAMPLES >= 5]
    rare = [key for key in joint if joint[key] * NUM_SAMPLES < 5]  # pooled into one cell
    observed = [counts.get(key, 0) for key in likely] + ([sum(counts.get(key, 0) for key in rare)] if rare else [])
    expected = np.array([joint[key] for key in likely] + ([sum(joint[key] for key in rare)] if rare else []))
    expected *= NUM_SAMPLES / expected.sum()
    chi2, p_value = stats.chisquare(observed, expected)
    total_variation = 0.5 * sum(abs(counts.get(key, 0) / NUM_SAMPLES - p) for key, p in joint.items())
    proposed = after["spec_draft_tokens_total"] - before["spec_draft_tokens_total"]
    accepted = after["spec_accepted_tokens_total"] - before["spec_accepted_tokens_total"]
    print(f"\n{len(joint)} outcomes, {len(observed)} cells: chi2 {chi2:.1f}, p {p_value:.3f}, TV {total_variation:.4f}; "
          f"{accepted}/{proposed} draft tokens accepted")
    assert 0.1 < accepted / proposed < 0.9
    assert p_value > 1e-3
    assert total_variation < 0.06  # sampling noise here is ~0.03; the broken rules gave 0.19-0.34


def test_a_second_verification_step_continues_where_the_first_left_off(self_spec, plain, reference, text_ids):
    """With the target as its own draft (p == q up to rounding) every draft is accepted, so a
    10-token request takes exactly two verification steps of 4 drafts + 1: the first leaves the
    draft's KV one token behind (its last draft was never fed to it), the second must catch up
    (draft pass 1 runs two tokens) and verify with the right penalty history, seeds and output
    indices. Any slip there shows up as a rejection, a third step, or a token the target's
    filters exclude."""
    prompt = [1] + text_ids[60:71]
    cases = {
        "greedy": greedy(10),
        "sampled": SamplingParams(temperature=0.9, top_k=3, max_tokens=10, ignore_eos=True, seed=11),
        "penalized": SamplingParams(temperature=0.9, top_k=3, repetition_penalty=0.6, max_tokens=10,
                                    ignore_eos=True, seed=12),
    }
    for name, params in cases.items():
        before = self_spec.metrics()
        out = self_spec.generate([prompt], params)[0].outputs[0]
        after = self_spec.metrics()
        tokens = out.token_ids
        assert len(tokens) == 10 and out.finish_reason == "length", name
        assert after["steps_total"] - before["steps_total"] == 2, name
        assert after["spec_draft_tokens_total"] - before["spec_draft_tokens_total"] == 8, name
        assert after["spec_accepted_tokens_total"] - before["spec_accepted_tokens_total"] == 8, name
        logits = reference_logits(reference, prompt + tokens)
        if name == "greedy":
            assert tokens == plain.generate([prompt], params)[0].outputs[0].token_ids
            assert_greedy_trajectory(logits, prompt, tokens)
        elif name == "sampled":  # every token inside the target's top 3 at its position
            for i, token in enumerate(tokens):
                row = logits[len(prompt) - 1 + i]
                assert (row > row[token]).sum() < 3, f"{name}: token {i} is outside the top 3"
    assert_all_blocks_free(self_spec)


# --------------------------------------------------------------------------- (c) stops, aborts


def test_stops_inside_an_accepted_run_match_the_plain_engine(self_spec, plain, reference, text_ids):
    """With the target as its own draft every run is accepted in full (up to 4 drafts + 1), so
    the stop conditions below fall inside runs. max_tokens never cuts a run: the lookahead is
    capped so a step cannot pass max_tokens."""
    prompt = [1] + text_ids[30:42]
    full = plain.generate([prompt], greedy(24))[0].outputs[0]
    assert_greedy_trajectory(reference_logits(reference, prompt + full.token_ids), prompt, full.token_ids)
    tokens = full.token_ids

    first_new = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    stop_text = plain.tokenizer.decode(tokens[3:6]).strip()
    assert stop_text and full.text.find(stop_text) > 0
    # A logit bias that makes EOS the argmax first at a position inside a run.
    logits = plain.score(prompt + tokens)[len(prompt) - 1:]
    eos = 2
    margins = logits.max(axis=1) - logits[:, eos]
    eos_at = next(i for i in range(2, 12) if margins[i] < margins[:i].min())
    bias = float(margins[eos_at] + min(margins[:eos_at].min() - margins[eos_at], 1.0) / 2)
    cases = {
        "max_tokens": greedy(7),
        "stop_token_ids": greedy(24, stop_token_ids=[tokens[first_new]]),
        "stop_string": greedy(24, stop=[stop_text]),
        "stop_string_kept": greedy(24, stop=[stop_text], include_stop_str_in_output=True),
        "eos": greedy(24, ignore_eos=False, logit_bias={eos: bias}),
        "logprobs": greedy(12, logprobs=3),
    }
    expected = {name: out.outputs[0] for name, out in zip(cases, plain.generate([prompt] * len(cases),
                                                                                  list(cases.values())))}
    before = spec_metrics(self_spec)
    got = {name: out.outputs[0] for name, out in zip(cases, self_spec.generate([prompt] * len(cases),
                                                                                 list(cases.values())))}
    assert expected["max_tokens"].token_ids == tokens[:7] and expected["max_tokens"].finish_reason == "length"
    assert expected["stop_token_ids"].token_ids == tokens[:first_new + 1]
    assert expected["eos"].token_ids == tokens[:eos_at] + [eos] and expected["eos"].finish_reason == "stop"
    for name in cases:
        want, have = expected[name], got[name]
        assert (have.token_ids, have.text, have.finish_reason, have.stop_reason) == \
               (want.token_ids, want.text, want.finish_reason, want.stop_reason), name
    for want, have in zip(expected["logprobs"].logprobs, got["logprobs"].logprobs):
        assert list(have) == list(want)  # the same tokens, top ids in the same order
        for token, entry in want.items():
            assert abs(have[token].logprob - entry.logprob) < 1e-4
    after = spec_metrics(self_spec)
    assert after["spec_accepted_tokens_total"] - before["spec_accepted_tokens_total"] >= \
        0.95 * (after["spec_draft_tokens_total"] - before["spec_draft_tokens_total"])
    assert_all_blocks_free(self_spec)


def test_aborts_and_preemptions_lose_nothing_and_free_every_block(noisy_spec, reference, text_ids):
    rng = random.Random(5)
    prompts = [[1] + text_ids[11 * i:11 * i + 20 + 2 * i] for i in range(12)]
    max_tokens = 48
    before = noisy_spec.metrics()
    handles = [noisy_spec.engine.add_request(prompt, greedy(max_tokens)) for prompt in prompts]
    doomed = {handles[i].request_id for i in rng.sample(range(len(handles)), 3)}
    abort_steps = sorted(before["steps_total"] + rng.randrange(2, 30) for _ in doomed)

    def abort_later():
        for request_id, at_step in zip(sorted(doomed), abort_steps):
            while noisy_spec.metrics()["steps_total"] < at_step and not all(h.finished for h in handles):
                time.sleep(0.005)
            noisy_spec.engine.abort(request_id)

    streamed: dict[str, list[int]] = {}

    def consume(handle):
        streamed[handle.request_id] = [token for delta in handle for token in delta.token_ids]

    threads = [threading.Thread(target=abort_later)] + [threading.Thread(target=consume, args=(h,)) for h in handles]
    for thread in threads:
        thread.start()
    outputs = [handle.result(timeout=300).outputs[0] for handle in handles]
    for thread in threads:
        thread.join(timeout=30)
    after = wait_for_idle(noisy_spec)

    num_aborted = 0
    for handle, out, prompt in zip(handles, outputs, prompts):
        assert streamed[handle.request_id] == out.token_ids  # nothing duplicated or dropped on the way
        if out.finish_reason == "abort":
            assert handle.request_id in doomed and len(out.token_ids) < max_tokens
            num_aborted += 1
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == max_tokens
        assert_greedy_trajectory(reference_logits(reference, prompt + out.token_ids), prompt, out.token_ids)
    print(f"\n{num_aborted} aborted, {after['num_preempted'] - before['num_preempted']} preemptions")
    assert num_aborted >= 1
    assert after["num_preempted"] > before["num_preempted"]  # the small pool forced recomputes
    assert after["kv_blocks_used"] == 0 and after["kv_blocks_free"] == after["kv_blocks_total"]


def test_no_paged_attn_slots_serve_speculation(checkpoints, reference, text_ids):
    llm = LLM(str(checkpoints["target"]), draft_model=str(checkpoints["noisy"]), speculative_gamma=3,
              no_paged_attn=True, max_seqs=4, max_model_len=64, token_buckets=[8], max_num_batched_tokens=32)
    try:
        prompts = [[1] + text_ids[5 * i:5 * i + 6 + 4 * i] for i in range(4)]
        outputs = llm.generate(prompts, greedy(64))  # more than the 64-token slots hold
        for prompt, out in zip(prompts, outputs):
            tokens = out.outputs[0].token_ids
            assert out.outputs[0].finish_reason == "length" and len(prompt) + len(tokens) == 64
            assert_greedy_trajectory(reference_logits(reference, prompt + tokens), prompt, tokens)
        assert_all_blocks_free(llm)
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------- (d) compiles


def test_no_compiles_after_warm_up_under_a_random_workload(noisy_spec, text_ids):
    rng = random.Random(17)
    stops = ["the", ".", "e", "zz"]

    def random_params() -> SamplingParams:
        kwargs = dict(max_tokens=rng.randrange(1, 12), seed=rng.choice([None, rng.randrange(2**40)]),
                      ignore_eos=rng.random() < 0.5, n=rng.choice([1, 1, 2]))
        if rng.random() < 0.3:
            kwargs["temperature"] = 0.0
        else:
            kwargs.update(temperature=rng.choice([0.3, 1.0, 1.5]), top_p=rng.choice([1.0, 0.8]),
                          top_k=rng.choice([0, 1, 5]), min_p=rng.choice([0.0, 0.1]))
        if rng.random() < 0.3:
            kwargs.update(repetition_penalty=rng.choice([1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.5]),
                          frequency_penalty=rng.choice([0.0, -0.4]))
        if rng.random() < 0.3:
            kwargs["logit_bias"] = {rng.randrange(128): rng.uniform(-5, 5) for _ in range(rng.choice([1, 20]))}
        if rng.random() < 0.3:
            kwargs["logprobs"] = rng.choice([0, 2, 20])
        if rng.random() < 0.3:
            kwargs["stop"] = rng.sample(stops, rng.randrange(1, 3))
        return SamplingParams(**kwargs)

    compiles = noisy_spec.metrics()["compiles"]
    finished = 0
    for batch_size in (1, 5, 32, 3, 40):
        prompts = []
        for _ in range(batch_size):
            start = rng.randrange(len(text_ids) - 1)
            prompts.append([1] + text_ids[start:start + rng.randrange(1, 120)])
        params = [random_params() for _ in prompts]
        for request, p in zip(noisy_spec.generate(prompts, params), params):
            assert len(request.outputs) == p.n
            for out in request.outputs:
                assert out.finish_reason in ("stop", "length") and 1 <= len(out.token_ids) <= p.max_tokens
                if p.logprobs is not None:
                    assert len(out.logprobs) == len(out.token_ids)
                finished += 1
    assert noisy_spec.metrics()["compiles"] == compiles, "a request compiled a new XLA program after warm-up"
    assert finished >= 80
    assert_all_blocks_free(noisy_spec)


# --------------------------------------------------------------------------- wiring


def test_draft_with_another_vocabulary_is_refused(checkpoints, tmp_path):
    other_size = build_checkpoint("llama3", tmp_path / "wider", seed=2, vocab_size=160)
    with pytest.raises(ModelLoadError, match="160 token ids but the target has 128"):
        LLM(str(checkpoints["target"]), draft_model=str(other_size), warmup=False)
    renamed = tmp_path / "renamed"
    shutil.copytree(checkpoints["target"], renamed)
    tokenizer_json = renamed / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]  # a unigram model: [piece, score] pairs
    index = next(i for i, (piece, _) in enumerate(vocab) if piece == "and")
    vocab[index][0] = "and!"
    tokenizer_json.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="different vocabulary"):
        LLM(str(checkpoints["target"]), draft_model=str(renamed), warmup=False)


def test_speculative_metrics_reach_prometheus(noisy_spec):
    from server.prometheus import EngineCollector, make_registry, render

    noisy_spec.generate([[1, 5, 6, 7]], greedy(8))
    metrics = noisy_spec.metrics()
    assert metrics["spec_gamma"] == 3 and metrics["spec_draft_tokens_total"] > 0
    assert metrics["spec_acceptance_rate"] == metrics["spec_accepted_tokens_total"] / metrics["spec_draft_tokens_total"]
    body, _ = render(make_registry(EngineCollector(noisy_spec.metrics, "tiny", lambda: None, dict)))
    text = body.decode()
    for name in ("mistralrs_speculative_acceptance_ratio", "mistralrs_speculative_draft_tokens_total",
                 "mistralrs_speculative_accepted_tokens_total"):
        assert name in text


def test_cli_speculative_subcommand_builds_the_llm_arguments():
    from mistralrs_jax import cli
    from mistralrs_jax.engine.speculative import DEFAULT_GAMMA

    def kwargs(command_line: str) -> dict:
        return cli.build_llm_kwargs(cli.build_parser().parse_args(shlex.split(command_line)))

    got = kwargs("--isq Q8_0 --max-seqs 8 speculative -m target/repo -f t.gguf --draft-model-id draft/repo "
                 "--draft-quantized-filename d.gguf --draft-isq Q4_0 -g 3")
    assert {k: got[k] for k in ("model", "gguf_file", "draft_model", "draft_gguf_file", "draft_isq",
                                "speculative_gamma", "isq", "max_seqs")} == {
        "model": "target/repo", "gguf_file": "t.gguf", "draft_model": "draft/repo", "draft_gguf_file": "d.gguf",
        "draft_isq": "Q4_0", "speculative_gamma": 3, "isq": "Q8_0", "max_seqs": 8}
    plain_dirs = kwargs("speculative -m ./target-dir --draft-model-id ./draft-dir")
    assert plain_dirs["gguf_file"] is None and plain_dirs["draft_gguf_file"] is None
    assert plain_dirs["speculative_gamma"] == DEFAULT_GAMMA == cli.DEFAULT_SPECULATIVE_GAMMA
    with pytest.raises(SystemExit):
        kwargs("speculative -m t --draft-model-id d -g 0")

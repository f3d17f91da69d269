"""ISQ through the engine: `LLM(isq=...)`, the ISQ cache across restarts, and /v1/re_isq live.

Two engines in all (each start quantizes SmolLM2 and compiles three step shapes): the first
fills the cache, the second restores it and then serves the re-ISQ checks.
"""
from __future__ import annotations

import json
import os
import threading
import time

import httpx
import numpy as np
import pytest

from mistralrs_jax.sampling_params import SamplingParams

SMALL = dict(token_buckets=[2, 8, 32], max_num_batched_tokens=32, max_seqs=4, pa_ctxt_len=2048)
# Not the bare question: its first answer token is a near-tie in SmolLM2 (see PHRASINGS below)
# that K-quants and 8-bit activation rounding (the CPU kernel, as llama.cpp) flip.
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
SCORED_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower."


def answer(llm) -> str:
    return llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text


@pytest.fixture(scope="module")
def restarted(smollm2_gguf_path, tmp_path_factory):
    """(first engine's facts, second engine): both LLM(isq="Q8_0", isq_cache=the same dir)."""
    from mistralrs_jax import LLM

    cache_dir = str(tmp_path_factory.mktemp("isq-cache"))
    first = LLM(isq="Q8_0", isq_cache=cache_dir, **SMALL)
    try:
        ids = first.tokenizer.encode(SCORED_TEXT)
        facts = {"cache_dir": cache_dir, "ids": ids, "logits": first.score(ids), "answer": answer(first),
                 "cache_hits": first.isq_factory.cache_hits, "summary": first.isq_factory.summary(),
                 "quantized": len(first.isq_factory.quantized_arrays()),
                 "cache_files": sum(len(files) for _, _, files in os.walk(cache_dir))}
    finally:
        first.shutdown()
    second = LLM(isq="Q8_0", isq_cache=cache_dir, **SMALL)
    try:
        yield facts, second
    finally:
        second.shutdown()


def test_isq_model_answers_and_its_cache_restores_identical_weights(restarted):
    facts, second = restarted
    assert "Paris" in facts["answer"], facts["answer"]
    assert set(facts["summary"]) <= {"Q8_0", "source"} and facts["summary"]["Q8_0"] > 0, facts["summary"]
    assert facts["cache_hits"] == 0 and facts["cache_files"] > 0

    assert second.isq_type == "Q8_0"
    assert second.isq_factory.cache_hits == facts["quantized"] > 0  # every ISQ'd tensor came from the cache
    assert second.isq_factory.summary() == facts["summary"]
    np.testing.assert_array_equal(second.score(facts["ids"]), facts["logits"])


def test_re_isq_on_a_live_server(restarted):
    from server.app import create_app
    from server.serving import BackgroundServer

    facts, llm = restarted
    background = BackgroundServer(create_app(llm)).start()
    try:
        http = httpx.Client(base_url=background.url, timeout=300)
        chat = {"model": "default", "messages": QUESTION, "temperature": 0, "max_tokens": 24}
        assert http.get("/v1/models").json()["data"][0]["isq_type"] == "Q8_0"

        # To another type: the weights change (and are an affine form now).
        response = http.post("/v1/re_isq", json={"ggml_type": "Q4_1"})
        assert response.status_code == 200, response.text
        assert response.json()["isq_type"] == "Q4_1" and llm.isq_type == "Q4_1"
        assert http.get("/v1/models").json()["data"][0]["isq_type"] == "Q4_1"
        assert set(llm.isq_factory.summary()) <= {"Q4_1", "source"}
        q4_logits = llm.score(facts["ids"])
        assert not np.array_equal(q4_logits, facts["logits"])
        assert np.abs(q4_logits - facts["logits"]).max() < 0.5 * np.abs(facts["logits"]).max()

        # A request streaming while re_isq is called finishes on the old weights, normally.
        streamed: dict = {"chunks": [], "started": threading.Event()}

        def stream() -> None:
            body = {**chat, "messages": [{"role": "user", "content": "Write a long story about a dog."}],
                    "max_tokens": 128, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                streamed["status"] = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        streamed["chunks"].append(line)
                        streamed["started"].set()
                    if line == "data: [DONE]":
                        streamed["done_at"] = time.monotonic()
            streamed["started"].set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert streamed["started"].wait(120)
        chunks_before = len(streamed["chunks"])
        response = http.post("/v1/re_isq", json={"isq_type": "q8_0"})
        answered_at = time.monotonic()
        streamer.join(120)
        assert response.status_code == 200, response.text
        assert response.json()["isq_type"] == "Q8_0"
        assert streamed["status"] == 200 and "done_at" in streamed, streamed
        assert chunks_before < len(streamed["chunks"]) - 2  # it was still streaming when re_isq came
        assert streamed["done_at"] <= answered_at  # re_isq waited for it
        finishes = [json.loads(c[6:])["choices"][0].get("finish_reason") for c in streamed["chunks"]
                    if json.loads(c[6:])["choices"]]
        assert finishes[-1] in ("length", "stop"), finishes  # it ended normally, not aborted

        summary = llm.isq_factory.summary()
        assert llm.isq_type == "Q8_0" and set(summary) <= {"Q8_0", "source"} and summary["Q8_0"] > 0, summary
        assert http.get("/v1/models").json()["data"][0]["isq_type"] == "Q8_0"
        assert http.get("/v1/status").json()["model"]["isq_type"] == "Q8_0"
        reply = http.post("/v1/chat/completions", json=chat).json()
        assert "Paris" in reply["choices"][0]["message"]["content"], reply
        # Back to Q8_0 in place: exactly the weights a fresh Q8_0 load had.
        np.testing.assert_array_equal(llm.score(facts["ids"]), facts["logits"])

        bad = http.post("/v1/re_isq", json={"isq_type": "Q9K"})
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Q9K" in error["message"]
        assert llm.isq_type == "Q8_0"
    finally:
        background.stop()


# Four phrasings of the question. The source checkpoint is already Q4_1, so re-quantizing it
# moves logits by a few tenths: a first answer token that is a near-tie in the source can flip
# (measured: "What is the capital of France?" opens with "The" 25.69 vs "L" 25.59 unquantized,
# and both Q4K and Q6K pick "L'Étoile..."), while every clear decision stays.
PHRASINGS = ["What is the capital of France?", "What is the capital of France? Answer in one word.",
             "Which city is the capital of France?", "Name the capital city of France."]
NEAR_TIE = 0.25  # top-1 minus top-2 logit of the unquantized model


def test_q4k_model_still_answers_paris_wherever_the_source_is_not_a_near_tie(monkeypatch):
    """SmolLM2 ISQ'd to Q4K answers "Paris" to every phrasing whose first answer token is a clear
    decision in the unquantized (f32) model, and to at least 3 of the 4.

    This checks the quantized weights, so the matmuls use them exactly (the XLA reference). The
    CPU kernel also rounds activations to 8 bits (as llama.cpp does; its logit bound is checked
    in test_packed_engine.py), which flips near-ties of this 135M model: measured, the bare
    question then opens with "L'Etoile" in the unquantized Q4_1 model too."""
    from mistralrs_jax import LLM

    monkeypatch.setenv("MISTRALRS_JAX_QMATMUL", "reference")
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    conversations = [[{"role": "user", "content": question}] for question in PHRASINGS]
    source = LLM(cpu_weights="f32", **SMALL)
    try:
        source_answers = [out.outputs[0].text for out in source.chat(conversations, greedy)]
        gaps = []
        for conversation in conversations:
            top = np.sort(source.score(source.chat_prompt_ids(conversation)[0])[-1])
            gaps.append(float(top[-1] - top[-2]))
    finally:
        source.shutdown()
    assert all("Paris" in text for text in source_answers), source_answers
    quantized = LLM(isq="Q4K", **SMALL)
    try:
        assert quantized.isq_factory.summary().get("Q4_K", 0) > 0
        answers = [out.outputs[0].text for out in quantized.chat(conversations, greedy)]
    finally:
        quantized.shutdown()
    flipped = [(question, gap, text) for question, gap, text in zip(PHRASINGS, gaps, answers) if "Paris" not in text]
    assert len(flipped) <= 1 and all(gap < NEAR_TIE for _, gap, _ in flipped), (flipped, gaps)


def test_cli_isq_flags_reach_llm(tmp_path):
    import inspect
    import shlex

    from mistralrs_jax import LLM, cli
    from mistralrs_jax.errors import InvalidRequestError

    args = cli.build_parser().parse_args(shlex.split(f"--isq q4_k --isq-cache {tmp_path} gguf -m . -f model.gguf"))
    kwargs = cli.build_llm_kwargs(args)
    assert kwargs["isq"] == "q4_k" and kwargs["isq_cache"] == str(tmp_path)
    assert set(kwargs) <= set(inspect.signature(LLM).parameters)
    with pytest.raises(InvalidRequestError, match="unknown ISQ type"):
        LLM(isq="Q9K")  # rejected before any file is read

"""What the multi-device server tests share (test_multihost.py, test_data_parallel.py): the flags
every server under test and its reference run with, and the reference itself: one engine in this
process (one device) on the same model and flags, served on loopback and asked by the openai client.

A test module imports the `reference` fixture with the helpers it uses."""
from __future__ import annotations

import re
import time
from pathlib import Path

import openai
import pytest

# f32 weights: a reply does not depend on which other rows share its step (the packed kernels'
# activation rounding does), so replies batched any way can be held to the one-at-a-time reference.
FLAGS = ["--max-seqs", "4", "--max-num-batched-tokens", "8", "--pa-ctxt-len", "1024", "--seed", "0",
         "--cpu-weights", "f32"]
PROMPTS = ["Name three colors.", "What is the capital of France?", "Write one sentence about the sea.",
           "Count from one to five.", "Say hello in French.", "What is two plus two?"]
START_TIMEOUT_S = 600


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def reply(client: openai.OpenAI, prompt: str) -> str:
    """The greedy reply (24 tokens at most) to one user message."""
    response = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, temperature=0)
    return response.choices[0].message.content


def served_url(log: Path, processes: list) -> str | None:
    """The URL a `mistralrs-server` writing to `log` serves on, once it does (None if a process ends first)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"serving .* on (http://\S+) ", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if any(p.poll() is not None for p in processes):
            return None
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path):
    """The same model and flags in one engine in this process, served on loopback: its openai client."""
    from mistralrs_jax import LLM
    from mistralrs_jax.cli import build_parser
    from mistralrs_jax.cli_kwargs import build_llm_kwargs
    from server.app import create_app
    from server.serving import BackgroundServer

    llm = LLM(**build_llm_kwargs(build_parser().parse_args(FLAGS)))
    try:
        with BackgroundServer(create_app(llm, default_seed=0)) as server:
            yield client_for(server.url)
    finally:
        llm.shutdown()

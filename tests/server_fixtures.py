"""Fixtures for the HTTP server tests: ONE engine on the default model, served on loopback
by real hypercorn servers (on background threads) that the real `openai` client talks to.

Loaded by the server test modules with `pytest_plugins = ["server_fixtures"]`, so every
module shares the same session-scoped engine (each engine start compiles its buckets).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-secret-key"
SMALL_BODY_LIMIT = 4096  # bytes, for the 413 test


@dataclass
class LiveServer:
    url: str
    llm: Any
    request_log: Path | None = None
    api_key: str | None = None
    max_body_bytes: int | None = None

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120)
        return openai.OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, **kwargs)

    def metrics(self) -> dict[str, float]:
        """`/metrics` parsed by prometheus_client's own parser: sample name -> value (model label dropped)."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model"}
                key = sample.name + ("" if not labels else str(sorted(labels.items())))
                values[key] = sample.value
        return values

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/status", timeout=30).json()

    def wait_until(self, condition: Callable[[dict[str, float]], bool], timeout: float) -> tuple[bool, float]:
        """Poll /metrics until `condition(metrics)` holds; (held, seconds waited)."""
        start = time.monotonic()
        while True:
            if condition(self.metrics()):
                return True, time.monotonic() - start
            if time.monotonic() - start > timeout:
                return False, time.monotonic() - start
            time.sleep(0.02)


@pytest.fixture(scope="session")
def server_llm(smollm2_gguf_path):
    """The engine every server test shares: small step buckets and KV pool, so it starts quickly."""
    from mistralrs_jax import LLM

    llm = LLM(max_seqs=32, token_buckets=[2, 8, 32, 128], max_num_batched_tokens=128, pa_ctxt_len=4096)
    try:
        yield llm
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def f32_server(smollm2_gguf_path):
    """A server on the default model with f32 weights: for tests whose claim is exact equality of
    tokens across batch compositions. The default packed engine quantizes activations to 8 bits as
    llama.cpp does, which turns reduction-order noise into near-tie flips (tests/test_batching.py)."""
    from mistralrs_jax import LLM

    llm = LLM(max_seqs=8, token_buckets=[2, 8, 32], max_num_batched_tokens=32, pa_ctxt_len=2048, cpu_weights="f32")
    background = _start(llm)
    try:
        yield LiveServer(background.url, llm)
    finally:
        background.stop()
        llm.shutdown()


def _start(llm: Any, **app_kwargs: Any):
    from server.app import create_app
    from server.serving import BackgroundServer

    return BackgroundServer(create_app(llm, **app_kwargs)).start()


@pytest.fixture(scope="session")
def live_server(server_llm, tmp_path_factory):
    """The main server (no API key), logging requests to a file."""
    log_path = tmp_path_factory.mktemp("server") / "requests.jsonl"
    background = _start(server_llm, request_log=str(log_path))
    try:
        yield LiveServer(background.url, server_llm, request_log=log_path)
    finally:
        background.stop()


@pytest.fixture(scope="session")
def keyed_server(server_llm):
    """The same engine behind a second app that requires an API key."""
    background = _start(server_llm, api_key=API_KEY)
    try:
        yield LiveServer(background.url, server_llm, api_key=API_KEY)
    finally:
        background.stop()


@pytest.fixture(scope="session")
def small_body_server(server_llm):
    """The same engine behind an app that takes request bodies of at most SMALL_BODY_LIMIT bytes."""
    background = _start(server_llm, max_body_bytes=SMALL_BODY_LIMIT)
    try:
        yield LiveServer(background.url, server_llm, max_body_bytes=SMALL_BODY_LIMIT)
    finally:
        background.stop()


@pytest.fixture(scope="session")
def lenient_server(server_llm, tmp_path_factory):
    """The same engine behind an app started with -t/--truncate-sequence and -s/--seed 1234."""
    log_path = tmp_path_factory.mktemp("lenient") / "requests.jsonl"
    background = _start(server_llm, truncate_sequence=True, default_seed=1234, request_log=str(log_path))
    try:
        yield LiveServer(background.url, server_llm, request_log=log_path)
    finally:
        background.stop()
